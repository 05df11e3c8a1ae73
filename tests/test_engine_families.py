"""The engine equals the pipeline for every model family: requests arriving at random iterations, each with its own
random settings, plan and first image index, give the tokens of the pipeline's call with the same seed.

Family-agnostic on purpose: the requests go in through ``Engine(pipe.engine_family())`` and the reference comes out
of ``pipe(labels, **pipe.call_kwargs(params))``. Family-specific invariants under random arrivals (VAR's cache
lengths, raster KV-pool pressure and GQA) stay in test_engine.py and test_raster_engine.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.scheduler import SchedulerConfig

from .conftest import tiny_pair, tiny_raster_pipe

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Family:
    """A tiny pipeline of one family, a random params draw for it and the plans a request may run with."""

    pipe: Any
    params: Callable[[random.Random, int], Any]
    plans: tuple[str | None, ...]  # preset or spec names; None: exact
    plan_keyword: str  # the pipeline call's keyword for them


def _var() -> Family:
    from nextscale.engine.var.params import SamplingParams
    from nextscale.pipelines.var import VARPipeline

    def params(rng: random.Random, seed: int) -> SamplingParams:
        return SamplingParams(
            cfg=rng.choice([0.0, 1.5, 4.0]),
            top_k=rng.choice([0, 1, 20]),
            top_p=rng.choice([0.0, 0.9]),
            more_smooth=rng.random() < 0.2,
            seed=seed,
            rng=rng.choice(["per_image", "per_image", "official"]),
        )

    var, vae = tiny_pair(3)
    return Family(VARPipeline(var, vae, channels_last_decoder=False), params, (None, "cfg-cutoff", "fastvar"), "accel")


def _raster() -> Family:
    from nextscale.engine.raster.params import RasterParams

    def params(rng: random.Random, seed: int) -> RasterParams:
        return RasterParams(
            cfg_scale=rng.choice([1.0, 2.0, 4.0]),
            cfg_interval=rng.choice([-1, 1, 9]),
            temperature=rng.choice([1.0, 0.8]),
            top_k=rng.choice([0, 5, 2000]),
            top_p=rng.choice([1.0, 0.9]),
            seed=seed,
            rng=rng.choice(["per_image", "per_image", "official"]),
        )

    return Family(tiny_raster_pipe(), params, (None, "sjd:window=4", "gsd"), "speculative")


@pytest.fixture(scope="module", params=["var", "raster"])
def family(request) -> Family:
    return {"var": _var, "raster": _raster}[request.param]()


def _plan(pipe: Any, name: str | None) -> Any:
    return pipe.quality_plans({"auto": name})["auto"].plan


@pytest.mark.parametrize("seed", range(2))
def test_engine_equals_pipeline_under_random_arrivals(family, seed):
    rng, pipe = random.Random(seed), family.pipe
    cfg = EngineConfig(
        kv_cache_mb=rng.choice([0.2, 64.0]),
        max_images_per_request=3,
        scheduler=SchedulerConfig(max_running=rng.choice([2, 64]), max_tokens=rng.choice([8, 4096])),
    )
    engine = Engine(pipe.engine_family(), cfg)
    pending = sorted(
        (rng.randint(0, 12), [rng.randint(0, pipe.num_classes - 1) for _ in range(rng.randint(1, 3))], i)
        for i in range(6)
    )
    ids, done, it = {}, {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= it:
            _, labels, i = pending.pop(0)
            params, plan, first = family.params(rng, 700 + i), rng.choice(family.plans), rng.randint(0, 3)
            rid = engine.add_request(
                torch.tensor(labels),
                params,
                plan=_plan(pipe, plan),
                first_image_index=first,
                previews=rng.random() < 0.5,
            )
            ids[rid] = (labels, params, plan, first)
        done.update({e.request_id: e for e in engine.step() if e.finished})
        engine.scheduler.check_integrity()
        it += 1
    assert set(done) == set(ids) and engine.scheduler.rows_in_use == 0 and not engine.pool.slots
    for rid, (labels, params, plan, first) in ids.items():
        ref = pipe(
            labels, **pipe.call_kwargs(params), **{family.plan_keyword: plan}, first_image_index=first, output_type="pt"
        )
        want = ref.tokens if isinstance(ref.tokens, list) else [ref.tokens]
        assert all(torch.equal(a, b) for a, b in zip(done[rid].tokens, want, strict=True)), (rid, params, plan)
