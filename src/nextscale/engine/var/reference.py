"""The slow, obviously-correct sampler: the official ``autoregressive_infer_cfg`` written for clarity.

It is the oracle every fast path is tested against. It keeps the official structure on purpose: the KV
cache grows by concatenation, the class conditioning is recomputed at every scale, everything runs in the
model's dtype with fp32 logits. Shapes: ``B`` images, ``2B`` rows (conditional rows first), ``l = pn*pn``.
"""

from __future__ import annotations

import torch

from nextscale.engine.kv_cache import ConcatKVCache
from nextscale.engine.sampling import (
    Generators,
    cfg_double,
    cfg_labels,
    cfg_mix,
    cfg_weight,
    gumbel_soft_codes,
    sample_tokens,
)
from nextscale.engine.var.params import ForcedTokens, SamplingParams
from nextscale.engine.var.state import SampleResult
from nextscale.models.attention import CachedStep
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR


@torch.no_grad()
def reference_sample(
    var: VAR,
    vae: VQVAE,
    labels_B: torch.Tensor,
    params: SamplingParams,
    generators: Generators,
    forced: ForcedTokens | None = None,
) -> SampleResult:
    B, quant = labels_B.shape[0], vae.quantize
    S = var.scales.num_scales
    rows_R = cfg_labels(labels_B, var.num_classes)
    lvl_pos = var.level_pos()
    x_RlC = var.first_tokens(var.condition(rows_R), lvl_pos)
    kv = ConcatKVCache(var.depth)
    f_hat = torch.zeros(B, quant.Cvae, quant.side, quant.side, device=labels_B.device)
    tokens, next_inputs = [], []
    for si, pn in enumerate(var.scales.patch_nums):
        # 1. one transformer step over this scale's tokens, attending to every coarser scale via the cache
        logits_RlV = var.forward_tokens(x_RlC, var.condition(rows_R), CachedStep(kv))
        # 2. guidance, then top-k / top-p sampling (in place on the guided logits)
        logits_BlV = cfg_mix(logits_RlV, cfg_weight(params.cfg, si, S))
        idx_Bl = sample_tokens(logits_BlV, params.top_k, params.top_p, generators)
        if params.more_smooth:
            h_BlCv = gumbel_soft_codes(logits_BlV, si / (S - 1), quant.embedding.weight.float(), generators)
        else:
            h_BlCv = quant.embedding(idx_Bl).float()
        if forced is not None:  # zero-shot editing: known tokens replace the sampled ones
            keep = forced.keep[si]
            idx_Bl = torch.where(keep, forced.idx[si], idx_Bl)
            h_BlCv = torch.where(keep.unsqueeze(-1), quant.embedding(forced.idx[si]).float(), h_BlCv)
        tokens.append(idx_Bl)
        # 3. add the scale to the latent; the next scale's input is the latent downsampled to its size
        nxt_BChw = quant.next_input(si, f_hat, h_BlCv.transpose(1, 2).reshape(B, quant.Cvae, pn, pn))
        if si < S - 1:
            nxt_BlCv = nxt_BChw.view(B, quant.Cvae, -1).transpose(1, 2)
            next_inputs.append(nxt_BlCv)
            x_RlC = cfg_double(var.next_tokens(si + 1, nxt_BlCv, lvl_pos))
    return SampleResult(tokens, f_hat, next_inputs)
