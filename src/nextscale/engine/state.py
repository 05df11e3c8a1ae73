"""The state of one generation request as it moves through the scales.

*Every request has a scale index ``si`` and the same ``S`` scales; a step feeds ``x`` (the request's tokens of
scale ``si``, conditional and unconditional rows) through the transformer, and ``advance`` turns the logits
into tokens and the next scale's input.* Who runs the transformer is not this module's business: the
pipeline's loop runs one request at a time, the serving engine packs many requests into one call.

Shapes: ``B`` images, ``R = 2B`` rows (CFG: conditional rows first), ``l`` tokens at scale ``si``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextscale.engine.kv_cache import KVCache, KVSlot
from nextscale.engine.request import ForcedTokens, SamplingParams
from nextscale.engine.sampling import (
    Generators,
    cfg_double,
    cfg_labels,
    cfg_mix,
    cfg_rows,
    cfg_weight,
    gumbel_soft_codes,
    sample_tokens,
)
from nextscale.models.tokenizers.msvq import MultiScaleQuantizer
from nextscale.models.var import VAR, Conditioning


@dataclass
class SampleResult:
    """What a sampler returns — the fast loop (``engine/sampler.py``) and the reference alike."""

    tokens: list[torch.Tensor]  # one [B, pn*pn] map per scale
    f_hat_BChw: torch.Tensor  # the final latent
    next_inputs: list[torch.Tensor]  # the area-downsampled latent fed to scales 1.. ([B, l, Cv] each)


@dataclass
class ScaleResult:
    """What one scale produced: its token map and the running latent after adding it.

    ``f_hat_BChw`` is the running latent itself, which later scales update in place (copying it at every scale
    would cost every caller): a caller that keeps it past the callback must copy it (the pipeline's previews do).
    """

    si: int
    num_scales: int
    idx_Bl: torch.Tensor
    f_hat_BChw: torch.Tensor

    @property
    def is_last(self) -> bool:
        return self.si == self.num_scales - 1


class Generation:
    def __init__(
        self,
        model: VAR,
        quantizer: MultiScaleQuantizer,
        labels_B: torch.Tensor,
        params: SamplingParams,
        generators: Generators,
        kv: KVSlot | None = None,
        forced: ForcedTokens | None = None,
        lvl_pos_1LC: torch.Tensor | None = None,
    ):
        self.model, self.quant, self.params = model, quantizer, params
        self.generators, self.forced = generators, forced
        self.B = labels_B.shape[0]
        self.num_scales = model.scales.num_scales
        self.si = 0
        self.lvl_pos = model.level_pos() if lvl_pos_1LC is None else lvl_pos_1LC
        self.cond: Conditioning = model.condition(cfg_labels(labels_B, model.num_classes))
        self.x = model.first_tokens(self.cond, self.lvl_pos)  # [R, first_l, C]
        side = quantizer.side
        self.f_hat = torch.zeros(self.B, quantizer.Cvae, side, side, device=labels_B.device)
        self.kv: KVSlot = kv if kv is not None else KVCache.for_model(model, rows=self.rows)
        self.tokens: list[torch.Tensor] = []
        self.next_inputs: list[torch.Tensor] = []

    @property
    def done(self) -> bool:
        return self.si >= self.num_scales

    @property
    def rows(self) -> int:
        return cfg_rows(self.B)

    @property
    def tokens_this_scale(self) -> int:
        return self.model.scales.tokens(self.si)

    def advance(self, logits_RlV: torch.Tensor) -> ScaleResult:
        """Guide, sample, update ``f_hat`` and prepare the next scale's input from this scale's logits."""
        si, p, B = self.si, self.params, self.B
        pn = self.model.scales.patch_nums[si]
        ratio = self.model.scales.ratio(si)
        logits_BlV = cfg_mix(logits_RlV, cfg_weight(p.cfg, si, self.num_scales))
        idx_Bl = sample_tokens(logits_BlV, p.top_k, p.top_p, self.generators)
        codebook_VC = self.quant.embedding.weight
        if p.more_smooth:
            h_BlCv = gumbel_soft_codes(logits_BlV, ratio, codebook_VC.float(), self.generators)
        else:
            h_BlCv = self.quant.embedding(idx_Bl).float()
        if self.forced is not None:
            keep_Bl = self.forced.keep[si]
            idx_Bl = torch.where(keep_Bl, self.forced.idx[si], idx_Bl)
            h_BlCv = torch.where(keep_Bl.unsqueeze(-1), self.quant.embedding(self.forced.idx[si]).float(), h_BlCv)
        h_BChw = h_BlCv.transpose(1, 2).reshape(B, self.quant.Cvae, pn, pn)
        nxt_BChw = self.quant.next_input(si, self.f_hat, h_BChw)
        self.tokens.append(idx_Bl)
        self.si += 1
        if not self.done:
            nxt_BlCv = nxt_BChw.view(B, self.quant.Cvae, -1).transpose(1, 2)
            self.next_inputs.append(nxt_BlCv)
            self.x = cfg_double(self.model.next_tokens(self.si, nxt_BlCv, self.lvl_pos))
        return ScaleResult(si, self.num_scales, idx_Bl, self.f_hat)

    def result(self) -> SampleResult:
        return SampleResult(self.tokens, self.f_hat, self.next_inputs)

    def release(self) -> None:
        self.kv.free()
