"""The default (fast) sampling loop for one batch of images.

"The same thing as the reference, batched": a preallocated KV cache instead of concatenation, the class
conditioning (every block's AdaLN vectors) computed once instead of once per scale, and the level/position
embedding sum computed once. In float32 it produces the reference's tokens exactly (tested). A ``RequestPlan``
from the acceleration plug-ins (``nextscale.accel``) changes how each scale runs; none means the exact loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nextscale.engine.sampling import Generators
from nextscale.engine.var.params import ForcedTokens, SamplingParams
from nextscale.engine.var.plan import RequestPlan
from nextscale.engine.var.state import Generation, SampleResult, ScaleResult
from nextscale.models.tokenizers.msvq import MultiScaleQuantizer
from nextscale.models.var import VAR

ScaleCallback = Callable[[ScaleResult], None]


@torch.no_grad()
def sample_tokens_batch(
    var: VAR,
    quantizer: MultiScaleQuantizer,
    labels_B: torch.Tensor,
    params: SamplingParams,
    generators: Generators,
    forced: ForcedTokens | None = None,
    on_scale: ScaleCallback | None = None,
    plan: RequestPlan | None = None,
    refiner: VAR | None = None,
) -> SampleResult:
    """Run all scales for ``labels_B`` as ``plan`` says (exact by default): tokens, final latent, inputs, stats."""
    state = Generation(var, quantizer, labels_B, params, generators, forced=forced, plan=plan, refiner=refiner)
    try:
        while not state.done:
            logits_RlV = state.model.forward_tokens(state.x, state.cond, state.layout(), state.block_fn())
            result = state.advance(logits_RlV)
            if on_scale is not None:
                on_scale(result)
    finally:
        state.release()
    return state.result()
