"""The raster (LlamaGen) family in the engine: a request advances one token of each of its rows per iteration
(``state.RasterGeneration``, Flover's setting), or one speculative verification pass (``state.SpeculativeGeneration``)
that fixes one or more tokens; the scheduler sees one unit per token. Events come at each completed row of the token
grid (a preview per token would be hundreds of decoder passes per image), with the rows decoded so far."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from nextscale.engine.family import RequestState, ServingFacts, StepResult, Units, bad_field
from nextscale.engine.kv_cache import KVPool
from nextscale.engine.raster.params import RasterParams
from nextscale.engine.raster.runner import (
    RasterRunner,
    check_tokenizer,
    decode_steps,
    row_preview,
)
from nextscale.engine.raster.speculative import SpeculativePlan
from nextscale.engine.raster.state import RasterGeneration, SpeculativeGeneration, raster_units
from nextscale.errors import InvalidInputError
from nextscale.models.llamagen import LlamaGen
from nextscale.models.tokenizers.raster import RasterTokenizer

RasterState = RasterGeneration | SpeculativeGeneration


def default_sampling() -> dict[str, Any]:
    """The official release's sampling settings, in the API's names (``RasterParams``' defaults)."""
    d = RasterParams()
    return {
        "cfg": d.cfg_scale,
        "cfg_interval": d.cfg_interval,
        "top_k": d.top_k,
        "top_p": d.top_p,
        "temperature": d.temperature,
    }


class RasterFamily:
    name = "raster"

    def __init__(
        self,
        gpt: LlamaGen,
        tokenizer: RasterTokenizer,
        class_names: Sequence[str] = (),
        sampling_defaults: Mapping[str, Any] | None = None,
    ):
        """``tokenizer``: a raster tokenizer (``LlamaGenPipeline.tokenizer``), not the raw VQ module;
        ``class_names`` and ``sampling_defaults`` (the model's recommended settings): the pipeline's."""
        if not isinstance(gpt, LlamaGen):
            raise InvalidInputError(f"a raster engine runs a LlamaGen GPT, got {type(gpt).__name__}")
        if not isinstance(tokenizer, RasterTokenizer):
            raise InvalidInputError(
                f"a raster model needs a raster tokenizer (nextscale.models.tokenizers.raster.make_tokenizer), "
                f"got {type(tokenizer).__name__}"
            )
        check_tokenizer(gpt, tokenizer)
        self.gpt, self.tokenizer = gpt.eval(), tokenizer
        self.device = gpt.output.weight.device
        self.class_names = tuple(class_names)
        self.sampling_defaults = {**default_sampling(), **(sampling_defaults or {})}
        self.runner = RasterRunner(gpt)
        self._pool: KVPool | None = None

    # ---- KV geometry -------------------------------------------------------------------------------------------
    def kv_row_bytes(self) -> int:
        return self.gpt.kv_row_bytes()

    def allocate(self, max_rows: int) -> None:
        self._pool = KVPool.for_model(self.gpt, max_rows)

    @property
    def pool(self) -> KVPool:
        assert self._pool is not None, "allocate() first"
        return self._pool

    # ---- requests ----------------------------------------------------------------------------------------------
    def admit(self, labels_B: torch.Tensor, params: Any, plan: Any) -> tuple[SpeculativePlan | None, Units]:
        if not isinstance(labels_B, torch.Tensor):
            raise InvalidInputError(
                f"a raster model generates from class labels (a tensor), got {type(labels_B).__name__}"
            )
        if not isinstance(params, RasterParams):
            raise InvalidInputError(f"a raster model samples with RasterParams, got {type(params).__name__}")
        if plan is not None and not isinstance(plan, SpeculativePlan):
            raise InvalidInputError(
                f"a raster request runs exact or with a SpeculativePlan, got {type(plan).__name__} (a VAR plan)"
            )
        if labels_B.ndim != 1:
            raise InvalidInputError(f"labels must be a 1-D tensor, got shape {tuple(labels_B.shape)}")
        self.gpt.check_labels(labels_B)
        cfg = self.gpt.cfg
        positions = plan.max_positions(cfg.grid_size, cfg.seq_len) if plan else 1
        rows, tokens, unit_rows = raster_units(params, labels_B.numel(), cfg.seq_len, positions)
        return plan, Units(rows, tokens, unit_rows)

    def start(
        self, labels_B: torch.Tensor, params: Any, plan: Any, generators: Any, start: int, rows: int
    ) -> RasterState:
        slot = self.pool.slot(start, rows)
        if isinstance(plan, SpeculativePlan):
            return SpeculativeGeneration(self.gpt, labels_B, params, plan, generators, slot)
        return RasterGeneration(self.gpt, labels_B, params, generators, slot)

    # ---- one iteration -----------------------------------------------------------------------------------------
    def execute(self, states: Sequence[RequestState]) -> list[StepResult]:
        """One step of each state; ``advanced``: the tokens final in every image of the request this step."""
        raster: list[RasterState] = [s for s in states if isinstance(s, (RasterGeneration, SpeculativeGeneration))]
        assert len(raster) == len(states), "a raster engine runs raster requests only"
        before = [(st.t, st.rows_done) for st in raster]
        self.runner.execute(raster)
        return [
            StepResult(st.t - t0, st.rows_done - 1 if st.rows_done > rows0 else None, st.grid, st.tokens_BL)
            for st, (t0, rows0) in zip(raster, before)
        ]

    def preview(self, state: RequestState, result: StepResult) -> torch.Tensor:
        assert isinstance(state, (RasterGeneration, SpeculativeGeneration))
        return row_preview(self.tokenizer, state.tokens_BL, state.rows_done)

    def decode_steps(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        return decode_steps(self.tokenizer, latent)

    # ---- serving -----------------------------------------------------------------------------------------------
    def serving_facts(self) -> ServingFacts:
        """For a raster model a field the request leaves out takes the model's recommended value (``sampling_defaults``
        over the official release's), not the body's VAR default; ``more_smooth`` is VAR's and refused."""
        cfg = self.gpt.cfg
        d = self.sampling_defaults

        def make_params(given: set[str], v: Mapping[str, Any], seed: int) -> RasterParams:
            if v.get("more_smooth"):
                raise bad_field("more_smooth", "more_smooth is a VAR setting; this is a raster (LlamaGen) model")
            # The body's top_p 0 means "off", which is 1.0 in LlamaGen's convention.
            return RasterParams(
                cfg_scale=v["cfg"] if "cfg" in given else d["cfg"],
                cfg_interval=d["cfg_interval"],
                temperature=d["temperature"],
                top_k=v["top_k"] if "top_k" in given else d["top_k"],
                top_p=(v["top_p"] or 1.0) if "top_p" in given else d["top_p"],
                seed=seed,
            )

        def warmup() -> RasterParams:
            return RasterParams.from_settings(d, seed=0)

        return ServingFacts(
            family=self.name,
            step_unit="row",
            image_size=cfg.image_size,
            num_classes=cfg.num_classes,
            vocab_size=cfg.vocab_size,
            steps=cfg.grid_size,  # one preview per completed row of the token grid
            class_names=self.class_names,
            make_params=make_params,
            warmup=warmup,
        )
