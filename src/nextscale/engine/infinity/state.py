"""One Infinity request's progress, one scale per ``step()``: the per-scale step the pipeline's loop and the serving
engine share (the reference loop, ``reference.py``, is the oracle both are tested against).

A request owns its conditioning (the prompts' pooled vector, AdaLN vectors and per-row text keys/values, computed once
at admission: ``Infinity.condition``), its KV cache (a ``KVSlot`` of a pool, or a private ``KVCache``), its schedule
(template and pixel budget: requests of different sizes run side by side) and its running latent. Guidance rows are
fixed for the whole request (2B when any scale is guided), as the official loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nextscale.engine.infinity.params import InfinityParams
from nextscale.engine.sampling import Generators, sample_tokens
from nextscale.errors import InvalidInputError
from nextscale.models.attention import KVAttend
from nextscale.models.infinity import CachedScale, Conditioning, Infinity
from nextscale.models.infinity_scales import InfinitySchedule, scale_rope
from nextscale.models.text_encoder import TextFeatures
from nextscale.models.tokenizers.bsq import BSQVAE, bits_to_codes, latent_to_tokens, unpatchify_bits, upsample_codes


@dataclass
class ScaleOutput:
    """What one ``step`` did: the scale, its bits [B, h, w, d] and the codes summed so far [B, d_vae, 1, H, W] (the
    request's own buffer: copy it to keep it past the next step)."""

    si: int
    bits_Bhwd: torch.Tensor
    summed_codes: torch.Tensor


def check_request(model: Infinity, vae: BSQVAE, sched: InfinitySchedule, params: InfinityParams) -> None:
    """What a request must satisfy before any work: per-scale lists of the schedule's length, an inner guidance
    layer inside the model, a tokenizer of the transformer's bits."""
    S = sched.num_scales
    for name in ("cfg", "tau"):
        v = getattr(params, name)
        if isinstance(v, tuple) and len(v) != S:
            raise InvalidInputError(
                f"{name} has {len(v)} values but the schedule has {S} scales: give one number or {S} values"
            )
    k = params.cfg_insertion_layer
    if k and model.depth + k <= 0:
        raise InvalidInputError(
            f"cfg_insertion_layer={k} is outside a model of {model.depth} blocks: 0 or -1 .. -{model.depth - 1}"
        )
    if model.cfg.bits != vae.cfg.token_bits:
        raise InvalidInputError(
            f"the transformer predicts {model.cfg.bits} bits per token, the tokenizer gives {vae.cfg.token_bits}"
        )


def request_rows(params: InfinityParams, sched: InfinitySchedule, num_images: int) -> int:
    """KV rows a request holds: both guidance branches when any scale is guided."""
    return 2 * num_images if params.guided(sched.num_scales) else num_images


class InfinityGeneration:
    """A request in progress. ``step()`` samples the next scale; ``done`` after the last (or ``trunk_scale``)."""

    def __init__(
        self,
        model: Infinity,
        vae: BSQVAE,
        text: TextFeatures,
        sched: InfinitySchedule,
        params: InfinityParams,
        generators: Generators,
        kv: KVAttend,
        negative: TextFeatures | None = None,
        release: Callable[[], None] | None = None,
    ):
        check_request(model, vae, sched, params)
        self.model, self.vae, self.sched, self.params, self.generators = model, vae, sched, params, generators
        self.B, self.kv, self._release = text.rows, kv, release
        S = sched.num_scales
        self.guided = params.guided(S)
        self.branches = 2 if self.guided else 1
        self.cond: Conditioning = model.condition(model.guided_text(text, negative) if self.guided else text)
        self.cfgs, self.taus = params.cfg_list(S), params.tau_list(S)
        self.stop = S if params.trunk_scale is None else min(S, params.trunk_scale)
        self.vae_grids = sched.vae_grids(vae.cfg.patchify)
        self.si = 0
        self.x: torch.Tensor = model.first_tokens(self.cond)
        self.summed: torch.Tensor | None = None
        self.bits: list[torch.Tensor] = []

    @property
    def num_scales(self) -> int:
        return self.stop

    @property
    def done(self) -> bool:
        return self.si >= self.stop

    @property
    def tokens(self) -> list[torch.Tensor]:
        return self.bits

    def release(self) -> None:
        if self._release is not None:
            self._release()
        self._release = None

    @torch.inference_mode()
    def step(self) -> ScaleOutput:
        """Sample scale ``si`` (infinity.py:538-622): all blocks over this scale's tokens with guidance on the logits
        or, for ``cfg_insertion_layer=-k``, on the hidden states after block depth-k; logits times 1/tau; one draw
        per bit; the codes added to the running latent, which resampled to the next grid is the next input."""
        assert not self.done, "the request is finished"
        model, B, si = self.model, self.B, self.si
        cfg, tau = self.cfgs[si], self.taus[si]
        layout = CachedScale(self.kv, scale_rope(model.cfg.head_dim, self.sched, si).to(self.x.device))
        k = self.params.cfg_insertion_layer
        x = self.x
        if cfg != 1 and k < 0:
            mix_end = model.depth + k + 1
            x = model.run_blocks(x, self.cond, layout, 0, mix_end)
            x = cfg * x[:B] + (1 - cfg) * x[B:]
            x = model.run_blocks(torch.cat((x, x)), self.cond, layout, mix_end)
        else:
            x = model.run_blocks(x, self.cond, layout)
        if cfg != 1 and k == 0:
            logits = model.logits(x, self.cond.cond_RD).mul(1 / tau)
            logits = cfg * logits[:B] + (1 - cfg) * logits[B:]
        else:
            logits = model.logits(x[:B], self.cond.cond_RD[:B]).mul(1 / tau)
        h, w = self.sched.grids[si]
        top_k = min(self.params.top_k, 2)  # two values per bit: the official sampler clamps top_k to V
        bits_Bhwd = sample_tokens(logits.reshape(B, -1, 2), top_k, self.params.top_p, self.generators)
        bits_Bhwd = bits_Bhwd.reshape(B, h, w, -1)
        self.bits.append(bits_Bhwd)
        codes = bits_to_codes(unpatchify_bits(bits_Bhwd, self.vae.cfg.patchify))
        last = si == self.sched.num_scales - 1
        if not last:
            up = upsample_codes(codes, self.vae_grids[-1])
            self.summed = up if self.summed is None else self.summed.add_(up)
            if si + 1 < self.stop:
                nxt = latent_to_tokens(self.summed, self.vae_grids[si + 1], self.vae.cfg.patchify)
                self.x = model.next_tokens(si + 1, nxt, self.branches)
        else:
            self.summed = codes.clone() if self.summed is None else self.summed.add_(codes)
        self.si += 1
        return ScaleOutput(si, bits_Bhwd, self.summed)
