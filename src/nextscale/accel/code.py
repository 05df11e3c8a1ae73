"""``code``: CoDe collaborative decoding (Chen et al., CVPR 2025) — a large drafter runs the first scales, a small
refiner the rest.

The early scales fix the content and need capacity; the late ones add high-frequency detail and tolerate a small
model. The drafter (the pipeline's transformer) runs scales ``0..draft-1``, then its KV cache is dropped and the
refiner — a smaller VAR on the same tokenizer — recomputes the prefix from the drafter's latents in one pass with
the block-causal mask (its own embeddings, filling its own cache), samples scale ``draft`` from that pass and runs
the remaining scales. Training-free with any two models sharing a tokenizer; CoDe's fine-tuned pairs are better
(README: the recipe to fine-tune a refiner with ``nextscale train --init-from``). Lossy: the refiner's scales are
a smaller model's; the benchmark reports where CoDe lands between the drafter alone and the refiner alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nextscale.accel.base import Accel, PlanContext, register
from nextscale.engine.var.plan import REFINER, StepPlan
from nextscale.errors import InvalidInputError


@register
@dataclass(frozen=True)
class CoDe(Accel):
    """``draft``: scales the drafter runs (default: all but the last two, 8 of VAR's 10; negative: all but the last
    ``-draft``, so ``draft=-3`` leaves the refiner three scales on any schedule); ``refiner``: a model
    folder or hub id whose transformer is the refiner (default: the one the model folder names in its
    ``model_index.json``)."""

    name = "code"
    stage = 10
    draft: int | None = None
    refiner: str = ""

    def apply(self, steps: list[StepPlan], ctx: PlanContext) -> list[StepPlan]:
        if ctx.refiner_depth is None:
            raise InvalidInputError(
                "code needs a refiner: this model names none in its model_index.json; pass code:refiner=DIR_OR_HUB_ID"
            )
        draft = -2 if self.draft is None else self.draft
        if draft < 0:
            draft += ctx.num_scales
        if not 1 <= draft < ctx.num_scales:
            raise InvalidInputError(
                f"code: draft={self.draft}; allowed 1..{ctx.num_scales - 1} scales on the drafter (or -1..-"
                f"{ctx.num_scales - 1}: all but that many)"
            )
        return [dataclasses.replace(p, model=REFINER) if si >= draft else p for si, p in enumerate(steps)]
