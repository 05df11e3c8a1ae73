"""The VAR family in the engine: a request advances one scale per iteration (``state.Generation``), scheduled
requests run as one fused transformer call (``runner.ModelRunner``), previews and the final decode come from the
multi-scale VQ-VAE's latent f_hat. A CoDe refiner's KV pool mirrors the transformer's rows (a request holds the
same rows in both), so the engine's one row allocator serves both."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from nextscale.engine.family import RequestState, ServingFacts, StepResult, Units
from nextscale.engine.kv_cache import CompactKV, KVPool, compact_rows
from nextscale.engine.var.params import SamplingParams
from nextscale.engine.var.plan import RequestPlan
from nextscale.engine.var.runner import ModelRunner
from nextscale.engine.var.state import Generation
from nextscale.errors import InvalidInputError
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR, check_refiner


class VARFamily:
    name = "var"

    def __init__(self, var: VAR, vae: VQVAE, refiner: VAR | None = None, class_names: Sequence[str] | None = None):
        """``class_names``: the pipeline's (default: the transformer config's) — what the server lists and accepts."""
        if not isinstance(var, VAR):
            raise InvalidInputError(f"a VAR engine runs a VAR transformer, got {type(var).__name__}")
        if not isinstance(vae, VQVAE):
            raise InvalidInputError(f"a VAR model decodes with its multi-scale VQVAE, got {type(vae).__name__}")
        self.var, self.vae = var.eval(), vae.eval()
        self.refiner = None if refiner is None else check_refiner(var, refiner).eval()
        self.device = var.head.weight.device
        self.class_names = tuple(class_names or var.cfg.class_names or ())
        self.runner = ModelRunner(var)
        self._pool: KVPool | None = None
        self.refiner_pool: KVPool | None = None

    # ---- KV geometry -------------------------------------------------------------------------------------------
    def kv_row_bytes(self) -> int:
        return sum(m.kv_row_bytes() for m in (self.var, self.refiner) if m is not None)

    def allocate(self, max_rows: int) -> None:
        self._pool = KVPool.for_model(self.var, max_rows)
        self.refiner_pool = None if self.refiner is None else KVPool.for_model(self.refiner, max_rows)

    @property
    def pool(self) -> KVPool:
        assert self._pool is not None, "allocate() first"
        return self._pool

    # ---- requests ----------------------------------------------------------------------------------------------
    def admit(self, labels_B: torch.Tensor, params: Any, plan: Any) -> tuple[RequestPlan, Units]:
        if not isinstance(labels_B, torch.Tensor):
            raise InvalidInputError(
                f"a VAR model generates from class labels (a tensor), got {type(labels_B).__name__}"
            )
        if not isinstance(params, SamplingParams):
            raise InvalidInputError(f"a VAR model samples with SamplingParams, got {type(params).__name__}")
        if plan is not None and not isinstance(plan, RequestPlan):
            raise InvalidInputError(
                f"a VAR request runs exact or with a RequestPlan (nextscale.accel), got {type(plan).__name__}"
            )
        n = labels_B.numel()
        params.check_vocab(self.var.V)
        self.var.check_labels(labels_B)
        plan = plan or RequestPlan.exact(self.var.scales.num_scales)
        if len(plan.steps) != self.var.scales.num_scales:
            raise InvalidInputError(f"plan has {len(plan.steps)} steps for {self.var.scales.num_scales} scales")
        if plan.uses_refiner and self.refiner is None:
            raise InvalidInputError("the plan hands scales to a refiner (code), but this engine was built without one")
        # One scheduler unit per scale a transformer runs; its cost is rows x the tokens its plan computes (a
        # hand-off scale recomputes every earlier scale on the new model: CoDe's prefix pass).
        run = plan.run_scales
        ends = self.var.scales.begin_ends
        tokens = tuple(
            ends[si][1]
            if k and plan.steps[run[k - 1]].model != plan.steps[si].model
            else math.ceil((ends[si][1] - ends[si][0]) * plan.steps[si].tokens_fraction)
            for k, si in enumerate(run)
        )
        # A compressed cache (scalekv, hack) packs its short per-layer caches into fewer pool rows.
        return plan, Units(self._pool_rows(plan, n), tokens, tuple(plan.rows(si, n) for si in run))

    def _pool_rows(self, plan: RequestPlan, num_images: int) -> int:
        rows = plan.kv_rows(num_images)
        if not plan.compresses_kv:
            return rows
        return compact_rows(rows, self._kv_caps(plan), self.var.scales.seq_len)

    def _kv_caps(self, plan: RequestPlan) -> tuple[int, ...]:
        return plan.kv_capacity(self.var.scales.token_counts(), self.var.depth)

    def start(
        self, labels_B: torch.Tensor, params: Any, plan: Any, generators: Any, start: int, rows: int
    ) -> Generation:
        slot = self.pool.slot(start, rows)
        kv = CompactKV(slot, plan.kv_rows(labels_B.numel()), self._kv_caps(plan)) if plan.compresses_kv else slot
        refiner_pool = self.refiner_pool
        return Generation(
            self.var,
            self.vae.quantize,
            labels_B,
            params,
            generators,
            kv=kv,
            lvl_pos_1LC=self.runner.lvl_pos,
            plan=plan,
            refiner=self.refiner,
            refiner_kv=lambda _model, n: refiner_pool.slot(start, n),  # type: ignore[union-attr]
        )

    # ---- one iteration -----------------------------------------------------------------------------------------
    def execute(self, states: Sequence[RequestState]) -> list[StepResult]:
        gens = [s for s in states if isinstance(s, Generation)]
        assert len(gens) == len(states), "a VAR engine runs VAR requests only"
        return [StepResult(1, r.si, r.num_scales, r.f_hat_BChw) for r in self.runner.execute(gens)]

    def preview(self, state: RequestState, result: StepResult) -> torch.Tensor:
        assert result.latent is not None
        return self.vae.decode_images(result.latent)

    def decode_steps(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        return self.vae.fhat_to_img_steps(latent)

    # ---- serving -----------------------------------------------------------------------------------------------
    def serving_facts(self) -> ServingFacts:
        var = self.var

        def make_params(given: set[str], v: dict[str, Any], seed: int) -> SamplingParams:
            return SamplingParams(
                cfg=v["cfg"], top_k=v["top_k"], top_p=v["top_p"], more_smooth=v["more_smooth"], seed=seed
            )

        return ServingFacts(
            family=self.name,
            step_unit="scale",
            image_size=self.vae.cfg.image_size,
            num_classes=var.num_classes,
            vocab_size=var.V,
            steps=len(var.cfg.patch_nums),
            class_names=self.class_names,
            make_params=make_params,
            warmup=lambda: SamplingParams(seed=0),
        )
