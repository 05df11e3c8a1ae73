"""``skip-scales``: SkipVAR's static step skipping (Li et al., 2025) — chosen late scales are not generated.

A skipped scale samples no tokens and runs no transformer step: the running latent (always at full resolution in
VAR) is carried on unchanged, and after the last scale decoded as it is. The last scale alone is 37.6 % of the
tokens and 61 % of the attention at 256 px. Lossy (the finest detail is missing): measure it on your model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nextscale.accel.base import Accel, PlanContext, register, scale_index
from nextscale.engine.var.plan import StepPlan
from nextscale.errors import InvalidInputError


@register
@dataclass(frozen=True)
class SkipScales(Accel):
    """``last``: skip that many final scales (default 1); or ``scales``: the indices to skip (e.g. ``8/9``)."""

    name = "skip-scales"
    stage = 20
    last: int = 1
    scales: tuple[int, ...] = ()

    def skipped(self, ctx: PlanContext) -> set[int]:
        if self.scales:
            return {scale_index(self.name, si, ctx) for si in self.scales}
        if not 1 <= self.last < ctx.num_scales:
            raise InvalidInputError(f"skip-scales: last={self.last}; allowed 1..{ctx.num_scales - 1}")
        return set(range(ctx.num_scales - self.last, ctx.num_scales))

    def apply(self, steps: list[StepPlan], ctx: PlanContext) -> list[StepPlan]:
        skip = self.skipped(ctx)
        if 0 in skip:
            raise InvalidInputError("skip-scales: the first scale cannot be skipped")
        return [dataclasses.replace(p, skip=True, hook=None) if si in skip else p for si, p in enumerate(steps)]
