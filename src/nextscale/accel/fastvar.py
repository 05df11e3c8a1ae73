"""``fastvar``: FastVAR's cached token pruning (Guo et al., ICCV 2025) at the largest scales.

At the last scales most tokens have converged; only the "pivotal" ones — farthest from the scale's mean token
(its DC component) — need the middle blocks. At a pruned scale each middle block runs on the top ``keep`` share of
the tokens by that score (per row, recomputed before every block), appends only their keys/values to the cache,
and the pruned positions take the update the same block made at an earlier scale ("cached token restoration":
that scale's block updates, area-interpolated to the new side). The first and last blocks see every token.
Defaults for VAR's 10-scale schedule: prune the last two scales (sides 13 and 16) keeping 40 %, blocks from ~10 %
to ~88 % of the depth (FastVAR keeps 3 + 4 of Infinity's 32 blocks full), updates cached at the scale before.
Lossy: measure it on your model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nextscale.accel.base import Accel, PlanContext, register, scale_index
from nextscale.engine.var.plan import REFINER, HookContext, StepPlan
from nextscale.errors import InvalidInputError
from nextscale.models.attention import Layout


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
        layout: Layout,
    ) -> torch.Tensor:
        if not self.first <= layer < self.last:
            return block(x, mod, layout)
        if not self.prune or ctx.prefill:  # a cache scale (or a refiner's prefix pass): keep the updates
            out = block(x, mod, layout)
            ctx.scratch[("fastvar", layer)] = (out - x)[:, ctx.prefill :]
            return out
        R, l, C = x.shape
        k = max(1, math.ceil(self.keep * l))
        score_Rl = (x - x.mean(dim=1, keepdim=True)).float().square().sum(-1)
        idx_Rk = score_Rl.topk(k, dim=1).indices.sort(dim=1).values  # keep the raster order of what is kept
        gather = idx_Rk.unsqueeze(-1).expand(R, k, C)
        x_kept = x.gather(1, gather)
        upd_kept = block(x_kept, mod, layout) - x_kept
        cached = ctx.scratch[("fastvar", layer)][:R]  # [R, l0, C]: fewer rows if guidance stopped since
        pn0 = math.isqrt(cached.shape[1])
        upd_RCpp = F.interpolate(cached.transpose(1, 2).reshape(R, C, pn0, pn0), size=(ctx.pn, ctx.pn), mode="area")
        upd = upd_RCpp.reshape(R, C, l).transpose(1, 2).to(x.dtype).scatter(1, gather, upd_kept)
        return x + upd


@register
@dataclass(frozen=True)
class FastVAR(Accel):
    """``keep``: share of tokens the middle blocks compute, one value or one per pruned scale (``0.5/0.3``);
    ``scales``: pruned scales (default: the last two); ``layers``: ``first-last`` blocks that prune (end
    exclusive); ``cache``: the scale whose block updates fill the pruned positions (default: the one before)."""

    name = "fastvar"
    stage = 60
    keep: tuple[float, ...] = (0.4,)
    scales: tuple[int, ...] = (-2, -1)
    layers: tuple[int, ...] = ()
    cache: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keep, (int, float)):
            object.__setattr__(self, "keep", (float(self.keep),))
        if not self.keep or not all(0 < k <= 1 for k in self.keep):
            raise InvalidInputError(f"fastvar: keep must be in (0, 1], got {self.keep}")
        if len(self.keep) not in (1, len(self.scales)):
            raise InvalidInputError(f"fastvar: {len(self.keep)} keep values for {len(self.scales)} scales")

    def layer_range(self, depth: int) -> tuple[int, int]:
        if self.layers:
            if len(self.layers) != 2 or not 0 <= self.layers[0] < self.layers[1] <= depth:
                raise InvalidInputError(f"fastvar: layers={self.layers} must be first-last within 0..{depth}")
            return self.layers[0], self.layers[1]
        return max(1, round(0.1 * depth)), depth - max(1, round(0.12 * depth))

    def apply(self, steps: list[StepPlan], ctx: PlanContext) -> list[StepPlan]:
        pruned = sorted(scale_index(self.name, si, ctx) for si in self.scales)
        keeps = dict(zip(pruned, self.keep * len(pruned) if len(self.keep) == 1 else self.keep))
        recorder = pruned[0] - 1 if self.cache is None else scale_index(self.name, self.cache, ctx)
        if recorder >= pruned[0] or steps[recorder].skip:
            raise InvalidInputError(f"fastvar: the cache scale {recorder} must run before the pruned scales {pruned}")
        out = list(steps)
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
