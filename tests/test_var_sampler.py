"""The fast sampler against the reference loop, and the KV-cached step against teacher forcing."""

import pytest
import torch

from nextscale.engine.kv_cache import KVCache, KVPool
from nextscale.engine.sampling import image_generators
from nextscale.engine.var.params import ForcedTokens, SamplingParams
from nextscale.engine.var.reference import reference_sample
from nextscale.engine.var.sampler import sample_tokens_batch
from nextscale.models.attention import CachedStep

from .conftest import tiny_pair

MODEL_VARIANTS = {
    "default": ({}, {}),
    "shared_aln": (dict(shared_aln=True), {}),
    "no_l2_norm": (dict(attn_l2_norm=False, num_heads=4), {}),
    "long_schedule": ({}, dict(patch_nums=(1, 2, 3, 4, 6, 8), ch_mult=(1, 1, 2))),
    "phi_non_shared": ({}, dict(share_quant_resi=0)),
    "phi_shared": ({}, dict(share_quant_resi=1, quant_resi=-0.5)),
    "no_phi_grey": ({}, dict(quant_resi=0.0, in_channels=1, using_sa=False, using_mid_sa=False)),
}
PARAMS = {
    "greedy": SamplingParams(cfg=4.0, top_k=1, seed=1),
    "topk_topp": SamplingParams(cfg=1.5, top_k=20, top_p=0.9, seed=2),
    "plain": SamplingParams(cfg=0.0, seed=3),
    "smooth": SamplingParams(cfg=3.0, top_k=30, more_smooth=True, seed=4),
}


def run_both(var, vae, labels, params):
    ref = reference_sample(var, vae, labels, params, params.generators(labels.shape[0]))
    fast = sample_tokens_batch(var, vae.quantize, labels, params, params.generators(labels.shape[0]))
    return ref, fast


@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
@pytest.mark.parametrize("pname", sorted(PARAMS))
def test_fast_path_equals_reference_token_for_token(variant, pname):
    var_kw, vae_kw = MODEL_VARIANTS[variant]
    var, vae = tiny_pair(11, var_kw, vae_kw)
    labels = torch.tensor([0, 3, 5, 1])  # 5 = the null class of a 5-class model
    ref, fast = run_both(var, vae, labels, PARAMS[pname])
    assert len(fast.tokens) == len(var.cfg.patch_nums)
    for a, b in zip(ref.tokens, fast.tokens):
        assert torch.equal(a, b)
    assert torch.equal(ref.f_hat_BChw, fast.f_hat_BChw)
    assert all(torch.equal(a, b) for a, b in zip(ref.next_inputs, fast.next_inputs))


def test_official_rng_mode_fast_equals_reference():
    var, vae = tiny_pair(5)
    params = SamplingParams(cfg=2.0, top_k=10, top_p=0.8, seed=9, rng="official")
    ref, fast = run_both(var, vae, torch.tensor([1, 2, 3]), params)
    assert all(torch.equal(a, b) for a, b in zip(ref.tokens, fast.tokens))


def test_sampling_actually_depends_on_seed_and_label():
    var, vae = tiny_pair(3)
    p = SamplingParams(cfg=1.0, seed=0)
    a = sample_tokens_batch(var, vae.quantize, torch.tensor([1, 1]), p, image_generators(0, 2))
    b = sample_tokens_batch(var, vae.quantize, torch.tensor([1, 1]), p, image_generators(1, 2))
    assert not torch.equal(a.tokens[-1][0], a.tokens[-1][1]), "two images of one request differ"
    assert not torch.equal(a.tokens[-1], b.tokens[-1]), "seeds matter"


@pytest.mark.parametrize("variant", ["default", "shared_aln", "no_l2_norm"])
def test_cached_steps_equal_teacher_forcing(variant):
    """Scale by scale through the KV cache gives the same logits as one masked pass over the pyramid."""
    var_kw, vae_kw = MODEL_VARIANTS[variant]
    var, vae = tiny_pair(21, var_kw, vae_kw)
    B = 3
    labels = torch.tensor([0, 2, 4])
    idx = [torch.randint(0, 64, (B, pn * pn), generator=torch.Generator().manual_seed(pn)) for pn in var.cfg.patch_nums]
    with torch.no_grad():
        x_in = vae.quantize.idx_to_var_input(idx)
        full = var(labels, x_in)
        kv = KVCache.for_model(var, rows=B)
        cond = var.condition(labels)
        layout = CachedStep(kv)
        lvl_pos = var.level_pos()
        x = var.first_tokens(cond, lvl_pos)
        pieces = []
        for si in range(len(var.cfg.patch_nums)):
            pieces.append(var.forward_tokens(x, cond, layout))
            kv.check_integrity()
            if si + 1 < len(var.cfg.patch_nums):
                b, e = var.scales.begin_ends[si + 1]
                x = var.next_tokens(si + 1, x_in[:, b - 1 : e - 1], lvl_pos)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=2e-5)
    assert kv.length == var.scales.seq_len


def test_forcing_every_token_reproduces_the_input_tokens():
    var, vae = tiny_pair(8)
    B = 2
    idx = [torch.randint(0, 64, (B, pn * pn), generator=torch.Generator().manual_seed(pn)) for pn in (1, 2, 3, 4)]
    forced = ForcedTokens(idx=idx, keep=[torch.ones_like(i, dtype=torch.bool) for i in idx])
    params = SamplingParams(cfg=2.0, top_k=5, seed=0)
    for out in (
        reference_sample(var, vae, torch.tensor([1, 2]), params, image_generators(0, B), forced),
        sample_tokens_batch(var, vae.quantize, torch.tensor([1, 2]), params, image_generators(0, B), forced),
    ):
        assert all(torch.equal(a, b) for a, b in zip(out.tokens, idx))
        torch.testing.assert_close(out.f_hat_BChw, vae.quantize.idx_to_fhat(idx))


def test_partial_forcing_keeps_exactly_the_kept_positions():
    var, vae = tiny_pair(8)
    idx = [torch.full((1, pn * pn), 7) for pn in (1, 2, 3, 4)]
    keep = [torch.rand(1, pn * pn, generator=torch.Generator().manual_seed(pn)) > 0.5 for pn in (1, 2, 3, 4)]
    st = sample_tokens_batch(
        var,
        vae.quantize,
        torch.tensor([1]),
        SamplingParams(cfg=1.0, seed=0),
        image_generators(0, 1),
        ForcedTokens(idx, keep),
    )
    for tok, k in zip(st.tokens, keep):
        assert (tok[k] == 7).all()


def test_on_scale_callback_sees_every_scale_in_order():
    var, vae = tiny_pair(2)
    seen = []
    sample_tokens_batch(
        var,
        vae.quantize,
        torch.tensor([0]),
        SamplingParams(seed=0),
        image_generators(0, 1),
        on_scale=lambda r: seen.append((r.si, r.idx_Bl.shape[1], r.is_last)),
    )
    assert seen == [(0, 1, False), (1, 4, False), (2, 9, False), (3, 16, True)]


def test_kv_cache_overflow_and_integrity():
    kv = KVCache(KVPool(num_layers=2, rows=1, num_heads=1, head_dim=4, max_len=3))
    kv.write(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    with pytest.raises(AssertionError, match="out of step"):
        kv.check_integrity()
    kv.write(1, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    kv.check_integrity()
    with pytest.raises(RuntimeError, match="overflow"):
        kv.write(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
