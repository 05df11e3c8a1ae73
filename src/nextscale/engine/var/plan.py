"""The per-scale plan: the one place where acceleration methods change how a request runs a scale.

A request's ``RequestPlan`` holds one frozen ``StepPlan`` per scale: which transformer runs it, whether the
unconditional (guidance) rows run, whether the scale is skipped, and a per-block hook for methods that change
what the blocks compute (token pruning). The plug-ins in ``nextscale.accel`` *produce* plans; ``Generation``
(both the pipeline's loop and the engine), the runner and the scheduler *consume* them, and never import a
method. With every step at its default (``EXACT``) sampling is bit-identical to the plain loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from nextscale.engine.sampling import cfg_rows
from nextscale.errors import InvalidInputError

if TYPE_CHECKING:
    from nextscale.models.attention import DenseRows

MAIN, REFINER = "transformer", "refiner"


@dataclass
class HookContext:
    """What a block hook may know and keep about its request: the scale, its token map's (h, w), and a scratch dict
    that lives as long as the request (e.g. block outputs cached at one scale and reused at a later one)."""

    si: int
    grid: tuple[int, int]
    scratch: dict[Any, Any]
    prefill: int = 0  # tokens before this scale's own in ``x`` (a refiner's prefix pass)


class BlockHook(Protocol):
    """Replaces ``x = block(x, mod, layout)`` for one block of one step (dense rows [R, l, C] only). A hook that runs
    the block on a subset of each row's tokens passes ``layout.kept(idx_Rk)``: the layout of those positions (RoPE
    rows in Infinity; VAR's positions are in ``x`` already)."""

    def __call__(
        self,
        ctx: HookContext,
        layer: int,
        block: Callable[..., torch.Tensor],
        x: torch.Tensor,
        mod: torch.Tensor,
        layout: DenseRows,
    ) -> torch.Tensor: ...


class KVSelector(Protocol):
    """Which cached positions a layer keeps after a scale (KV-cache compression: ScaleKV, HACK).

    ``q_RHlc`` are this call's queries, ``k_RHnc`` every key they attended to (the kept history, then this
    call's own ``l`` keys); returns ``keep`` positions per row and head [R, H, keep], ascending."""

    def __call__(
        self, layer: int, si: int, pn: int, q_RHlc: torch.Tensor, k_RHnc: torch.Tensor, scale: float, keep: int
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepPlan:
    """How one request runs one scale."""

    model: str = MAIN  # which transformer runs this scale: MAIN, or REFINER (collaborative decoding)
    guided: bool = True  # the unconditional rows run and guidance mixes the logits; False: conditional rows only
    skip: bool = False  # no transformer step and no tokens: the running latent is carried to the next scale
    hook: BlockHook | None = None  # per-block change of the computation
    tokens_fraction: float = 1.0  # share of this scale's token-layer work the hook computes (for costing)
    # KV-cache compression: per layer, the most positions its cache keeps after this scale (None: keep all);
    # when history + this scale's keys exceed it, ``kv_select`` picks which. 0 stores nothing (the last scale).
    kv_keep: tuple[int, ...] | None = None
    kv_select: KVSelector | None = None

    @property
    def branches(self) -> int:
        return cfg_rows(1) if self.guided else 1


EXACT = StepPlan()


@dataclass(frozen=True)
class RequestPlan:
    """One ``StepPlan`` per scale, validated once when a request starts."""

    steps: tuple[StepPlan, ...]
    names: tuple[str, ...] = ()  # the plug-ins that made it (reported in stats and logs)

    def __post_init__(self) -> None:
        steps = self.steps
        if not steps:
            raise InvalidInputError("a plan needs at least one scale")
        if steps[0].skip:
            raise InvalidInputError("the first scale cannot be skipped")
        guided = [p.guided for p in steps if not p.skip]
        if any(b and not a for a, b in itertools.pairwise(guided)):
            # The unconditional rows' KV cache is not written at unguided scales, so guidance cannot resume.
            raise InvalidInputError("guidance cannot be switched back on after an unguided scale")
        models = [p.model for p in steps if not p.skip]
        if any(a == REFINER and b == MAIN for a, b in itertools.pairwise(models)):
            raise InvalidInputError("the refiner hands no scale back to the main transformer")

    @classmethod
    def exact(cls, num_scales: int) -> RequestPlan:
        return cls((EXACT,) * num_scales)

    @property
    def is_exact(self) -> bool:
        return all(p == EXACT for p in self.steps)

    @property
    def uses_refiner(self) -> bool:
        return any(p.model == REFINER and not p.skip for p in self.steps)

    @property
    def run_scales(self) -> list[int]:
        """The scales a transformer runs (the engine's units), in order."""
        return [si for si, p in enumerate(self.steps) if not p.skip]

    def rows(self, si: int, num_images: int) -> int:
        return self.steps[si].branches * num_images

    def kv_rows(self, num_images: int) -> int:
        """Rows a KV cache needs: both guidance rows if any scale is guided."""
        return max(self.rows(si, num_images) for si in self.run_scales)

    @property
    def compresses_kv(self) -> bool:
        return any(p.kv_keep is not None for p in self.steps if not p.skip)

    def kv_capacity(self, scale_tokens: Sequence[int], depth: int) -> tuple[int, ...]:
        """Per layer, the most positions its cache holds at once (after any compression), given the tokens of
        every scale: what a compressed cache must allocate. Uncompressed: the whole sequence in every layer."""
        if not self.compresses_kv:
            return (sum(scale_tokens),) * depth
        caps = []
        for layer in range(depth):
            n = cap = 0
            for si in self.run_scales:
                keep = self.steps[si].kv_keep
                n += scale_tokens[si]
                if keep is not None and n > keep[layer]:
                    n = keep[layer]
                cap = max(cap, n)
            caps.append(cap)
        return tuple(caps)


__all__ = ["EXACT", "MAIN", "REFINER", "BlockHook", "HookContext", "KVSelector", "RequestPlan", "StepPlan"]
