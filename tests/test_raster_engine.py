"""The engine on raster (LlamaGen) models: token-level continuous batching gives the pipeline's images token for token
under random arrivals, a unit is one token of every row of a request, events come per row of the token grid with the
rows decoded so far, aborts free KV rows at once."""

from __future__ import annotations

import random

import pytest
import torch

from nextscale import LlamaGenPipeline
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.raster.family import RasterFamily
from nextscale.engine.raster.runner import RasterRunner
from nextscale.engine.raster.sampler import RasterParams, sample_raster
from nextscale.engine.raster.state import RasterGeneration
from nextscale.engine.scheduler import SchedulerConfig
from nextscale.engine.var.family import VARFamily
from nextscale.engine.var.params import SamplingParams
from nextscale.engine.var.plan import RequestPlan
from nextscale.errors import InvalidInputError

from .conftest import RASTER_GRID, tiny_pair, tiny_raster_pipe

pytestmark = pytest.mark.usefixtures("one_thread")

L = RASTER_GRID * RASTER_GRID


def raster_engine(pipe: LlamaGenPipeline, **cfg) -> Engine:
    return Engine(pipe.engine_family(), EngineConfig(**cfg))


def reference(pipe: LlamaGenPipeline, labels: list[int], params: RasterParams, first: int = 0, speculative=None):
    """The pipeline's call for an engine request (it names the null class -1)."""
    return pipe(
        [-1 if x == pipe.num_classes else x for x in labels],
        cfg=params.cfg_scale,
        cfg_interval=params.cfg_interval,
        top_k=params.top_k,
        top_p=params.top_p,
        temperature=params.temperature,
        seed=params.seed,
        rng=params.rng,
        output_type="pt",
        first_image_index=first,
        speculative=speculative,
    )


@pytest.fixture(scope="module")
def pipe() -> LlamaGenPipeline:
    return tiny_raster_pipe()


@pytest.fixture(scope="module")
def gqa_pipe() -> LlamaGenPipeline:
    return tiny_raster_pipe(6, dim=64, n_head=4, n_kv_head=2)


def random_requests(rng: random.Random, count: int, num_classes: int) -> list:
    reqs = []
    for i in range(count):
        labels = [rng.randint(0, num_classes) for _ in range(rng.randint(1, 3))]  # num_classes: the null class
        params = RasterParams(
            cfg_scale=rng.choice([1.0, 2.0, 4.0]),  # 1.0: no null rows at all
            cfg_interval=rng.choice([-1, 1, 9]),  # guidance ends mid-grid: the null rows leave
            temperature=rng.choice([1.0, 0.8]),
            top_k=rng.choice([0, 5, 2000]),
            top_p=rng.choice([1.0, 0.9]),
            seed=500 + i,
            rng=rng.choice(["per_image", "per_image", "official"]),
        )
        reqs.append((rng.randint(0, 2 * L), labels, params, rng.randint(0, 3)))
    return sorted(reqs, key=lambda r: r[0])


@pytest.mark.parametrize("seed", range(3))
def test_engine_equals_pipeline_under_random_arrivals(pipe, gqa_pipe, seed):
    rng = random.Random(seed)
    p = gqa_pipe if seed == 2 else pipe
    cfg = EngineConfig(
        kv_cache_mb=rng.choice([0.06, 1.0]),  # 0.06 MB: 7 rows of 8 KB, so requests wait for rows
        max_images_per_request=3,
        scheduler=SchedulerConfig(max_running=rng.choice([2, 64])),
    )
    engine = Engine(p.engine_family(), cfg)
    pending = random_requests(rng, 8, p.num_classes)
    ids, done, it = {}, {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= it:
            _, labels, params, first = pending.pop(0)
            rid = engine.add_request(torch.tensor(labels), params, first_image_index=first)
            ids[rid] = (labels, params, first)
        done.update({e.request_id: e for e in engine.step() if e.finished})
        engine.scheduler.check_integrity()
        it += 1
    assert not engine.pool.slots and engine.scheduler.rows_in_use == 0
    for rid, (labels, params, first) in ids.items():
        ref = reference(p, labels, params, first)
        assert torch.equal(done[rid].tokens[0], ref.tokens), (rid, params)
        # same tokens; the engine decodes the requests finishing together as one batch
        torch.testing.assert_close(done[rid].images, ref.images, atol=1e-5, rtol=0)


def test_a_lone_request_sees_the_logits_of_sample_raster_bit_for_bit(pipe, monkeypatch):
    """The fused layout turns q and k per row after the model's identity turn at image token (0, 0): exactly the
    model's RoPE at each row's position, so a request alone gets sample_raster's logits bit for bit."""
    labels, params = torch.tensor([2, 7]), RasterParams(cfg_scale=3.0, cfg_interval=5, seed=11)
    want: list[torch.Tensor] = []
    sample_raster(pipe.transformer, labels, params, on_step=lambda s: want.append(s.logits_RV.clone()))
    got: list[torch.Tensor] = []
    advance = RasterGeneration.advance

    def recording(self, logits_RV):
        got.append(logits_RV.clone())
        return advance(self, logits_RV)

    monkeypatch.setattr(RasterGeneration, "advance", recording)
    raster_engine(pipe).generate([(labels, params)])
    assert len(got) == len(want) == L
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_unit_is_one_token_of_every_row(pipe):
    engine = raster_engine(pipe)
    a = engine.add_request(torch.tensor([1, 2]), RasterParams(cfg_scale=4.0, cfg_interval=3, seed=0))
    b = engine.add_request(torch.tensor([1, 2, 3]), RasterParams(cfg_scale=1.0, seed=0))
    seqs = {s.request_id: s for s in engine.scheduler.waiting}
    assert seqs[a].rows == 4 and seqs[a].scale_tokens == (1,) * L
    assert seqs[a].unit_rows == (4,) * 5 + (2,) * (L - 5), "token t is guided while t - 1 <= cfg_interval"
    assert seqs[b].rows == 3 and seqs[b].unit_rows == (3,) * L, "unguided: no null rows"
    engine.step()
    assert engine.last_iteration_tokens == 4 + 3 and engine.is_running(a) and engine.is_running(b)


def test_events_come_per_row_with_the_rows_so_far_then_the_images(pipe):
    params = RasterParams(top_k=20, seed=7)
    events = list(raster_engine(pipe).stream(torch.tensor([2, 5]), params, previews=True))
    assert [(e.si, e.num_scales, e.finished) for e in events] == [
        (r, RASTER_GRID, r == RASTER_GRID - 1) for r in range(RASTER_GRID)
    ]
    rows: list[torch.Tensor] = []
    ref = pipe([2, 5], top_k=20, seed=7, output_type="pt", callback_on_rows=lambda r, x: rows.append(x))
    for ev, want in zip(events[:-1], rows):
        torch.testing.assert_close(ev.preview, want, rtol=0, atol=1e-6)
    assert events[-1].preview is None and torch.equal(events[-1].tokens[0], ref.tokens)
    torch.testing.assert_close(events[-1].images, ref.images, rtol=0, atol=1e-6)


def test_requests_at_one_position_with_adjacent_slots_attend_together(pipe):
    engine = raster_engine(pipe)
    ids = [
        engine.add_request(torch.tensor([i]), RasterParams(cfg_interval=0 if i == 1 else -1, seed=i)) for i in range(3)
    ]

    def runs() -> list[int]:
        states = sorted((engine.requests[r].state for r in ids), key=lambda s: s.kv.start)
        return [len(span.slots) for span in RasterRunner._spans(states)]

    engine.step()  # all three admitted together: slots 0-1, 2-3, 4-5, all at position 1
    assert runs() == [3]
    engine.step()  # the middle one's guidance has ended: it feeds 1 of its 2 rows and attends alone
    assert runs() == [1, 1, 1]


def test_abort_frees_the_rows_at_once_and_others_are_unaffected(pipe):
    engine = raster_engine(pipe, kv_cache_mb=0.06, max_images_per_request=3)
    assert engine.pool.rows == engine.scheduler.cfg.max_rows == 7  # a row: 8 KB (k, v x 2 layers x 16 x 2 x 16)
    a = engine.add_request(torch.tensor([1, 2]), RasterParams(seed=1))  # 4 rows
    b = engine.add_request(torch.tensor([3]), RasterParams(seed=2))  # 2 rows
    c = engine.add_request(torch.tensor([4, 5]), RasterParams(seed=3))  # 4 rows: waits for a
    for _ in range(3):
        engine.step()
    assert engine.is_running(a) and not engine.is_running(c) and engine.num_waiting == 1
    assert engine.abort(a)
    assert engine.scheduler.rows_in_use == 2 and len(engine.pool.slots) == 1
    done = {}
    while engine.has_unfinished():
        done.update({e.request_id: e for e in engine.step() if e.finished})
    assert set(done) == {b, c} and not engine.pool.slots
    assert torch.equal(done[c].tokens[0], pipe([4, 5], seed=3, output_type="latent").tokens)


def test_each_family_refuses_the_others_requests(pipe):
    engine = raster_engine(pipe)
    with pytest.raises(InvalidInputError, match="a raster model samples with RasterParams"):
        engine.add_request(torch.tensor([1]), SamplingParams(seed=0))
    with pytest.raises(InvalidInputError, match=r"got RequestPlan \(a VAR plan\)"):
        engine.add_request(torch.tensor([1]), RasterParams(seed=0), plan=RequestPlan.exact(4))
    with pytest.raises(InvalidInputError, match="class labels must be in"):
        engine.add_request(torch.tensor([11]), RasterParams(seed=0))
    with pytest.raises(InvalidInputError, match="explicit seed"):
        engine.add_request(torch.tensor([1]), RasterParams())
    with pytest.raises(InvalidInputError, match="needs a raster tokenizer"):
        RasterFamily(pipe.transformer, pipe.vae)
    var, vae = tiny_pair(0)
    with pytest.raises(InvalidInputError, match="a VAR engine runs a VAR transformer"):
        VARFamily(pipe.transformer, pipe.tokenizer)
    with pytest.raises(InvalidInputError, match="a VAR model samples with SamplingParams"):
        Engine(VARFamily(var, vae)).add_request(torch.tensor([1]), RasterParams(seed=0))


# ---- speculative requests (SJD, GSD, LANTERN, ZipAR, SJD-PAC) -----------------------------------------------------
SPECS = [
    "sjd:window=4",
    "sjd:window=3,init=repeat",
    "mcsjd:window=4",
    "gsd:window=4,dist=60,pdiff=0.2",
    "lantern:window=5,k=20",
    "zipar:window=2",
    "zipar:window=2+mcsjd:window=3",
    "sjd-pac:window=4,tree=3",
    "zipar:window=2+sjd-pac:window=3,tree=2",
]


@pytest.mark.parametrize("seed", range(2))
def test_speculative_requests_equal_the_pipeline_among_exact_ones(pipe, seed):
    """Speculative passes (one call per request, each row at its own position) and one-token units (fused) share
    the pool and the iterations; every request gets the pipeline's tokens for its spec, and a pass advances the
    scheduler by the tokens every image of the request fixed."""
    rng = random.Random(10 + seed)
    cfg = EngineConfig(kv_cache_mb=rng.choice([0.06, 1.0]), max_images_per_request=3)
    engine = Engine(pipe.engine_family(), cfg)
    specs = [None, *SPECS, None, *SPECS]
    rng.shuffle(specs)
    pending = [(*r, spec) for r, spec in zip(random_requests(rng, 8, pipe.num_classes), specs)]
    ids, done, it, events = {}, {}, 0, {}
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= it:
            _, labels, params, first, spec = pending.pop(0)
            plan = None if spec is None else pipe.speculative_plan(spec)
            rid = engine.add_request(torch.tensor(labels), params, first_image_index=first, plan=plan, previews=True)
            ids[rid] = (labels, params, first, spec)
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e.si)
            if e.finished:
                done[e.request_id] = e
        engine.scheduler.check_integrity()
        it += 1
    assert not engine.pool.slots and engine.scheduler.rows_in_use == 0
    for rid, (labels, params, first, spec) in ids.items():
        ref = reference(pipe, labels, params, first, spec)
        assert torch.equal(done[rid].tokens[0], ref.tokens), (rid, spec, params)
        torch.testing.assert_close(done[rid].images, ref.images, atol=1e-5, rtol=0)
        si = events[rid]
        assert si == sorted(set(si)) and si[-1] == RASTER_GRID - 1, (
            "rows complete in order; a pass may complete several"
        )


def test_a_speculative_unit_costs_its_window_and_completes_the_tokens_every_image_fixed(pipe):
    engine = raster_engine(pipe)
    plan = pipe.speculative_plan("sjd:window=6")
    rid = engine.add_request(torch.tensor([1, 2]), RasterParams(cfg_scale=4.0, top_k=1, seed=0), plan=plan)
    seq = engine.scheduler.waiting[0]
    assert seq.rows == 4 and seq.scale_tokens == (6,) * L
    engine.step()
    state = engine.requests[rid].state
    assert engine.last_iteration_tokens == 4 * 6
    assert seq.si == state.t == int(state.decoder.batch.n_NG.min()) >= 1
    passes = 1
    while engine.has_unfinished():
        engine.step()
        passes += 1
    # greedy (top-k 1): every Jacobi redraw is the target's own token, so passes fall well below L
    assert passes < L


def test_aborting_a_speculative_request_frees_its_rows(pipe):
    engine = raster_engine(pipe, kv_cache_mb=0.06, max_images_per_request=3)
    a = engine.add_request(torch.tensor([1, 2]), RasterParams(seed=1), plan=pipe.speculative_plan("sjd:window=3"))
    b = engine.add_request(torch.tensor([3]), RasterParams(seed=2))
    engine.step()
    assert engine.abort(a) and engine.scheduler.rows_in_use == 2 and len(engine.pool.slots) == 1
    done = {}
    while engine.has_unfinished():
        done.update({e.request_id: e for e in engine.step() if e.finished})
    assert set(done) == {b}
    assert torch.equal(done[b].tokens[0], pipe([3], seed=2, output_type="latent").tokens)


def test_a_var_engine_refuses_a_speculative_plan(pipe):
    var, vae = tiny_pair(0)
    with pytest.raises(InvalidInputError, match="a VAR request runs exact or with a RequestPlan"):
        Engine(VARFamily(var, vae)).add_request(
            torch.tensor([1]), SamplingParams(seed=0), plan=pipe.speculative_plan("sjd")
        )
