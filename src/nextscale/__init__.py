"""nextscale: sample, serve, accelerate, train and evaluate VAR (next-scale prediction) image generators, raster-order
(LlamaGen) ones, and text-to-image next-scale ones (Infinity).

Public API: ``VARPipeline`` (load official or native weights, sample, edit, save), ``LlamaGenPipeline`` (the same
for LlamaGen c2i models), ``InfinityPipeline`` (prompts in: Infinity), ``SamplingParams``, ``VARConfig`` /
``VQVAEConfig``. Importing the package has no side
effects beyond importing torch lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "VARPipeline": "nextscale.pipelines.var",
    "VAROutput": "nextscale.pipelines.var",
    "LlamaGenPipeline": "nextscale.pipelines.raster",
    "LlamaGenOutput": "nextscale.pipelines.raster",
    "InfinityPipeline": "nextscale.pipelines.infinity",
    "InfinityOutput": "nextscale.pipelines.infinity",
    "SamplingParams": "nextscale.engine.var.params",
    "VARConfig": "nextscale.config",
    "VQVAEConfig": "nextscale.config",
}

if TYPE_CHECKING:
    from nextscale.config import VARConfig, VQVAEConfig
    from nextscale.engine.var.params import SamplingParams
    from nextscale.pipelines.infinity import InfinityOutput, InfinityPipeline
    from nextscale.pipelines.raster import LlamaGenOutput, LlamaGenPipeline
    from nextscale.pipelines.var import VAROutput, VARPipeline

__all__ = [
    "InfinityOutput",
    "InfinityPipeline",
    "LlamaGenOutput",
    "LlamaGenPipeline",
    "SamplingParams",
    "VARConfig",
    "VAROutput",
    "VARPipeline",
    "VQVAEConfig",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nextscale' has no attribute {name!r}")
