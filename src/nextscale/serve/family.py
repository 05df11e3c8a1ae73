"""What the HTTP edge needs of the served model, per family: its facts (``/v1/models``, validation, previews) and how
a request body becomes the engine's sampling parameters.

One API for both families: ``cfg``, ``top_k`` and ``top_p`` are each family's own settings, ``0`` turns a filter
off in both. For a raster (LlamaGen) model a field the request leaves out takes the model's recommended value
(``LlamaGenPipeline.sampling_defaults``: cfg 4.0, top-k 2000 for the official release) rather than the body's VAR
default; ``more_smooth`` is VAR's and refused. ``quality`` picks a plan in both families (``serve.config``): VAR's
acceleration presets, or a raster model's speculative decoding (high: exact; medium: SJD; low: the lossy preset).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from nextscale.engine.engine import Engine
from nextscale.engine.raster.sampler import RasterParams
from nextscale.engine.var.params import SamplingParams
from nextscale.errors import InvalidInputError
from nextscale.pipelines.raster import DEFAULT_SAMPLING
from nextscale.serve.protocol import ImageGenerationRequest

Params = SamplingParams | RasterParams


def bad_field(param: str, message: str) -> InvalidInputError:
    e = InvalidInputError(message)
    e.param = param  # type: ignore[attr-defined]
    return e


class ServedModel(ABC):
    """The served model's facts. ``steps``: events per request, each with a preview — VAR's scales, or the rows of a
    raster model's token grid; ``step_unit`` names them ("scale", "row") for the playground and clients."""

    family: str
    step_unit: str
    image_size: int
    num_classes: int
    vocab_size: int
    steps: int
    class_names: tuple[str, ...]

    @abstractmethod
    def params(self, body: ImageGenerationRequest, seed: int) -> Params:
        """The engine's sampling parameters for a valid body (``bad_field`` names what is not allowed)."""

    @abstractmethod
    def warmup_params(self) -> Params:
        """Settings for the one tiny generation that runs before the server says it is ready."""


class VARServed(ServedModel):
    family, step_unit = "var", "scale"

    def __init__(self, engine: Engine):
        var = engine.var
        self.image_size = engine.vae.cfg.image_size
        self.num_classes, self.vocab_size, self.steps = var.num_classes, var.V, len(var.cfg.patch_nums)
        self.class_names = tuple(var.cfg.class_names or ())

    def params(self, body: ImageGenerationRequest, seed: int) -> Params:
        return SamplingParams(cfg=body.cfg, top_k=body.top_k, top_p=body.top_p, more_smooth=body.more_smooth, seed=seed)

    def warmup_params(self) -> Params:
        return SamplingParams(seed=0)


class RasterServed(ServedModel):
    family, step_unit = "raster", "row"

    def __init__(
        self, engine: Engine, class_names: Sequence[str] = (), sampling_defaults: Mapping[str, Any] | None = None
    ):
        cfg = engine.gpt.cfg
        self.image_size, self.num_classes, self.vocab_size = cfg.image_size, cfg.num_classes, cfg.vocab_size
        self.steps = cfg.grid_size  # one preview per completed row of the token grid
        self.class_names = tuple(class_names)
        self.defaults = {**DEFAULT_SAMPLING, **(sampling_defaults or {})}

    def params(self, body: ImageGenerationRequest, seed: int) -> Params:
        if body.more_smooth:
            raise bad_field("more_smooth", "more_smooth is a VAR setting; this is a raster (LlamaGen) model")
        given, d = body.model_fields_set, self.defaults
        # The body's top_p 0 means "off", which is 1.0 in LlamaGen's convention.
        top_p = (body.top_p or 1.0) if "top_p" in given else d["top_p"]
        return RasterParams(
            cfg_scale=body.cfg if "cfg" in given else d["cfg"],
            cfg_interval=d["cfg_interval"],
            temperature=d["temperature"],
            top_k=body.top_k if "top_k" in given else d["top_k"],
            top_p=top_p,
            seed=seed,
        )

    def warmup_params(self) -> Params:
        d = self.defaults
        return RasterParams(
            cfg_scale=d["cfg"],
            cfg_interval=d["cfg_interval"],
            temperature=d["temperature"],
            top_k=d["top_k"],
            top_p=d["top_p"],
            seed=0,
        )


def served_model(
    engine: Engine, class_names: Sequence[str] | None = None, sampling_defaults: Mapping[str, Any] | None = None
) -> ServedModel:
    """The served model of ``engine``'s family. ``class_names`` and ``sampling_defaults`` (a raster pipeline's; a
    VAR model carries its own names) come from the pipeline the engine was built from."""
    if engine.raster is not None:
        return RasterServed(engine, class_names or (), sampling_defaults)
    if sampling_defaults:
        raise InvalidInputError("sampling_defaults are a raster model's; a VAR request states its own settings")
    served = VARServed(engine)
    if class_names:
        served.class_names = tuple(class_names)
    return served
