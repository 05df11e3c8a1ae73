"""``fastvar``: FastVAR's cached token pruning (Guo et al., ICCV 2025) at the largest scales.

At the last scales most tokens have converged; only the "pivotal" ones — farthest from the scale's mean token
(its DC component) — need the middle blocks. At a pruned scale each middle block runs on the top ``keep`` share of
the tokens by that score (per row, recomputed before every block), appends only their keys/values to the cache,
and the pruned positions take the update the same block made at an earlier scale ("cached token restoration":
that scale's block updates, area-interpolated to the new h x w). The first and last blocks see every token.

Defaults per family. VAR (10 scales, no published setting): prune the last two scales (sides 13 and 16) keeping
40 %, updates cached at the scale before. Infinity, as FastVAR's released code runs Infinity-2B at 1024 px (13
scales): prune ratios 0.4 at side 32 and 0.5 at side 40 (keep 0.6 / 0.5), updates cached at side 24, and the two
largest scales (48, 64) skipped — "100 % pruning", the summed codes decoded as they are; counted from the end of
the schedule so that every template and pixel budget gets the same shape of plan. Blocks from ~10 % to ~88 % of
the depth prune (3 + 4 of Infinity-2B's 32 blocks see every token, as released). Lossy: measure it on your model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nextscale.accel.base import Accel, PlanContext, register, scale_index
from nextscale.engine.var.plan import REFINER, HookContext, StepPlan
from nextscale.errors import InvalidInputError
from nextscale.models.attention import DenseRows


@dataclass(frozen=True)
class PruneHook:
    """The per-block behaviour of one scale: record the middle blocks' updates (``prune=False``), or prune."""

    first: int
    last: int
    keep: float = 1.0
    prune: bool = False

    def __call__(
        self,
        ctx: HookContext,
        layer: int,
        block: Callable[..., torch.Tensor],
        x: torch.Tensor,
        mod: torch.Tensor,
        layout: DenseRows,
    ) -> torch.Tensor:
        if not self.first <= layer < self.last:
            return block(x, mod, layout)
        if not self.prune or ctx.prefill:  # a cache scale (or a refiner's prefix pass): keep the updates
            out = block(x, mod, layout)
            ctx.scratch[("fastvar", layer)] = ((out - x)[:, ctx.prefill :], ctx.grid)
            return out
        R, l, C = x.shape
        k = max(1, math.ceil(self.keep * l))
        score_Rl = (x - x.mean(dim=1, keepdim=True)).float().square().sum(-1)
        idx_Rk = score_Rl.topk(k, dim=1).indices.sort(dim=1).values  # keep the raster order of what is kept
        gather = idx_Rk.unsqueeze(-1).expand(R, k, C)
        x_kept = x.gather(1, gather)
        upd_kept = block(x_kept, mod, layout.kept(idx_Rk)) - x_kept
        cached, (h0, w0) = ctx.scratch[("fastvar", layer)]
        cached = cached[:R]  # [R, h0 * w0, C]: fewer rows if guidance stopped since
        h, w = ctx.grid
        upd_RChw = F.interpolate(cached.transpose(1, 2).reshape(R, C, h0, w0), size=(h, w), mode="area")
        upd = upd_RChw.reshape(R, C, l).transpose(1, 2).to(x.dtype).scatter(1, gather, upd_kept)
        return x + upd


# Per family: the pruned scales and their keep shares, the cache scale (None: the one before the first pruned) and
# the scales skipped outright (see the module docstring for where each comes from).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "var": {"keep": (0.4,), "scales": (-2, -1), "cache": None, "skip": ()},
    "infinity": {"keep": (0.6, 0.5), "scales": (-4, -3), "cache": -5, "skip": (-2, -1)},
}


@register
@dataclass(frozen=True)
class FastVAR(Accel):
    """``keep``: share of tokens the middle blocks compute, one value or one per pruned scale (``0.5/0.3``);
    ``scales``: pruned scales; ``layers``: ``first-last`` blocks that prune (end exclusive); ``cache``: the scale
    whose block updates fill the pruned positions; ``skip``: scales not generated at all. Unset: the model family's
    defaults (``FAMILY_DEFAULTS``)."""

    name = "fastvar"
    stage = 60
    keep: tuple[float, ...] | None = None
    scales: tuple[int, ...] | None = None
    layers: tuple[int, ...] = ()
    cache: int | None = None
    skip: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keep, (int, float)):
            object.__setattr__(self, "keep", (float(self.keep),))
        if self.keep is not None and (not self.keep or not all(0 < k <= 1 for k in self.keep)):
            raise InvalidInputError(f"fastvar: keep must be in (0, 1], got {self.keep}")
        if self.keep is not None and self.scales is not None and len(self.keep) not in (1, len(self.scales)):
            raise InvalidInputError(f"fastvar: {len(self.keep)} keep values for {len(self.scales)} scales")

    def settings(self, family: str) -> tuple[tuple[float, ...], tuple[int, ...], int | None, tuple[int, ...]]:
        """(keep, scales, cache, skip): what is given, the family's defaults for the rest."""
        d = FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["var"])
        keep = d["keep"] if self.keep is None else self.keep
        scales = d["scales"] if self.scales is None else self.scales
        if len(keep) not in (1, len(scales)):  # only one of the two given: one keep share for every pruned scale
            keep = keep[:1] if self.keep is None else keep
        if len(keep) not in (1, len(scales)):
            raise InvalidInputError(f"fastvar: {len(keep)} keep values for {len(scales)} scales")
        cache = self.cache if self.cache is not None or self.scales is not None else d["cache"]
        return keep, scales, cache, d["skip"] if self.skip is None else self.skip

    def layer_range(self, depth: int) -> tuple[int, int]:
        if self.layers:
            if len(self.layers) != 2 or not 0 <= self.layers[0] < self.layers[1] <= depth:
                raise InvalidInputError(f"fastvar: layers={self.layers} must be first-last within 0..{depth}")
            return self.layers[0], self.layers[1]
        return max(1, round(0.1 * depth)), depth - max(1, round(0.12 * depth))

    def apply(self, steps: list[StepPlan], ctx: PlanContext) -> list[StepPlan]:
        keep, scales, cache, skip = self.settings(ctx.family)
        skipped = {scale_index(self.name, si, ctx) for si in skip}
        pruned = sorted(scale_index(self.name, si, ctx) for si in scales)
        if 0 in skipped or skipped & set(pruned):
            raise InvalidInputError(f"fastvar: skip={skip} must leave the first scale and the pruned {pruned}")
        keeps = dict(zip(pruned, keep * len(pruned) if len(keep) == 1 else keep))
        recorder = pruned[0] - 1 if cache is None else scale_index(self.name, cache, ctx)
        if recorder >= pruned[0] or steps[recorder].skip:
            raise InvalidInputError(f"fastvar: the cache scale {recorder} must run before the pruned scales {pruned}")
        out = [dataclasses.replace(p, skip=True, hook=None) if si in skipped else p for si, p in enumerate(steps)]
        for si in pruned:
            p = steps[si]
            if p.skip:
                continue
            depth = ctx.refiner_depth if p.model == REFINER else ctx.depth
            assert depth is not None
            first, last = self.layer_range(depth)
            if steps[recorder].model != p.model:  # a hand-off in between: the new model's first scale records
                recorder = next(s for s in range(recorder, si + 1) if steps[s].model == p.model and not steps[s].skip)
            if recorder == si:  # the hand-off scale itself: nothing is cached on this model yet, so it records
                out[si] = dataclasses.replace(p, hook=PruneHook(first, last))
                continue
            if out[recorder].hook is None:
                out[recorder] = dataclasses.replace(out[recorder], hook=PruneHook(first, last))
            frac = 1 - (1 - keeps[si]) * (last - first) / depth
            out[si] = dataclasses.replace(p, hook=PruneHook(first, last, keeps[si], True), tokens_fraction=frac)
        return out
