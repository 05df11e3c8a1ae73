"""The Infinity family in the engine: a request is an ``InfinityCondition`` (its prompts, an optional negative prompt
and its scale schedule), advances one scale per iteration through the per-scale step the pipeline also runs
(``state.InfinityGeneration``), holds 2B rows of one KV pool when guided (B otherwise), and decodes from the BSQ
tokenizer's summed codes.

Requests join at any scale and may differ in size (template) and pixel budget: the pool's rows are as long as the
longest schedule the server accepts. Per-request text keys/values (cross-attention) are computed once when a request
starts and live with the request, not in the pool: they are a few hundred tokens, not the 10k positions of a
1024 px self-attention cache. The T5 encoder runs when a request starts, in the engine's thread (one call for its
prompts). Each scheduled request runs its own transformer call this iteration: requests at different scales, sizes
and text lengths share no shapes, and the official numbers depend on each request's packing (the cross-attention's
bf16 rounding), so fusing calls would trade exactness for speed.

A request's plan (``admit``'s ``plan``) is a ``RequestPlan`` of its schedule's scales, or a ``SchedulePlans`` (what the
pipeline's ``quality_plans`` gives: one plan per schedule, since KV budgets follow the token counts); the scheduler's
units are the scales the plan runs, each with the rows it runs (fewer after a cfg-cutoff), and a compressed cache
(scalekv, hack) takes the pool rows its packed per-layer caches need.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nextscale.engine.family import RequestState, ServingFacts, StepResult, Units, bad_field
from nextscale.engine.infinity.params import InfinityParams
from nextscale.engine.infinity.state import (
    InfinityGeneration,
    SchedulePlans,
    check_plan,
    check_request,
    kv_capacities,
    plan_units,
    request_rows,
)
from nextscale.engine.kv_cache import CompactKV, KVPool, KVSlot, compact_rows
from nextscale.engine.var.plan import RequestPlan
from nextscale.errors import InvalidInputError
from nextscale.models.infinity import Infinity
from nextscale.models.infinity_scales import (
    H_DIV_W_TEMPLATES,
    PN_SCALES,
    InfinitySchedule,
    parse_size,
    schedule,
    template_sizes,
)
from nextscale.models.text_encoder import TextEncoder
from nextscale.models.tokenizers.bsq import BSQVAE


@dataclass(frozen=True)
class InfinityCondition:
    """What an Infinity request generates from: one prompt per image, an optional negative prompt for all of them,
    and the scale schedule (size template and pixel budget)."""

    prompts: tuple[str, ...]
    schedule: InfinitySchedule
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise InvalidInputError("an Infinity request needs at least one prompt")
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str) or not p.strip():
                raise InvalidInputError(f"prompt {i} must be a non-empty string, got {p!r}")
        if self.negative_prompt is not None and not self.negative_prompt.strip():
            raise InvalidInputError("negative_prompt must be a non-empty string or None")

    def __len__(self) -> int:
        return len(self.prompts)


class InfinityFamily:
    name = "infinity"

    def __init__(
        self,
        model: Infinity,
        vae: BSQVAE,
        text_encoder: TextEncoder,
        sampling_defaults: Mapping[str, Any],
        pns: Sequence[str] | None = None,
    ):
        """``sampling_defaults``: the pipeline's (cfg, tau, top_k, top_p, pn): what a request's missing fields take.
        ``pns``: the pixel budgets served (default: the model's own); the pool's rows fit the longest schedule."""
        if not isinstance(model, Infinity) or not isinstance(vae, BSQVAE):
            raise InvalidInputError(
                f"an Infinity engine runs an Infinity transformer with its BSQVAE, got {type(model).__name__} and "
                f"{type(vae).__name__}"
            )
        self.model, self.vae, self.text_encoder = model.eval(), vae.eval(), text_encoder
        self.defaults = dict(sampling_defaults)
        self.pns = tuple(pns or (self.defaults["pn"],))
        for pn in self.pns:
            if pn not in PN_SCALES:
                raise InvalidInputError(f"pn must be one of {', '.join(PN_SCALES)}, got {pn!r}")
        self.device = model.head.weight.device
        self.max_len = max(schedule(t, pn).seq_len for t in H_DIV_W_TEMPLATES for pn in self.pns)
        self._pool: KVPool | None = None

    # ---- KV geometry -------------------------------------------------------------------------------------------
    def kv_row_bytes(self) -> int:
        return int(self.model.kv_row_bytes(self.max_len))

    def allocate(self, max_rows: int) -> None:
        m, w = self.model, self.model.head.weight
        self._pool = KVPool(m.depth, max_rows, m.cfg.num_heads, m.cfg.head_dim, self.max_len, w.dtype, w.device)

    @property
    def pool(self) -> KVPool:
        assert self._pool is not None, "allocate() first"
        return self._pool

    # ---- requests ----------------------------------------------------------------------------------------------
    def admit(self, condition: Any, params: Any, plan: Any) -> tuple[RequestPlan | None, Units]:
        if not isinstance(condition, InfinityCondition):
            raise InvalidInputError(
                f"an Infinity model generates from an InfinityCondition (prompts and a schedule), got "
                f"{type(condition).__name__}"
            )
        if not isinstance(params, InfinityParams):
            raise InvalidInputError(f"an Infinity model samples with InfinityParams, got {type(params).__name__}")
        if plan is not None and not isinstance(plan, (RequestPlan, SchedulePlans)):
            raise InvalidInputError(
                f"an Infinity request runs exact or with a RequestPlan (nextscale.accel), got {type(plan).__name__}"
            )
        sched = condition.schedule
        if sched.pn not in self.pns:
            raise InvalidInputError(f"pn {sched.pn!r} is not served here; allowed: {', '.join(self.pns)}")
        check_request(self.model, self.vae, sched, params)
        if isinstance(plan, SchedulePlans):
            plan = plan.for_schedule(sched)
        check_plan(plan, sched)
        n = len(condition)
        rows = request_rows(params, sched, n, plan)
        tokens, unit_rows = plan_units(plan, params, sched, n)
        if plan is None or plan.is_exact:
            return plan, Units(rows, tokens)
        if plan.compresses_kv:  # the packed per-layer caches of a compressed request (scalekv, hack)
            rows = compact_rows(rows, kv_capacities(plan, sched, self.model.depth), self.max_len)
        return plan, Units(rows, tokens, unit_rows)

    def start(
        self, condition: Any, params: Any, plan: Any, generators: Any, start: int, rows: int
    ) -> InfinityGeneration:
        prompts = list(condition.prompts)
        negative = condition.negative_prompt
        feats = self.text_encoder.encode(prompts + ([negative] if negative is not None else []))
        feats = type(feats)(feats.kv_compact.to(self.device), feats.lens)
        B = len(prompts)
        text = feats.select(range(B))
        neg = None if negative is None else feats.select([B] * B)
        sched = condition.schedule
        slot = self.pool.slot(start, rows)
        kv: KVSlot | CompactKV = slot
        if plan is not None and plan.compresses_kv:
            kv = CompactKV(slot, request_rows(params, sched, B, plan), kv_capacities(plan, sched, self.model.depth))
        return InfinityGeneration(
            self.model, self.vae, text, sched, params, generators, kv, neg, release=slot.free, plan=plan
        )

    # ---- one iteration -----------------------------------------------------------------------------------------
    def execute(self, states: Sequence[RequestState]) -> list[StepResult]:
        out = []
        for st in states:
            assert isinstance(st, InfinityGeneration), "an Infinity engine runs Infinity requests only"
            res = st.step()
            # the request's running latent is updated in place by its next step: the event keeps a copy
            out.append(StepResult(1, res.si, st.num_scales, res.summed_codes.clone()))
        return out

    def preview(self, state: RequestState, result: StepResult) -> torch.Tensor:
        assert result.latent is not None
        return self.vae.decode(result.latent.squeeze(-3)).add(1).mul_(0.5).clamp_(0, 1)

    def decode_steps(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        yield self.vae.decode(latent.squeeze(-3))

    # ---- serving -----------------------------------------------------------------------------------------------
    def sizes(self, pn: str) -> dict[str, InfinitySchedule]:
        """'WIDTHxHEIGHT' -> schedule, for every template at ``pn``."""
        return template_sizes(pn, self.vae.cfg.token_stride)

    def serving_facts(self) -> ServingFacts:
        """A field the request leaves out takes the model's recommended value (``sampling_defaults``: cfg 3, tau 0.5,
        top_k 900, top_p 0.97 officially); ``size`` is one of the templates at the model's pixel budget (default: the
        model's default size, else square)."""
        d, pn = self.defaults, self.pns[0]
        sizes = self.sizes(pn)
        h_div_w = 1.0 if d.get("size") is None else parse_size(d["size"])[0]
        square = schedule(h_div_w, pn, self.vae.cfg.token_stride)

        def make_params(given: set[str], v: Mapping[str, Any], seed: int) -> InfinityParams:
            if v.get("more_smooth"):
                raise bad_field("more_smooth", "more_smooth is a VAR setting; this is a text-to-image model")
            try:
                return InfinityParams(
                    cfg=v["cfg"] if "cfg" in given else d["cfg"],
                    tau=v["tau"] if v.get("tau") is not None else d["tau"],
                    top_k=v["top_k"] if "top_k" in given else d["top_k"],
                    top_p=v["top_p"] if "top_p" in given else d["top_p"],
                    seed=seed,
                )
            except InvalidInputError as e:
                raise bad_field("cfg", str(e)) from None

        def make_condition(v: Mapping[str, Any], n: int) -> tuple[InfinityCondition, str]:
            if v.get("class_label") is not None:
                raise bad_field("class_label", "this is a text-to-image model: give the text as `prompt`")
            prompt = v.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise bad_field("prompt", "prompt must be a non-empty text")
            size = v.get("size")
            if size is not None and size not in sizes:
                raise bad_field("size", f"size {size!r} is not supported; allowed: {', '.join(sizes)}")
            sched = square if size is None else sizes[size]
            negative = v.get("negative_prompt")
            if negative is not None and not negative.strip():
                raise bad_field("negative_prompt", "negative_prompt must be a non-empty text when given")
            return InfinityCondition((prompt,) * n, sched, negative), prompt

        return ServingFacts(
            family=self.name,
            step_unit="scale",
            image_size=square.image_size[0],
            num_classes=0,
            vocab_size=2**self.model.cfg.bits,  # bit patterns per token (top_k acts per bit: only 1 matters)
            steps=square.num_scales,
            class_names=(),
            make_params=make_params,
            warmup=lambda: InfinityParams(cfg=d["cfg"], tau=d["tau"], top_k=d["top_k"], top_p=d["top_p"], seed=0),
            make_condition=make_condition,
            warmup_condition=lambda: InfinityCondition(("warm up",), square),
        )
