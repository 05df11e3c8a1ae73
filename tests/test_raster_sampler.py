"""Raster (LlamaGen) sampling on tiny random models: the fast loop equals the reference token for token, images
do not depend on their batch, the multi-token cached forward equals teacher forcing, parameters are validated.

The official fixtures (tests/test_llamagen_official.py) pin both loops to the official ``generate()``; these tests
cover what the fixtures cannot: per-image RNG, top-p, temperature, GQA, cached windows of several tokens.
"""

from __future__ import annotations

import pytest
import torch

from nextscale.engine.kv_cache import ConcatKVCache, KVCache
from nextscale.engine.raster.sampler import (
    RasterParams,
    RasterStep,
    cfg_guide,
    filter_logits_,
    mask_top_p_raster_,
    reference_sample_raster,
    sample_raster,
)
from nextscale.errors import ConfigError, InvalidInputError
from nextscale.models.llamagen import CachedCausal, LlamaGen, LlamaGenConfig, rope_table_2d

from .conftest import tiny_llamagen

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> LlamaGen:
    return tiny_llamagen(0)


@pytest.fixture(scope="module")
def gqa_model() -> LlamaGen:
    return tiny_llamagen(1, dim=64, n_head=4, n_kv_head=2)


LABELS = torch.tensor([3, 7, 1])


# ---- model ------------------------------------------------------------------------------------------------------
def test_rope_table_zeroes_the_class_token_and_follows_the_grid():
    table = rope_table_2d(grid=4, head_dim=16, base=10000.0)
    assert table.shape == (17, 8, 2) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(8, 2))  # class token: cos = sin = 0, not an identity rotation
    freqs = 10000.0 ** (-4 * torch.arange(4).float() / 16)
    for k in (0, 5, 15):  # image token k at position k + 1: rows by the first 4 pairs, columns by the last 4
        r, c = divmod(k, 4)
        ang = torch.cat((r * freqs, c * freqs))
        torch.testing.assert_close(table[k + 1, :, 0], torch.cos(ang))
        torch.testing.assert_close(table[k + 1, :, 1], torch.sin(ang))


@pytest.mark.parametrize("which", ["model", "gqa_model"])
def test_cached_windows_equal_teacher_forcing(request, which):
    """Prefill the class token, then windows of 1, 3, 7, ... tokens with a causal mask inside each window
    (what a speculative loop verifies) reproduce the one-pass causal logits."""
    m: LlamaGen = request.getfixturevalue(which)
    idx = torch.randint(0, m.vocab_size, (3, 36), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(idx, LABELS)
        assert full.shape == (3, 37, m.vocab_size) and full.dtype == torch.float32
        for kv in (KVCache.for_model(m, 3, max_len=37), ConcatKVCache(m.n_layer)):
            parts = [m.forward_tokens(m.embed_classes(LABELS), CachedCausal(kv, 0))]
            pos = 1
            for l in (1, 3, 7, 11, 14):
                parts.append(m.forward_tokens(m.embed_tokens(idx[:, pos - 1 : pos - 1 + l]), CachedCausal(kv, pos)))
                pos += l
            torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-5)


def test_gqa_cache_holds_only_the_kv_heads(gqa_model):
    kv = KVCache.for_model(gqa_model, rows=2)
    assert kv.pool.k[0].shape == (2, 2, 36, 16)  # [rows, n_kv_head, L, head_dim]


def test_config_validation_and_presets():
    cfg = LlamaGenConfig.official("GPT-L", image_size=384)
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.head_dim) == (1024, 24, 16, 64)
    assert (cfg.grid_size, cfg.seq_len, cfg.num_positions, cfg.ffn_hidden) == (24, 576, 577, 2816)
    assert LlamaGenConfig.official("GPT-3B").head_dim == 100
    assert LlamaGenConfig.official("GPT-B").ffn_hidden == 2048
    with pytest.raises(ConfigError, match="multiple of 4"):
        LlamaGenConfig(dim=30, n_head=5)
    with pytest.raises(ConfigError, match="n_kv_head"):
        LlamaGenConfig(dim=64, n_head=4, n_kv_head=3)
    with pytest.raises(ConfigError, match="unknown LlamaGen model"):
        LlamaGenConfig.official("GPT-Z")


# ---- sampling -----------------------------------------------------------------------------------------------------
SAMPLING_CASES = {
    "topk-per-image": RasterParams(cfg_scale=2.5, top_k=50, seed=11),
    "topk-topp-temp-interval": RasterParams(
        cfg_scale=3.0, cfg_interval=12, temperature=1.3, top_k=100, top_p=0.9, seed=12
    ),
    "official-stream": RasterParams(cfg_scale=2.0, top_k=200, top_p=0.95, seed=13, rng="official"),
    "unguided": RasterParams(cfg_scale=1.0, top_k=0, temperature=0.8, seed=14),
}


@pytest.mark.parametrize(
    "which, case",
    [("model", case) for case in sorted(SAMPLING_CASES)]
    + [("gqa_model", "topk-per-image"), ("gqa_model", "official-stream")],
)
def test_fast_equals_reference_token_for_token(request, which, case):
    m: LlamaGen = request.getfixturevalue(which)
    params = SAMPLING_CASES[case]
    ref = reference_sample_raster(m, LABELS, params)
    fast = sample_raster(m, LABELS, params)
    assert ref.tokens_BL.shape == (3, 36) and ref.tokens_BL.dtype == torch.long
    assert torch.equal(fast.tokens_BL, ref.tokens_BL)
    assert fast.stats["forward_passes"] == ref.stats["forward_passes"] == 36
    assert fast.stats["guided_steps"] == ref.stats["guided_steps"]
    # The draws really are random: several distinct tokens per image, not just the argmax.
    assert all(len(set(row.tolist())) > 10 for row in fast.tokens_BL)


def test_fast_path_drops_the_null_rows_after_the_cfg_interval(model):
    params = RasterParams(cfg_scale=3.0, cfg_interval=20, top_k=1, seed=0)
    ref, fast = reference_sample_raster(model, LABELS, params), sample_raster(model, LABELS, params)
    assert ref.stats["guided_steps"] == fast.stats["guided_steps"] == 22  # token 0, then decode steps 0..20
    assert ref.stats["row_tokens"] == 2 * 36  # the official loop keeps computing the null half
    assert fast.stats["row_tokens"] == 22 * 2 + (36 - 22)
    assert torch.equal(ref.tokens_BL, fast.tokens_BL)


@pytest.mark.parametrize("sampler", [sample_raster, reference_sample_raster])
def test_image_does_not_depend_on_its_batch(model, sampler):
    params = RasterParams(cfg_scale=2.0, top_k=100, top_p=0.95, seed=21)
    batch = sampler(model, LABELS, params).tokens_BL
    for i in range(3):
        alone = sampler(model, LABELS[i : i + 1], params, params.generators(1, start=i)).tokens_BL
        assert torch.equal(alone[0], batch[i]), f"image {i} changed with its batch"
    other_seed = sampler(model, LABELS, RasterParams(cfg_scale=2.0, top_k=100, top_p=0.95, seed=22)).tokens_BL
    assert not torch.equal(other_seed, batch)


def test_on_step_sees_the_logits_the_sampler_used(model):
    seen: list[RasterStep] = []
    params = RasterParams(cfg_scale=2.0, cfg_interval=5, top_k=1, seed=0)
    res = sample_raster(model, LABELS, params, on_step=seen.append)
    assert [s.t for s in seen] == list(range(36))
    assert [s.guided for s in seen] == [t <= 6 for t in range(36)]
    assert seen[0].logits_RV.shape == (6, model.vocab_size) and seen[10].logits_RV.shape == (3, model.vocab_size)
    torch.testing.assert_close(seen[3].logits_BV, cfg_guide(seen[3].logits_RV, 2.0))
    greedy = torch.stack([s.logits_BV.argmax(-1) for s in seen], 1)
    assert torch.equal(greedy, res.tokens_BL)  # top_k = 1 is greedy on the logits handed to the sampler


def test_filters_follow_the_official_semantics():
    logits = torch.tensor([[4.0, 3.0, 3.0, 1.0, 0.0]])
    kept = filter_logits_(logits.clone(), 1.0, 2, 1.0).isfinite()
    assert kept.tolist() == [[True, True, True, False, False]]  # top-k keeps ties at the threshold
    assert filter_logits_(logits.clone(), 1.0, 99, 1.0).isfinite().all()  # k clamped to V
    # top-p: keep the first token whose cumulative probability crosses top_p, drop the rest.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert mask_top_p_raster_(probs.log(), 0.7).isfinite().tolist() == [[True, True, False, False]]
    # (not 0.8: 0.5 + 0.3 lands on either side of 0.8 depending on the kernel level's rounding of softmax/cumsum)
    assert mask_top_p_raster_(probs.log(), 0.85).isfinite().tolist() == [[True, True, True, False]]
    assert mask_top_p_raster_(probs.log(), 0.0).isfinite().tolist() == [[True, False, False, False]]
    torch.testing.assert_close(filter_logits_(logits.clone(), 0.0, 0, 1.0), logits / 1e-5)  # temperature floor
    params = RasterParams(cfg_scale=4.0, cfg_interval=127)
    assert [params.guided_at(t) for t in (0, 127, 128, 129, 255)] == [True, True, True, False, False]
    assert not RasterParams(cfg_scale=1.0).guided_at(0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(top_k=-1), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(rng="global"), "rng"),
        (dict(seed=-3), "seed"),
    ],
)
def test_bad_params_are_one_line_errors(kw, match):
    with pytest.raises(InvalidInputError, match=match) as err:
        RasterParams(**kw)
    assert "\n" not in str(err.value)


def test_bad_requests_are_refused(model):
    with pytest.raises(InvalidInputError, match="seed"):
        sample_raster(model, LABELS, RasterParams())
    with pytest.raises(InvalidInputError, match=r"\[0, 10\]"):
        sample_raster(model, torch.tensor([3, 11]), RasterParams(seed=0))
    with pytest.raises(ValueError, match="one generator per image"):
        params = RasterParams(seed=0)
        sample_raster(model, LABELS, params, params.generators(2))
