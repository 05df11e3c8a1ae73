"""HTTP request/response schemas (pydantic lives only here, at the edge).

OpenAI-shaped ``POST /v1/images/generations`` with the sampling fields as extensions (``ServingFacts`` says what
they mean for a raster or text-to-image model, where a field left out takes the model's recommended value).
``prompt`` is the text of a text-to-image model; for a class-conditional one it carries a class name (or index), with
``class_label`` as the explicit alternative. Unknown fields are rejected so a typo
(``top-k``, ``guidance``) is a 422 naming it rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nextscale.config import MAX_CFG


class ImageGenerationRequest(BaseModel):
    # NaN and Infinity are valid JSON to Python's parser; rejecting them here names the field (the bounds
    # checks would call NaN "not <= 100").
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # T5 reads at most 512 tokens (the text encoder truncates with a warning); this bounds the body, not the tokens
    prompt: str | None = Field(None, max_length=4000, description="the text, or a class name (or index) of the model")
    class_label: int | str | None = Field(None, description="class index or name; alternative to prompt")
    n: int = Field(1, ge=1, description="number of images")
    seed: int | None = Field(None, ge=0, lt=2**63, description="image i uses a generator from (seed, i)")
    cfg: float = Field(1.5, ge=0.0, le=MAX_CFG, description="guidance: VAR's (0 = none), a raster model's cfg_scale")
    top_k: int = Field(0, ge=0, description="top-k filter, 0 = off")
    top_p: float = Field(0.0, ge=0.0, le=1.0, description="top-p filter, 0 = off")
    more_smooth: bool = False
    negative_prompt: str | None = Field(None, max_length=4000, description="text-to-image: replaces the null text")
    tau: float | None = Field(None, ge=1e-3, le=100.0, description="text-to-image: temperature of the bit logits")
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png"] = "png"
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, description="previews to stream (default: every scale)")
    model: str | None = None
    size: str | None = Field(None, pattern=r"^\d+x\d+$")
    quality: Literal["auto", "high", "medium", "low"] = Field(
        "auto", description="high = exact, medium = balanced, low = fast acceleration preset; auto = server default"
    )
    user: str | None = None

    @model_validator(mode="after")
    def _one_class(self) -> ImageGenerationRequest:
        if self.prompt is None and self.class_label is None:
            raise ValueError("give `prompt` (the text, or a class name) or `class_label`")
        if self.prompt is not None and self.class_label is not None:
            raise ValueError("give either `prompt` or `class_label`, not both")
        return self

    @property
    def label(self) -> int | str:
        if self.class_label is not None:
            return self.class_label
        assert self.prompt is not None
        return self.prompt


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str
    seed: int


class Usage(BaseModel):
    images: int
    tokens: int


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
