"""Acceleration plug-ins on Infinity: the exact plan is the plain loop bit for bit (pipeline and engine); cfg-cutoff,
skip-scales, fastvar, scalekv, hack and the family's presets run in the pipeline and in the engine, which gives
each request the pipeline's bits for its seed and plan under random arrivals; cfg-cutoff keeps exact's bits at the
guided scales; scalekv/hack hold less KV memory; int8 runs on a quantized copy; bad settings fail in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from nextscale.accel.int8 import int8_available, is_int8, weight_bytes
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.infinity.family import InfinityCondition
from nextscale.engine.var.plan import RequestPlan
from nextscale.errors import ConfigError, InvalidInputError
from nextscale.pipelines.infinity import InfinityPipeline

from .helpers import tiny_infinity_pipe

FX = Path(__file__).parent / "fixtures" / "infinity-official"
PROMPTS = [p["prompt"] for p in json.loads((FX / "manifest.json").read_text())["prompts"].values()]
# The fixture has 2 blocks: ScaleKV's drafter (block 0) alone keeps about half the cache, so budgets are above it.
# FastVAR's default block range on 2 blocks is empty (it keeps ~10 % + 12 % of the depth full): both blocks prune here.
FASTVAR = "fastvar:layers=0-2"
METHODS = [
    "cfg-cutoff:last=2",
    "skip-scales:last=2",
    FASTVAR,
    "fastvar:layers=1-2,scales=-2/-1,skip=",
    "scalekv:budget=0.6",
    "hack:budget=0.6",
    "balanced",
    "fast",
]
COMBINED = ("cfg-cutoff:last=2", "hack:budget=0.6", "skip-scales:last=1")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> InfinityPipeline:
    return tiny_infinity_pipe()


def _bits(bits: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.reshape(b.shape[0], -1, b.shape[-1]) for b in bits], 1)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _one_line(fn) -> str:
    with pytest.raises(InvalidInputError) as err:
        fn()
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def test_exact_plan_is_the_plain_loop(pipe):
    P = PROMPTS[:2]
    plain = pipe(P, seed=5, output_type="pt")
    for accel in ("exact", []):
        out = pipe(P, seed=5, output_type="pt", accel=accel)
        assert _same(out.bits, plain.bits) and torch.equal(out.images, plain.images)
    assert pipe.plan("exact") is None and pipe.schedule_plans("exact") is None
    # the engine: no plan, an explicit exact RequestPlan, and the high quality level all give the pipeline's bits
    engine = Engine(pipe.engine_family(), EngineConfig(max_images_per_request=2, kv_cache_mb=64))
    sched = pipe.schedule()[0]
    params = pipe.sampling_params(seed=5)
    high = pipe.quality_plans({"high": "exact"})["high"]
    assert high.plan is None and high.methods == ()
    for plan in (None, RequestPlan.exact(sched.num_scales), high.plan):
        (ev,) = _run(engine, [(InfinityCondition(tuple(P), sched), params, plan)])
        assert torch.equal(_bits(ev.tokens), _bits(plain.bits))


def _run(engine: Engine, requests: list[tuple]) -> list:
    ids = [engine.add_request(c, p, plan=plan) for c, p, plan in requests]
    done = {}
    while engine.has_unfinished():
        done.update({e.request_id: e for e in engine.step() if e.finished})
    return [done[i] for i in ids]


def test_methods_engine_equals_pipeline_under_random_arrivals(pipe):
    """Requests of different sizes, image counts, guidance, seeds and plans arrive while others run; each gets the
    pipeline's bits for its seed and plan (a compressed cache packed into pool rows as the engine packs it)."""
    rng = random.Random(1)
    engine = Engine(pipe.engine_family(), EngineConfig(max_images_per_request=2, kv_cache_mb=64))
    sizes = list(engine.family.sizes("0.06M").items())
    specs: list = [*METHODS, COMBINED, None]
    plans = {spec: pipe.schedule_plans(list(spec) if isinstance(spec, tuple) else spec) for spec in specs}
    rng.shuffle(specs)
    todo = []
    for i, spec in enumerate(specs):
        size, sched = rng.choice(sizes[:4])
        n, seed = rng.choice([1, 2]), rng.randrange(1000)
        cfg = 1.0 if spec in (None, "skip-scales:last=2") else rng.choice([3.0, [3, 3, 3, 2, 2, 2, 2]])
        params = pipe.sampling_params(cfg=cfg, seed=seed)
        todo.append((InfinityCondition((PROMPTS[i % 2],) * n, sched), params, size, spec))
    ids: dict[str, tuple] = {}
    finals = {}
    while todo or engine.has_unfinished():
        if todo and (not ids or rng.random() < 0.4):
            cond, params, size, spec = todo.pop(0)
            ids[engine.add_request(cond, params, plan=plans.get(spec) if spec else None)] = (cond, params, size, spec)
        for ev in engine.step():
            if ev.finished:
                finals[ev.request_id] = ev
    assert len(finals) == len(specs)
    for rid, (cond, params, size, spec) in ids.items():
        w, h = (int(v) for v in size.split("x"))
        accel = list(spec) if isinstance(spec, tuple) else spec
        ref = pipe(list(cond.prompts), **pipe.call_kwargs(params), size=(h, w), output_type="pt", accel=accel)
        assert torch.equal(_bits(finals[rid].tokens), _bits(ref.bits)), (rid, spec)
        assert (finals[rid].images - ref.images).abs().max() <= 1e-4, spec
    assert engine.family.pool.slots == {}, "every slot released"


def test_cfg_cutoff_keeps_guided_scales_and_halves_rows(pipe):
    P = PROMPTS[:2]
    exact = pipe(P, seed=2, output_type="pt")
    cut = pipe(P, seed=2, output_type="pt", accel="cfg-cutoff:last=2")
    S = len(exact.bits)
    assert _same(cut.bits[: S - 2], exact.bits[: S - 2]), "the guided scales are exact's"
    assert not torch.equal(_bits(cut.bits), _bits(exact.bits))
    rxt, ref = cut.stats["rows_x_tokens"], exact.stats["rows_x_tokens"]
    assert rxt[: S - 2] == ref[: S - 2] and all(2 * a == b for a, b in zip(rxt[S - 2 :], ref[S - 2 :]))
    assert cut.stats["accel"] == ["cfg-cutoff"] and cut.stats["resolved"]["specs"] == ["cfg-cutoff"]


def test_skip_scales_decodes_the_summed_codes(pipe):
    exact = pipe(PROMPTS[0], seed=4, output_type="pt")
    out = pipe(PROMPTS[0], seed=4, output_type="pt", accel="skip-scales:last=2")
    S = len(exact.bits)
    assert len(out.bits) == S - 2 and _same(out.bits, exact.bits[: S - 2]), "no scale before the skipped ones changes"
    assert out.images.shape == exact.images.shape
    assert out.stats["rows_x_tokens"][S - 2 :] == [0, 0]


def test_fastvar_prunes_the_middle_blocks_and_skips_the_largest_scales(pipe):
    """Infinity's FastVAR defaults (counted from the end: cache at -5, prune -4/-3, skip -2/-1): the scales before
    the pruned ones are exact's; keeping every token is lossless, on square and non-square token maps alike."""
    P = PROMPTS[:2]
    for size in (None, (240, 320)):
        exact = pipe(P, seed=6, size=size, output_type="pt")
        S = len(exact.bits)
        kept = pipe(P, seed=6, size=size, output_type="pt", accel="fastvar:keep=1,layers=0-2,skip=")
        assert _same(kept.bits, exact.bits) and torch.equal(kept.images, exact.images), size
        out = pipe(P, seed=6, size=size, output_type="pt", accel=FASTVAR)
        assert len(out.bits) == S - 2 and _same(out.bits[: S - 4], exact.bits[: S - 4]), size
        assert not _same(out.bits[S - 4 :], exact.bits[S - 4 : S - 2]), "pruned scales sample from changed logits"
        rxt, ref = out.stats["rows_x_tokens"], exact.stats["rows_x_tokens"]
        assert rxt[S - 4 : S - 2] == [0.6 * ref[S - 4], 0.5 * ref[S - 3]] and rxt[S - 2 :] == [0, 0]
        assert out.stats["kv_bytes_peak"] < exact.stats["kv_bytes_peak"]
        pruned_only = pipe(P, seed=6, size=size, output_type="pt", accel="fastvar:layers=0-2,skip=")
        assert pruned_only.stats["kv_bytes_peak"] < exact.stats["kv_bytes_peak"], "pruned tokens add no keys"


@pytest.mark.parametrize("spec", ["scalekv:budget=0.6", "hack:budget=0.6"])
def test_kv_compression_holds_less(pipe, spec):
    exact = pipe(PROMPTS[:2], seed=3, output_type="pt")
    out = pipe(PROMPTS[:2], seed=3, output_type="pt", accel=spec)
    assert 0 < out.stats["kv_bytes_peak"] < exact.stats["kv_bytes_peak"]
    family = pipe.engine_family()
    cond = InfinityCondition(tuple(PROMPTS[:2]), pipe.schedule()[0])
    params = pipe.sampling_params(seed=3)
    _, units = family.admit(cond, params, pipe.schedule_plans(spec))
    _, exact_units = family.admit(cond, params, None)
    assert units.rows < exact_units.rows and units.tokens == exact_units.tokens


def test_presets_and_quality_levels(pipe):
    assert pipe.describe_accel("balanced").specs == ("cfg-cutoff:last=3", "fastvar:skip=")
    assert pipe.describe_accel("fast").specs == ("cfg-cutoff:last=3", "fastvar")
    assert "infinity" in pipe.describe_accel("fast").source
    levels = pipe.quality_plans({"auto": None, "high": "exact", "medium": "balanced", "low": "fast"})
    assert {q: list(p.methods) for q, p in levels.items()} == {
        "auto": [],
        "high": [],
        "medium": ["cfg-cutoff:last=3", "fastvar:skip="],
        "low": ["cfg-cutoff:last=3", "fastvar"],
    }
    assert "accel" in pipe.sampling_options and pipe.accel_option == "accel"


@pytest.mark.skipif(not int8_available(), reason="int8 needs torchao (the dev extra installs it)")
def test_int8_runs_on_a_quantized_copy_in_the_pipeline_and_the_engine(pipe):
    """int8 quantizes the per-token and per-request linears of a copy (not the head, not the exact model); the
    pipeline and an engine serving int8 give the same bits; every quality level then reports int8."""
    q = pipe.transformer_for("int8")
    assert q is not pipe.transformer and pipe.transformer_for("int8") is q, "one copy, made once"
    tokens, once = pipe.transformer.linear_roles()
    assert any(n.endswith("ca.mat_q") for n in tokens) and any(n.endswith("ca.mat_kv") for n in once)
    mods, exact_mods = dict(q.named_modules()), dict(pipe.transformer.named_modules())
    assert all(is_int8(mods[n].weight) and not is_int8(exact_mods[n].weight) for n in tokens + once)
    linear_bytes = sum(exact_mods[n].weight.nbytes for n in tokens + once)  # float32: 4 bytes, int8 ~1 byte
    assert not is_int8(mods["head"].weight)
    assert weight_bytes(pipe.transformer) - weight_bytes(q) > 0.7 * linear_bytes
    P = PROMPTS[:2]
    exact = pipe(P, seed=8, output_type="pt")
    out = pipe(P, seed=8, output_type="pt", accel="int8")
    assert out.stats["accel"] == ["int8"] and out.images.shape == exact.images.shape
    assert _same(pipe(P, seed=8, output_type="pt").bits, exact.bits), "the exact model is untouched"
    engine = Engine(pipe.engine_family("int8"), EngineConfig(max_images_per_request=2, kv_cache_mb=64))
    sched, params = pipe.schedule()[0], pipe.sampling_params(seed=8)
    plans = pipe.quality_plans({"auto": "int8", "high": "exact", "low": "fast"})
    assert [list(p.methods) for p in plans.values()] == [
        ["int8"],
        ["int8"],
        ["int8", *pipe.describe_accel("fast").specs],
    ]
    (ev,) = _run(engine, [(InfinityCondition(tuple(P), sched), params, plans["auto"].plan)])
    assert torch.equal(_bits(ev.tokens), _bits(out.bits))
    with pytest.raises(ConfigError, match=r"quality 'low' .* runs a transformed model"):
        pipe.quality_plans({"auto": None, "low": "int8"})


def test_bad_settings_fail_in_one_line(pipe):
    sched = pipe.schedule()[0]
    assert "unknown acceleration method 'nope'" in _one_line(lambda: pipe(PROMPTS[0], accel="nope"))
    assert "cfg-cutoff: last=7" in _one_line(lambda: pipe(PROMPTS[0], accel="cfg-cutoff:last=7"))
    assert "fastvar: skip=(-1,) must leave" in _one_line(lambda: pipe.plan("fastvar:scales=-1,skip=-1"))
    assert "code does not run on Infinity" in _one_line(lambda: pipe.plan("code"))
    assert "first scale cannot be skipped" in _one_line(lambda: pipe.plan("skip-scales:scales=0"))
    assert "scalekv: budget=0.1 is below" in _one_line(lambda: pipe.quality_plans({"auto": "scalekv:budget=0.1"}))
    assert "sampler='reference'" in _one_line(lambda: pipe(PROMPTS[0], accel="fast", sampler="reference"))
    assert "unknown acceleration" in _one_line(lambda: pipe.checked_settings({"accel": "nope"}, 1))
    family = pipe.engine_family()
    cond, params = InfinityCondition((PROMPTS[0],), sched), pipe.sampling_params(seed=0)
    assert "plan has 5 steps" in _one_line(lambda: family.admit(cond, params, RequestPlan.exact(5)))
    assert "RequestPlan" in _one_line(lambda: family.admit(cond, params, "fast"))


def test_server_quality_levels_run_the_presets(pipe):
    """``quality: low`` runs the fast preset's plan for the request's size: the pipeline's image for that setting."""
    from fastapi.testclient import TestClient

    from nextscale.images import to_uint8_nhwc

    from .helpers import decode, infinity_app

    with TestClient(infinity_app(pipe)) as c:
        body = {"prompt": PROMPTS[0], "seed": 7, "size": "320x240", "quality": "low"}
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        ref = pipe(PROMPTS[0], seed=7, size=(240, 320), output_type="pt", accel="fast").images
        got = decode(r.json()["data"][0]["b64_json"]).astype("int16")
        assert abs(got - to_uint8_nhwc(ref)[0].astype("int16")).max() <= 1
