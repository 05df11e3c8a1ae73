"""KV-cache compression (``scalekv``, ``hack``): the packed cache layout, budgets, selection, calibration, and the
engine holding more requests in the same pool while giving the pipeline's images."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nextscale.accel import HACK, KVRoles, PlanContext, ScaleKV, build_plan, calibrate_kv, parse_spec, resolve
from nextscale.accel.scalekv import ScaleKVSelect, window_queries
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.kv_cache import CompactKV, compact_rows, pack_layers
from nextscale.engine.var.family import VARFamily
from nextscale.engine.var.params import SamplingParams
from nextscale.engine.var.plan import RequestPlan
from nextscale.errors import InvalidInputError
from nextscale.pipelines.var import VARPipeline

from .conftest import tiny_pair

PNS = (1, 2, 3, 4, 5, 6, 8)  # 155 tokens: enough history for the budgets to bite


@pytest.fixture(scope="module")
def pipe() -> VARPipeline:
    var, vae = tiny_pair(11, dict(depth=4, num_classes=5, num_heads=2), dict(patch_nums=PNS, ch_mult=(1, 1, 2)))
    return VARPipeline(var, vae, channels_last_decoder=False)


def run(pipe, accel, labels=(0, 3, 4), **kw):
    kw = {"seed": 5, "cfg": 2.0, "top_k": 20, "output_type": "pt", **kw}
    return pipe(list(labels), accel=accel, **kw)


# ---- the packed layout -------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 17),
    caps=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    seq_len=st.integers(40, 60),
)
def test_packed_layers_fit_their_rows_without_overlap(rows, caps, seq_len):
    m = compact_rows(rows, caps, seq_len)
    assert m <= rows, "never more pool rows than an uncompressed cache"
    packed = pack_layers(rows, caps, m * seq_len, len(caps))
    assert packed is not None
    used: list[tuple[int, int, int]] = []
    for cap, pieces in zip(caps, packed):
        covered = [r for p in pieces for r in range(p.r0, p.r1)]
        assert covered == (list(range(rows)) if cap else []), "every row of every layer, once, in order"
        for p in pieces:
            end = p.cell + (p.r1 - p.r0) * cap
            assert 0 <= p.bin < len(caps) and end <= m * seq_len
            used.append((p.bin, p.cell, end))
    for a in used:
        for b in used:
            assert a is b or a[0] != b[0] or a[2] <= b[1] or b[2] <= a[1], "pieces overlap"
    if m > 1:
        assert pack_layers(rows, caps, (m - 1) * seq_len, len(caps)) is None, "the fewest rows that fit"


def test_a_cache_that_keeps_everything_is_the_exact_cache(pipe):
    """Compression machinery with nothing to drop: the packed cache, its in-place path and (at the last scale) the
    path that attends over history + current without storing them give the exact tokens bit for bit."""
    exact = run(pipe, None)
    depth, tokens = pipe.transformer.depth, pipe.transformer.scales.token_counts()
    cum = [sum(tokens[: i + 1]) for i in range(len(tokens))]
    for last_keep in (cum[-1], 0):
        keeps = [(c,) * depth for c in cum[:-1]] + [(last_keep,) * depth]
        steps = tuple(dataclasses.replace(RequestPlan.exact(len(PNS)).steps[0], kv_keep=k) for k in keeps)
        plan = RequestPlan(steps)
        params = pipe.sampling_params(cfg=2.0, top_k=20, seed=5)
        out = pipe._generate(torch.tensor([0, 3, 4]), params, output_type="pt", plan=plan)
        assert all(torch.equal(a, b) for a, b in zip(out.tokens, exact.tokens)), last_keep
        assert out.stats["kv_bytes_peak"] <= exact.stats["kv_bytes_peak"]


# ---- budgets and selection -----------------------------------------------------------------------------------------
def test_budgets_keep_drafters_whole_and_fit_the_peak():
    ctx = PlanContext(PNS, depth=4, num_heads=2)
    plan = build_plan(resolve("scalekv:budget=0.3", ctx), ctx)
    tokens = [p * p for p in PNS]
    caps = plan.kv_capacity(tokens, 4)
    assert sum(caps) <= 0.3 * sum(tokens) * 4
    assert caps[0] == sum(tokens[:-1]), "block 0 drafts by default: it keeps its whole history"
    assert plan.steps[-1].kv_keep == (0, 0, 0, 0), "the last scale's keys are never stored"
    assert parse_spec("scalekv:budget=0.3").budget == 0.3
    with pytest.raises(InvalidInputError, match=r"scalekv: budget=0\.05 is below what the drafter layers alone keep"):
        build_plan(resolve("scalekv:budget=0.05", ctx), ctx)
    with pytest.raises(InvalidInputError, match="scalekv: budget must be in"):
        parse_spec("scalekv:budget=0")
    with pytest.raises(InvalidInputError, match="scalekv: window must be a square number"):
        parse_spec("scalekv:window=10")
    with pytest.raises(InvalidInputError, match="scalekv and hack cannot be combined"):
        resolve(["scalekv", "hack"], ctx)
    with pytest.raises(InvalidInputError, match="code and scalekv cannot be combined"):
        resolve(["code", "scalekv"], PlanContext(PNS, 4, refiner_depth=1))
    hack = build_plan(resolve("hack:budget=0.3", ctx), ctx)
    assert len(set(hack.kv_capacity(tokens, 4))) == 1, "hack: one budget for every layer"


def test_scalekv_selection_keeps_the_window_and_the_strongest_keys():
    g = torch.Generator().manual_seed(0)
    R, H, pn, n, c = 2, 3, 8, 30, 8
    l = pn * pn
    q = torch.randn(R, H, l, c, generator=g)
    k = torch.randn(R, H, n + l, c, generator=g)
    win = window_queries(l, pn, 16)
    assert len(win) == 16 and win.unique().numel() == 16
    k[:, :, 5] = q[:, :, win].sum(2) * 10  # a key every window query likes: history position 5
    idx = ScaleKVSelect(16, 1)(0, 0, pn, q, k, 1.0, 24)
    assert idx.shape == (R, H, 24) and bool((idx.diff(dim=-1) > 0).all()), "ascending, no repeats"
    kept = [set(row.tolist()) for row in idx.flatten(0, 1)]
    assert all(5 in s and {n + int(w) for w in win} <= s for s in kept)
    assert window_queries(10, 8, 16).tolist() == list(range(10)), "not a whole map: evenly spaced (here all)"


def test_lossy_compression_leaves_the_uncompressed_scales_exact(pipe):
    exact = run(pipe, None)
    tokens = [p * p for p in PNS]
    for spec in ("scalekv:budget=0.3", "hack:budget=0.3"):
        out = run(pipe, spec)
        first = min(i for i in range(len(PNS)) if sum(tokens[: i + 1]) > 0.3 * sum(tokens))  # first compression
        assert all(torch.equal(a, b) for a, b in zip(out.tokens[: first + 1], exact.tokens[: first + 1])), spec
        assert out.stats["kv_bytes_peak"] <= 0.31 * exact.stats["kv_bytes_peak"], spec
        assert out.stats["flops"] < exact.stats["flops"]


# ---- calibration ----------------------------------------------------------------------------------------------------
def test_calibration_finds_roles_and_round_trips(pipe, tmp_path):
    var = pipe.transformer
    params = pipe.sampling_params(cfg=2.0, top_k=20, seed=3)
    labels = torch.tensor([0, 1, 2, 3])
    roles = calibrate_kv(var, pipe.vae.quantize, labels, params, params.generators(4, "cpu"), drafters=1)
    assert roles.samples == 4 and all(len(roles.drafters[si]) == 1 for si in range(1, len(PNS)))
    asi = [a for row in roles.asi[1:] for a in row]
    assert all(a is not None and 0 < a <= 1 for a in asi), "ASI is a mean of two shares"
    assert len(roles.contextual) == var.depth and all(len(h) == var.num_heads for h in roles.contextual)
    path = tmp_path / "kv_budgets.json"
    roles.save(path)
    assert KVRoles.load(path) == roles
    ctx = PlanContext(PNS, var.depth, num_heads=var.num_heads)
    plan = build_plan([ScaleKV(budget=0.5, budgets=str(path))], ctx)
    drafted = roles.drafters[len(PNS) - 2][0]
    assert plan.steps[-2].kv_keep is not None and plan.steps[-2].kv_keep[drafted] == sum(p * p for p in PNS[:-1])
    with pytest.raises(InvalidInputError, match="KV calibration is for patch_nums"):
        build_plan([HACK(budgets=str(path))], PlanContext(PNS[:-1], var.depth))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(InvalidInputError, match="format 'other' is not"):
        KVRoles.load(bad)
    with pytest.raises(InvalidInputError, match="does not exist"):
        parse_spec(f"scalekv:budgets={tmp_path / 'missing.json'}").apply([], ctx)
    # a model folder carries its calibration: the pipeline plans with it by default
    pipe.kv_roles = roles.to_json()
    try:
        saved = VARPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
        assert saved.kv_roles == roles.to_json()
        assert saved.plan("scalekv:budget=0.5").steps == pipe.plan(f"scalekv:budget=0.5,budgets={path}").steps
    finally:
        pipe.kv_roles = None


# ---- the engine ------------------------------------------------------------------------------------------------------
ENGINE_PLANS = [None, "scalekv:budget=0.3", "hack:budget=0.3", "cfg-cutoff,fastvar,scalekv:budget=0.3", "balanced"]


@pytest.mark.parametrize("seed", range(2))
def test_engine_serves_compressed_caches_like_the_pipeline(pipe, seed):
    rng = random.Random(seed)
    engine = Engine(VARFamily(pipe.transformer, pipe.vae), EngineConfig(kv_cache_mb=50.0, max_images_per_request=3))
    pending = []
    for i in range(7):
        spec = rng.choice(ENGINE_PLANS)
        accel = None if spec is None else spec.split(",")
        labels = [rng.randint(0, 4) for _ in range(rng.randint(1, 3))]
        params = SamplingParams(cfg=rng.choice([0.0, 2.0]), top_k=rng.choice([0, 20]), seed=100 + i)
        pending.append((rng.randint(0, 6), labels, params, accel))
    pending.sort(key=lambda r: r[0])
    ids, done, it = {}, {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= it:
            _, labels, params, accel = pending.pop(0)
            ids[engine.add_request(torch.tensor(labels), params, plan=pipe.plan(accel))] = (labels, params, accel)
        done.update({e.request_id: e for e in engine.step() if e.finished})
        engine.scheduler.check_integrity()
        for req in engine.requests.values():
            if isinstance(req.state and req.state.kv, CompactKV):
                req.state.kv.check_integrity()  # type: ignore[union-attr]
        it += 1
    assert not engine.pool.slots
    for rid, (labels, params, accel) in ids.items():
        ref = pipe(labels, cfg=params.cfg, top_k=params.top_k, seed=params.seed, output_type="pt", accel=accel)
        assert all(torch.equal(a, b) for a, b in zip(done[rid].tokens, ref.tokens)), (rid, accel)
        torch.testing.assert_close(done[rid].images, ref.images, atol=1e-4, rtol=0)


def test_a_fixed_pool_holds_more_compressed_requests(pipe):
    var = pipe.transformer
    row_mb = 2 * var.depth * var.cfg.seq_len * var.C * 4 / 2**20
    in_flight = {}
    for accel in (None, "scalekv:budget=0.25"):
        engine = Engine(VARFamily(var, pipe.vae), EngineConfig(kv_cache_mb=row_mb * 16.5, max_images_per_request=1))
        for i in range(40):
            engine.add_request(torch.tensor([i % 5]), SamplingParams(seed=i), plan=pipe.plan(accel))
        engine.step()
        in_flight[accel] = engine.num_running
    assert in_flight[None] == 8, "two rows per image with guidance: 16 rows hold 8 requests"
    assert in_flight["scalekv:budget=0.25"] >= 2 * in_flight[None], in_flight
