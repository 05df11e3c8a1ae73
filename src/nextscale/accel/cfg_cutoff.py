"""``cfg-cutoff``: classifier-free guidance only up to a scale; the last scales run the conditional rows alone.

SkipVAR's unconditional-branch replacement (Li et al., 2025: from a late scale on, drop the null-class branch and
sample from the conditional logits) and StageVAR's guidance-free last stage, as a static knob. The late scales
hold most of the tokens (the last two: 62.5 % at 256 px), so halving their rows cuts the transformer's work by
~30 %; the cost is the guidance at the scales that add detail, not structure. Lossy: measure it on your model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nextscale.accel.base import Accel, PlanContext, register
from nextscale.engine.var.plan import StepPlan
from nextscale.errors import InvalidInputError


@register
@dataclass(frozen=True)
class CfgCutoff(Accel):
    """``last``: how many final scales run without guidance (default 2)."""

    name = "cfg-cutoff"
    stage = 30
    last: int = 2

    def __post_init__(self) -> None:
        if self.last < 1:
            raise InvalidInputError(f"cfg-cutoff: last must be >= 1 (scales without guidance), got {self.last}")

    def apply(self, steps: list[StepPlan], ctx: PlanContext) -> list[StepPlan]:
        if self.last >= ctx.num_scales:
            raise InvalidInputError(
                f"cfg-cutoff: last={self.last} would leave none of the {ctx.num_scales} scales "
                f"guided; allowed 1..{ctx.num_scales - 1}"
            )
        first = ctx.num_scales - self.last
        return [dataclasses.replace(p, guided=False) if si >= first else p for si, p in enumerate(steps)]
