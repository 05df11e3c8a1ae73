"""Batch jobs that drive a pipeline over many images for evaluation: class-balanced FID sample sets
(``sample_set.py``), the class-conditional quality report (``quality.py``) and acceleration tuning (``tune.py``).
They sit above the pipelines and ``eval/``, which therefore never import the pipelines.

The sample sets and the quality report drive any family's pipeline through what every pipeline has
(``SamplingPipeline``); tuning is per family (VAR's acceleration plug-ins, raster speculative decoding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class SamplingPipeline(Protocol):
    """What a job needs of a pipeline (``VARPipeline`` and ``LlamaGenPipeline`` are ones): its number of classes,
    the call keywords of one of its params objects, and a call that returns ``.images``."""

    @property
    def num_classes(self) -> int: ...

    def call_kwargs(self, params: Any) -> dict[str, Any]: ...

    def __call__(
        self, class_labels: Any, *, output_type: Any = ..., image_indices: Sequence[int] | None = ..., **kwargs: Any
    ) -> Any: ...


__all__ = ["SamplingPipeline"]
