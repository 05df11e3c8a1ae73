"""Acceleration plug-ins: spec strings and presets, the plans they make, losslessness where claimed, exactness of
what a lossy method leaves untouched, and the engine giving the pipeline's images for every plan."""

from __future__ import annotations

import random

import pytest
import torch

from nextscale.accel import PlanContext, build_plan, describe, parse_spec, resolve
from nextscale.accel.fastvar import FastVAR
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.var.family import VARFamily
from nextscale.engine.var.params import SamplingParams
from nextscale.engine.var.plan import REFINER, RequestPlan, StepPlan
from nextscale.errors import InvalidInputError
from nextscale.models.var import VAR
from nextscale.pipelines.var import VARPipeline

from .conftest import randomize_, tiny_pair, tiny_var_config

# Six scales, so that the default "last two scales" methods leave four exact ones in front of them.
PNS = (1, 2, 3, 4, 5, 6)


@pytest.fixture(scope="module")
def pipe() -> VARPipeline:
    var, vae = tiny_pair(4, dict(depth=4, num_classes=5), dict(patch_nums=PNS, ch_mult=(1, 1, 2)))
    refiner = randomize_(VAR(tiny_var_config(depth=1, embed_dim=32, num_heads=1, patch_nums=PNS, num_classes=5)), 9)
    return VARPipeline(var, vae, refiner=refiner, channels_last_decoder=False)


def run(pipe, accel, labels=(0, 3, 4), **kw):
    kw = {"seed": 5, "cfg": 2.0, "top_k": 20, "output_type": "pt", **kw}
    return pipe(list(labels), accel=accel, **kw)


# ---- specs, presets, plans ---------------------------------------------------------------------------------------
def test_spec_strings_round_trip_and_errors_name_the_allowed_values():
    m = parse_spec("fastvar:keep=0.5/0.3,layers=1-3,cache=2")
    assert m == FastVAR(keep=(0.5, 0.3), layers=(1, 3), cache=2) and parse_spec(m.spec()) == m
    counted_from_the_end = FastVAR(scales=(-1,))  # "-1" is a scale index, not a range: it once parsed as scale 1
    assert parse_spec("fastvar:scales=-1") == counted_from_the_end == parse_spec(counted_from_the_end.spec())
    assert parse_spec("fastvar:scales=-2/-1,layers=-3--1") == FastVAR(scales=(-2, -1), layers=(-3, -1))
    with pytest.raises(InvalidInputError, match=r"unknown acceleration method 'warp'; available: cfg-cutoff, code"):
        parse_spec("warp")
    with pytest.raises(InvalidInputError, match=r"fastvar: bad option 'speed=2'; .* keep, scales, layers, cache"):
        parse_spec("fastvar:speed=2")
    with pytest.raises(InvalidInputError, match=r"cfg-cutoff: option last='two' is not a valid int"):
        parse_spec("cfg-cutoff:last=two")
    with pytest.raises(InvalidInputError, match=r"fastvar: keep must be in \(0, 1\]"):
        parse_spec("fastvar:keep=1.5")
    ctx = PlanContext(PNS, depth=4)
    with pytest.raises(InvalidInputError, match="fastvar is given twice"):
        resolve(["fastvar", "fastvar:keep=0.2"], ctx)
    with pytest.raises(InvalidInputError, match=r"code needs a refiner: .* pass code:refiner=DIR_OR_HUB_ID"):
        build_plan(resolve("code", ctx), ctx)
    with pytest.raises(InvalidInputError, match="cfg-cutoff: last=6 would leave none of the 6 scales guided"):
        build_plan(resolve("cfg-cutoff:last=6", ctx), ctx)


def test_presets_and_the_plans_they_make():
    with_refiner, alone = PlanContext(PNS, 4, refiner_depth=1), PlanContext(PNS, 4)
    assert resolve("exact", alone) == [] and resolve(None, alone) == []
    balanced = build_plan(resolve("balanced", alone), alone)
    assert [s.guided for s in balanced.steps] == [True] * 3 + [False] * 3
    assert balanced.compresses_kv and balanced.steps[-1].kv_keep == (0,) * 4, "balanced holds a quarter of the KV"
    fast = build_plan(resolve("fast", with_refiner), with_refiner)
    assert fast.names[0].startswith("code") and fast.uses_refiner
    no_refiner = build_plan(resolve("fast", alone), alone)
    assert not any(s.skip for s in no_refiner.steps), "no refiner: fast still generates every scale"
    assert no_refiner.names == ("cfg-cutoff",) and [s.guided for s in no_refiner.steps] == [True] * 4 + [False] * 2
    tuned = resolve("fast", alone, presets={"fast": ["cfg-cutoff:last=1"]})
    assert [m.spec() for m in tuned] == ["cfg-cutoff:last=1"], "a model's tuned presets win"


def test_describe_says_what_a_setting_runs_and_where_it_came_from(pipe):
    alone, with_refiner = PlanContext(PNS, 4), PlanContext(PNS, 4, refiner_depth=1)
    tuned = describe("fast", alone, {"fast": ["fastvar:keep=0.25", "cfg-cutoff:last=2"]})
    assert str(tuned) == "fast -> cfg-cutoff, fastvar:keep=0.25 (model's tuned preset)", "canonical specs, in order"
    built_in = describe("fast", with_refiner)
    assert built_in.specs == ("code:draft=-3", "cfg-cutoff", "fastvar:keep=0.25")
    assert built_in.source == "built-in preset"
    assert describe("fast", alone).source == "built-in preset for models without a refiner"
    given = describe(["cfg-cutoff:last=1", "fastvar:keep=0.4"], alone)
    assert str(given) == "cfg-cutoff:last=1 + fastvar:keep=0.4 -> cfg-cutoff:last=1, fastvar:keep=0.4 (as given)"
    mixed = describe(["balanced", FastVAR(keep=0.3)], alone, {"balanced": ["cfg-cutoff:last=1"]})
    assert mixed.specs == ("cfg-cutoff:last=1", "fastvar:keep=0.3")
    assert mixed.source == "balanced: model's tuned preset; the rest as given"
    assert str(describe(None, alone)) == "exact -> no acceleration (default)"
    with pytest.raises(InvalidInputError, match="unknown acceleration method 'warp'"):
        describe("warp", alone)
    # A call reports the same description in its stats, and its specs are those of the plan that ran.
    out = run(pipe, "fast")
    assert out.stats["resolved"] == pipe.describe_accel("fast").as_dict()
    assert out.stats["resolved"]["specs"] == out.stats["accel"] and out.stats["resolved"]["requested"] == "fast"
    assert run(pipe, None).stats["resolved"] == {"requested": "exact", "specs": [], "source": "default"}


def test_plans_refuse_what_the_engine_cannot_do():
    with pytest.raises(InvalidInputError, match="guidance cannot be switched back on"):
        RequestPlan((StepPlan(), StepPlan(guided=False), StepPlan()))
    with pytest.raises(InvalidInputError, match="first scale cannot be skipped"):
        RequestPlan((StepPlan(skip=True), StepPlan()))


# ---- the pipeline ------------------------------------------------------------------------------------------------
def test_no_plugin_and_lossless_settings_are_bit_identical(pipe):
    exact = run(pipe, None)
    assert exact.stats["accel"] == [] and exact.stats["rows_x_tokens"] == [6.0 * p * p for p in PNS]
    for accel in ("exact", [], "fastvar:keep=1"):  # keeping every token runs the pruning path losslessly
        out = run(pipe, accel)
        assert all(torch.equal(a, b) for a, b in zip(out.tokens, exact.tokens)), accel
        assert torch.equal(out.images, exact.images), accel


@pytest.mark.parametrize(
    "accel, untouched",
    [
        ("cfg-cutoff", 4),
        ("skip-scales:last=2", 4),
        ("fastvar", 4),
        ("fastvar:scales=5,cache=2", 5),
        ("code:draft=3", 3),
        ("balanced", 3),
        ("fast", 3),
    ],
)
def test_lossy_methods_leave_the_scales_before_them_exact(pipe, accel, untouched):
    exact, out = run(pipe, None), run(pipe, accel)
    for si in range(untouched):
        assert torch.equal(out.tokens[si], exact.tokens[si]), (accel, si)
    assert not all(torch.equal(a, b) for a, b in zip(out.tokens[untouched:], exact.tokens[untouched:])), accel
    assert out.images.shape == exact.images.shape and torch.isfinite(out.images).all()
    assert out.stats["flops"] < exact.stats["flops"], "an accelerated call does less"


def test_skipped_scales_add_nothing_and_cost_no_kv(pipe):
    exact, out = run(pipe, None), run(pipe, "skip-scales:last=2")
    assert [t.shape[1] for t in out.tokens] == [1, 4, 9, 16, 0, 0]
    f_hat_4 = pipe.vae.quantize.idx_to_fhat(exact.tokens[:4])  # the latent after the scales that ran
    torch.testing.assert_close(run(pipe, "skip-scales:last=2", output_type="latent").images, f_hat_4)
    assert out.stats["kv_bytes_peak"] < exact.stats["kv_bytes_peak"]
    assert run(pipe, "fastvar").stats["kv_bytes_peak"] < exact.stats["kv_bytes_peak"], "pruned keys are not kept"


def test_cfg_cutoff_samples_the_conditional_logits_alone(pipe):
    # With cfg=0 guidance changes nothing, so dropping the unconditional rows must give the same tokens (the
    # conditional rows' logits only differ by batch-size round-off, far below the sampling resolution here).
    exact, out = run(pipe, None, cfg=0.0, top_k=1), run(pipe, "cfg-cutoff:last=3", cfg=0.0, top_k=1)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, exact.tokens))
    assert out.stats["rows_x_tokens"][-3:] == [3.0 * p * p for p in PNS[-3:]]


def test_code_prefill_equals_running_the_refiner_scale_by_scale(pipe):
    """The refiner's one-pass prefix recompute (block-causal mask) equals its cached steps over the same inputs."""
    from nextscale.engine.kv_cache import KVCache
    from nextscale.engine.sampling import cfg_double, cfg_labels, cfg_rows
    from nextscale.models.attention import CachedPrefill, CachedStep

    ref = pipe.refiner
    exact = pipe.vae.quantize.idx_to_var_input(run(pipe, None).tokens)  # [B, L-1, Cv]
    labels = torch.tensor([0, 3, 4])
    cond, lvl = ref.condition(cfg_labels(labels, 5)), ref.level_pos()
    inputs = [ref.first_tokens(cond, lvl)]
    inputs += [
        cfg_double(ref.next_tokens(si, exact[:, b - 1 : e - 1], lvl))
        for si, (b, e) in list(enumerate(ref.scales.begin_ends))[1:4]
    ]
    with torch.no_grad():
        steps = CachedStep(KVCache.for_model(ref, cfg_rows(3)))
        one_by_one = torch.cat([ref.forward_tokens(x, cond, steps) for x in inputs], dim=1)
        T = sum(x.shape[1] for x in inputs)
        prefill = ref.forward_tokens(
            torch.cat(inputs, 1), cond, CachedPrefill(KVCache.for_model(ref, 6), ref.causal_bias(T))
        )
    torch.testing.assert_close(prefill, one_by_one, atol=1e-5, rtol=1e-5)


def test_code_needs_a_compatible_refiner(pipe):
    var, vae = tiny_pair(4, dict(depth=4, num_classes=5), dict(patch_nums=PNS, ch_mult=(1, 1, 2)))
    with pytest.raises(InvalidInputError, match="code needs a refiner"):
        VARPipeline(var, vae)([0], accel="code")
    other = VAR(tiny_var_config(depth=1, patch_nums=PNS, num_classes=7))
    with pytest.raises(Exception, match="refiner does not match the transformer: num_classes 7 != 5"):
        VARPipeline(var, vae, refiner=other)
    with pytest.raises(InvalidInputError, match="acceleration needs sampler='fast'"):
        pipe([0], accel="balanced", sampler="reference")


# ---- the engine --------------------------------------------------------------------------------------------------
ENGINE_PLANS = [
    None,
    "cfg-cutoff",
    "skip-scales",
    "fastvar",
    "balanced",
    "cfg-cutoff:last=1,fastvar:keep=0.3",
    "code:draft=3",
    "fast",
]


@pytest.mark.parametrize("seed", range(3))
def test_engine_equals_pipeline_for_mixed_plans_under_random_arrivals(pipe, seed):
    rng = random.Random(seed)
    engine = Engine(
        VARFamily(pipe.transformer, pipe.vae, refiner=pipe.refiner),
        EngineConfig(kv_cache_mb=100.0, max_images_per_request=3),
    )
    pending = []
    for i in range(7):
        spec = rng.choice(ENGINE_PLANS)
        accel = None if spec is None else (spec.split(",") if "," in spec else spec)
        labels = [rng.randint(0, 4) for _ in range(rng.randint(1, 3))]
        params = SamplingParams(cfg=rng.choice([0.0, 2.0]), top_k=rng.choice([0, 20]), seed=100 + i)
        pending.append((rng.randint(0, 6), labels, params, accel))
    pending.sort(key=lambda r: r[0])
    ids, done, it = {}, {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= it:
            _, labels, params, accel = pending.pop(0)
            rid = engine.add_request(torch.tensor(labels), params, plan=pipe.plan(accel))
            ids[rid] = (labels, params, accel)
        done.update({e.request_id: e for e in engine.step() if e.finished})
        engine.scheduler.check_integrity()
        it += 1
    for rid, (labels, params, accel) in ids.items():
        ref = pipe(labels, cfg=params.cfg, top_k=params.top_k, seed=params.seed, output_type="pt", accel=accel)
        assert all(torch.equal(a, b) for a, b in zip(done[rid].tokens, ref.tokens)), (rid, accel)
        torch.testing.assert_close(done[rid].images, ref.images, atol=1e-4, rtol=0)


def test_engine_units_cost_what_their_plan_computes(pipe):
    engine = Engine(VARFamily(pipe.transformer, pipe.vae), EngineConfig(kv_cache_mb=100.0))
    a = engine.add_request(torch.tensor([1, 2]), SamplingParams(seed=0))
    b = engine.add_request(torch.tensor([1, 2]), SamplingParams(seed=0), plan=pipe.plan("balanced"))
    c = engine.add_request(torch.tensor([1, 2]), SamplingParams(seed=0), plan=pipe.plan("skip-scales:last=2"))
    seqs = {s.request_id: s for s in engine.scheduler.waiting}
    assert [seqs[a].unit_rows[i] * seqs[a].scale_tokens[i] for i in range(6)] == [4 * p * p for p in PNS]
    assert seqs[b].unit_rows[-3:] == (2, 2, 2) and seqs[b].rows < seqs[a].rows, "unguided, compressed KV"
    assert len(seqs[c].scale_tokens) == 4, "skipped scales are no units"
    coded = Engine(VARFamily(pipe.transformer, pipe.vae, refiner=pipe.refiner), EngineConfig(kv_cache_mb=100.0))
    d = coded.add_request(torch.tensor([1, 2]), SamplingParams(seed=0), plan=pipe.plan("code:draft=3"))
    assert coded.scheduler.waiting[0].scale_tokens[3] == sum(p * p for p in PNS[:4]), "the hand-off recomputes"
    assert d and coded.pool.rows > 0 and coded.family.refiner_pool is not None
    with pytest.raises(InvalidInputError, match="this engine was built without one"):
        engine.add_request(torch.tensor([1]), SamplingParams(seed=0), plan=pipe.plan("code"))


def test_refiner_plan_marks_the_late_scales():
    ctx = PlanContext(PNS, 4, refiner_depth=1)
    plan = build_plan(resolve("code:draft=4", ctx), ctx)
    assert [s.model == REFINER for s in plan.steps] == [False] * 4 + [True] * 2
