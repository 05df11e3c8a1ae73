"""What every family's sampling parameters share: a seed, an RNG mode and the per-image generators they give.

``SamplingParams`` (VAR, ``engine/var/params.py``) and ``RasterParams`` (LlamaGen, ``engine/raster/params.py``)
derive from ``SeededParams``; their guidance and filter settings differ in meaning and stay their own. The base's
fields are keyword-only, so each family's own fields keep their positional order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from nextscale.engine.sampling import Generators, request_generators
from nextscale.errors import InvalidInputError

RngMode = Literal["per_image", "official"]
RNG_MODES: tuple[str, ...] = ("per_image", "official")


@dataclass(frozen=True, kw_only=True)
class SeededParams:
    """``seed``: the request's seed (None: not chosen yet; sampling needs one). ``rng="per_image"`` gives image i
    of a request its own generator seeded from (seed, i), so it does not depend on the batch; ``"official"`` draws
    the whole batch from one generator seeded with ``seed``, as the official code does on the CPU."""

    seed: int | None = None
    rng: RngMode = "per_image"

    def __post_init__(self) -> None:
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise InvalidInputError(f"seed must be an int in [0, 2**63) or None, got {self.seed!r}")
        if self.rng not in RNG_MODES:
            raise InvalidInputError(f"rng must be 'per_image' or 'official', got {self.rng!r}")

    def generators(
        self, count: int, device: torch.device | str = "cpu", start: int = 0, indices: Sequence[int] | None = None
    ) -> Generators:
        """This request's random streams: images ``start .. start+count-1`` (or ``indices``) of ``seed``."""
        if self.seed is None:
            raise InvalidInputError(f"sampling needs a seed ({type(self).__name__}(seed=...))")
        return request_generators(self.seed, self.rng, count, device, start, indices)

    def as_settings(self) -> dict[str, Any]:
        """These parameters as their pipeline's call keywords (and a model folder's ``sampling_defaults``) name
        them: ``pipe(labels, **params.as_settings())`` samples with them. Default: the field names."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
