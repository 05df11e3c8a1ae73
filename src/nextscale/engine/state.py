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
from nextscale.engine.sampling import Generators, cfg_mix, cfg_weight, gumbel_soft_codes, sample_tokens
from nextscale.models.tokenizers.msvq import MultiScaleQuantizer
from nextscale.models.var import VAR, Conditioning


@dataclass
class ScaleResult:
    """What one scale produced: its token map and the running latent after adding it."""

    si: int
    num_scales: int
    idx_Bl: torch.Tensor
    f_hat_BChw: torch.Tensor

    @property
    def is_last(self) -> bool:
        return self.si == self.num_scales - 1


class Generation:
    def __init__(self, model: VAR, quantizer: MultiScaleQuantizer, labels_B: torch.Tensor, params: SamplingParams,
                 generators: Generators, kv: KVCache | KVSlot | None = None, forced: ForcedTokens | None = None,
                 lvl_pos_1LC: torch.Tensor | None = None):
        self.model, self.quant, self.params = model, quantizer, params
        self.generators, self.forced = generators, forced
        self.B = labels_B.shape[0]
        self.num_scales = model.scales.num_scales
        self.si = 0
        self.lvl_pos = model.level_pos() if lvl_pos_1LC is None else lvl_pos_1LC
        rows = torch.cat((labels_B, torch.full_like(labels_B, model.num_classes)))
        self.cond: Conditioning = model.condition(rows)
        self.x = model.first_tokens(self.cond, self.lvl_pos)  # [R, first_l, C]
        side = quantizer.side
        self.f_hat = torch.zeros(self.B, quantizer.Cvae, side, side, device=labels_B.device)
        self.kv: KVCache | KVSlot = kv if kv is not None else KVCache.for_model(model, rows=2 * self.B)
        self.tokens: list[torch.Tensor] = []

    @property
    def done(self) -> bool:
        return self.si >= self.num_scales

    @property
    def rows(self) -> int:
        return 2 * self.B

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
            x_BlC = self.model.next_tokens(self.si, nxt_BChw.view(B, self.quant.Cvae, -1).transpose(1, 2),
                                           self.lvl_pos)
            self.x = x_BlC.repeat(2, 1, 1)  # the same map feeds both guidance branches
        return ScaleResult(si, self.num_scales, idx_Bl, self.f_hat)

    def release(self) -> None:
        self.kv.free()
