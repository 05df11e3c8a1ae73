"""The slow, obviously-correct Infinity sampler: the official ``autoregressive_infer_cfg`` (infinity.py:455-642)
step by step. It is the oracle every fast path and the serving engine are tested against.

It keeps the official structure on purpose: guidance rows are fixed for the whole run (2B when any scale is
guided), the KV cache grows by concatenation, logits are float32. Shapes: ``B`` images, ``R`` rows, ``h x w`` the
token grid of a scale, ``d`` bits per token, ``V = 2d``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nextscale.engine.infinity.params import InfinityParams
from nextscale.engine.kv_cache import ConcatKVCache
from nextscale.engine.sampling import Generators, sample_tokens
from nextscale.errors import InvalidInputError
from nextscale.models.infinity import CachedScale, Infinity
from nextscale.models.infinity_scales import InfinitySchedule, scale_rope
from nextscale.models.text_encoder import TextFeatures
from nextscale.models.tokenizers.bsq import BSQVAE, bits_to_codes, latent_to_tokens, unpatchify_bits, upsample_codes


@dataclass
class ScaleStep:
    """What one scale computed (for tests, debugging and previews): guided logits divided by tau, before
    top-k/top-p [B, h*w, V]; sampled bits [B, h, w, d] (transformer layout); the next scale's input [B, l', d] (None
    at the last scale); a copy of the codes summed so far at the final latent grid [B, d_vae, 1, H, W]."""

    si: int
    logits_BlV: torch.Tensor
    bits_Bhwd: torch.Tensor
    next_Bld: torch.Tensor | None
    summed_codes: torch.Tensor


@dataclass
class InfinitySample:
    """Bits of every sampled scale ([B, h, w, d] int64), the summed codes [B, d_vae, 1, H_lat, W_lat] the decoder
    reads, and the image [B, 3, H, W] float32 in [-1, 1], RGB (the official uint8 output is BGR for cv2)."""

    bits: list[torch.Tensor]
    summed_codes: torch.Tensor
    image: torch.Tensor


@torch.no_grad()
def reference_sample(
    model: Infinity,
    vae: BSQVAE,
    text: TextFeatures,
    schedule: InfinitySchedule,
    params: InfinityParams,
    generators: Generators,
    negative: TextFeatures | None = None,
    on_scale: Callable[[ScaleStep], None] | None = None,
) -> InfinitySample:
    B, S, depth = text.rows, schedule.num_scales, model.depth
    cfgs, taus = params.cfg_list(S), params.tau_list(S)
    k = params.cfg_insertion_layer
    if depth + k <= 0:
        raise InvalidInputError(f"cfg_insertion_layer={k} is outside a {depth}-block model")
    patchify = vae.cfg.patchify
    if model.cfg.bits != vae.cfg.token_bits:
        raise InvalidInputError(
            f"the transformer predicts {model.cfg.bits} bits per token, the tokenizer gives {vae.cfg.token_bits}"
        )
    guided = params.guided(S)
    branches = 2 if guided else 1
    cond = model.condition(model.guided_text(text, negative) if guided else text)
    mix_end = depth + k + 1 if k < 0 else None  # hidden-state guidance after block depth+k
    vae_grids = schedule.vae_grids(patchify)
    top_k = min(params.top_k, 2)  # the sampler clamps top_k to V = 2 (values per bit)
    kv = ConcatKVCache(depth)
    x = model.first_tokens(cond)
    summed: torch.Tensor | None = None
    bits_list = []
    for si, (h, w) in enumerate(schedule.grids):
        if params.trunk_scale is not None and si >= params.trunk_scale:
            break
        cfg, tau = cfgs[si], taus[si]
        # 1. all blocks over this scale's tokens; guidance on hidden states mixes the halves after one block
        layout = CachedScale(kv, scale_rope(model.cfg.head_dim, schedule, si))
        if cfg != 1 and mix_end is not None:
            x = model.run_blocks(x, cond, layout, 0, mix_end)
            x = cfg * x[:B] + (1 - cfg) * x[B:]
            x = model.run_blocks(torch.cat((x, x)), cond, layout, mix_end)
        else:
            x = model.run_blocks(x, cond, layout)
        # 2. logits divided by tau (multiplied by the reciprocal, as the official), guided on logits
        if cfg != 1 and mix_end is None:
            logits = model.logits(x, cond.cond_RD).mul(1 / tau)
            logits = cfg * logits[:B] + (1 - cfg) * logits[B:]
        else:
            logits = model.logits(x[:B], cond.cond_RD[:B]).mul(1 / tau)
        captured = logits.clone() if on_scale is not None else logits
        # 3. one draw per bit: [B, h*w*d, 2] through the shared top-k/top-p multinomial sampler
        bits_Bhwd = sample_tokens(logits.reshape(B, -1, 2), top_k, params.top_p, generators).reshape(B, h, w, -1)
        bits_list.append(bits_Bhwd)
        # 4. add this scale's codes to the running latent; the next input is the latent resampled to its grid
        codes = bits_to_codes(unpatchify_bits(bits_Bhwd, patchify))
        nxt = None
        if si != S - 1:
            up = upsample_codes(codes, vae_grids[-1])
            summed = up if summed is None else summed.add_(up)
            nxt = latent_to_tokens(summed, vae_grids[si + 1], patchify)
            x = model.next_tokens(si + 1, nxt, branches)
        else:
            summed = codes.clone() if summed is None else summed.add_(codes)
        if on_scale is not None:
            on_scale(ScaleStep(si, captured, bits_Bhwd, nxt, summed.clone()))
    assert summed is not None
    return InfinitySample(bits_list, summed, vae.decode(summed.squeeze(-3)))
