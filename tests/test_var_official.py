"""Numerical equality with the official implementation, on the fixtures in tests/fixtures/var-official.

Tolerances are the ones the fixture README suggests for a float32 reimplementation: tokens exact;
latents 1e-5; logits 1e-4 (abs and rel); losses 1e-5 relative; images 1e-4.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nextscale.engine.kv_cache import KVCache
from nextscale.engine.sampling import cfg_double, cfg_labels, cfg_mix, cfg_rows, cfg_weight
from nextscale.engine.var.params import SamplingParams
from nextscale.engine.var.reference import reference_sample
from nextscale.engine.var.sampler import sample_tokens_batch
from nextscale.models.attention import CachedStep
from nextscale.models.scales import phi_index_table

LATENT_TOL, LOGIT_TOL, IMAGE_TOL = 1e-5, 1e-4, 1e-4


def load(fixtures_dir, name):
    return dict(np.load(fixtures_dir / name))


def close(actual: torch.Tensor, expected: np.ndarray, atol: float, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(actual.detach().float().numpy(), expected, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def input_images(fixtures_dir):
    u8 = load(fixtures_dir, "images.npz")["images_u8"]
    return torch.from_numpy(u8).float() / 128 - 1  # the fixture's exact input convention


def test_fixture_files_are_intact(fixtures_dir):
    manifest = json.loads((fixtures_dir / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        digest = hashlib.sha256((fixtures_dir / name).read_bytes()).hexdigest()
        assert digest == info["sha256"], f"{name} differs from the manifest"


def test_phi_table_matches_official(fixtures_dir, official_pair):
    manifest = json.loads((fixtures_dir / "manifest.json").read_text())
    assert list(phi_index_table(10, 4)) == manifest["phi_index_per_scale"] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert list(official_pair[1].quantize.phi_table) == manifest["phi_index_per_scale"]


def test_encode(fixtures_dir, official_pair, input_images):
    _, vae = official_pair
    ref = load(fixtures_dir, "vae_encode.npz")
    with torch.no_grad():
        f = vae.encode(input_images)
        idx_list, fhat_list = vae.quantize.quantize(f)
        close(f, ref["f"], LATENT_TOL)
        for si, idx in enumerate(idx_list):
            np.testing.assert_array_equal(idx.numpy(), ref[f"idx_s{si}"])
        np.testing.assert_array_equal(torch.cat(idx_list, 1).numpy(), ref["idx_all"])
        close(torch.stack(fhat_list), ref["fhat_per_scale"], LATENT_TOL)
        close(vae.img_to_recon(input_images), ref["recon"], IMAGE_TOL)
        close(vae.quantize.idx_to_var_input(idx_list), ref["x_BLCv_wo_first_l"], LATENT_TOL)


def split_scales(idx_all: np.ndarray, patch_nums) -> list[torch.Tensor]:
    out, cur = [], 0
    for pn in patch_nums:
        out.append(torch.from_numpy(idx_all[:, cur : cur + pn * pn]))
        cur += pn * pn
    return out


def test_decode(fixtures_dir, official_pair):
    _, vae = official_pair
    ref = load(fixtures_dir, "vae_decode.npz")
    idx_list = split_scales(ref["idx_all"], vae.cfg.patch_nums)
    with torch.no_grad():
        ms_h = [vae.quantize.embed_map(i) for i in idx_list]
        close(torch.stack(vae.quantize.embed_to_fhat(ms_h)), ref["fhat_per_scale"], LATENT_TOL)
        close(vae.quantize.embed_to_fhat_progressive(ms_h), ref["fhat_not_max_scale_last"], LATENT_TOL)
        close(vae.idx_to_img(idx_list), ref["image"], IMAGE_TOL)


def test_teacher_forcing_logits_and_loss(fixtures_dir, official_pair):
    var, _ = official_pair
    ref = load(fixtures_dir, "var_teacher_forcing.npz")
    with torch.no_grad():
        logits = var(torch.from_numpy(ref["labels"]), torch.from_numpy(ref["x_BLCv_wo_first_l"]))
    assert logits.shape == (2, 680, 4096) and logits.dtype == torch.float32
    close(logits[:, ref["pos_sel"]], ref["logits_sel"], LOGIT_TOL, LOGIT_TOL)
    close(logits.max(-1).values, ref["logits_max"], LOGIT_TOL, LOGIT_TOL)
    close(torch.logsumexp(logits, -1), ref["logits_logsumexp"], LOGIT_TOL, LOGIT_TOL)
    close(logits.mean(-1), ref["logits_mean"], LOGIT_TOL, LOGIT_TOL)
    close(logits.double().square().sum(-1), ref["logits_sumsq"], LOGIT_TOL, LOGIT_TOL)
    top2 = logits.topk(2, -1).values
    close(top2[..., 0] - top2[..., 1], ref["logits_top2_margin"], LOGIT_TOL, LOGIT_TOL)
    decisive = ref["logits_top2_margin"] > 10 * LOGIT_TOL
    assert decisive.mean() > 0.99
    np.testing.assert_array_equal(logits.argmax(-1).numpy()[decisive], ref["logits_argmax"][decisive])
    gt = torch.from_numpy(ref["gt_idx"])
    for ls, key in ((0.0, "loss_ls0"), (0.1, "loss_ls0p1")):
        ce = F.cross_entropy(logits.reshape(-1, 4096), gt.reshape(-1), label_smoothing=ls, reduction="none")
        loss = ce.view(2, -1).mul(1 / 680).sum(-1).mean()  # the official trainer's weighting
        np.testing.assert_allclose(loss.item(), float(ref[key]), rtol=1e-5)


SAMPLERS = {
    "reference": lambda var, vae, *a: reference_sample(var, vae, *a),
    "fast": lambda var, vae, *a: sample_tokens_batch(var, vae.quantize, *a),
}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_greedy_sampling_run(fixtures_dir, official_pair, sampler):
    var, vae = official_pair
    ref = load(fixtures_dir, "var_sample_greedy.npz")
    labels = torch.from_numpy(ref["labels"])
    params = SamplingParams(
        cfg=float(ref["cfg"]),
        top_k=int(ref["top_k"]),
        top_p=float(ref["top_p"]),
        seed=int(ref["g_seed"]),
        rng="official",
    )
    out = SAMPLERS[sampler](var, vae, labels, params, params.generators(len(labels)))
    for si, idx in enumerate(out.tokens):
        np.testing.assert_array_equal(idx.numpy(), ref[f"idx_s{si}"])
    close(torch.cat(out.next_inputs, 1), ref["next_scale_inputs"], LATENT_TOL)
    close(out.f_hat_BChw, ref["fhat_final"], LATENT_TOL)
    with torch.no_grad():
        close(vae.decode_images(out.f_hat_BChw), ref["image"], IMAGE_TOL)


@pytest.mark.parametrize("path", ["teacher_forcing", "kv_cached_steps"])
def test_guided_logits_on_sampler_inputs(fixtures_dir, official_pair, path):
    """The official sampler's guided logits of the first four scales (README check), recomputed on its own inputs
    by one masked teacher-forcing pass, and scale by scale through the KV cache as the samplers run."""
    var, _ = official_pair
    ref = load(fixtures_dir, "var_sample_greedy.npz")
    x_BLCv = torch.from_numpy(ref["next_scale_inputs"])
    labels = torch.from_numpy(ref["labels"])
    S, num = var.scales.num_scales, 4
    L = var.scales.begin_ends[num - 1][1]  # 30 tokens: scales 0..3
    with torch.no_grad():
        if path == "teacher_forcing":
            logits_RLV = torch.cat([var(labels, x_BLCv)[:, :L], var(torch.full_like(labels, 1000), x_BLCv)[:, :L]])
        else:
            rows = cfg_labels(labels, var.num_classes)
            cond, lvl_pos = var.condition(rows), var.level_pos()
            layout = CachedStep(KVCache.for_model(var, rows=cfg_rows(len(labels))))
            x_RlC, pieces = var.first_tokens(cond, lvl_pos), []
            for si in range(num):
                pieces.append(var.forward_tokens(x_RlC, cond, layout))
                b, e = var.scales.begin_ends[si + 1]
                x_RlC = cfg_double(var.next_tokens(si + 1, x_BLCv[:, b - 1 : e - 1], lvl_pos))
            logits_RLV = torch.cat(pieces, 1)
    t = torch.tensor([cfg_weight(4.0, int(s), S) for s in var.lvl_1L[0, :L]]).view(1, L, 1)
    close(cfg_mix(logits_RLV, t), ref["cfg_logits_first_scales"], LOGIT_TOL, LOGIT_TOL)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_topk_topp_run_with_torch_cpu_rng(fixtures_dir, official_pair, sampler):
    var, vae = official_pair
    ref = load(fixtures_dir, "var_sample_topk_torchrng.npz")
    params = SamplingParams(cfg=1.5, top_k=900, top_p=0.95, seed=0, rng="official")
    out = SAMPLERS[sampler](var, vae, torch.tensor([980, 437]), params, params.generators(2))
    np.testing.assert_array_equal(torch.cat(out.tokens, 1).numpy(), ref["idx_all"])
    close(out.f_hat_BChw, ref["fhat_final"], LATENT_TOL)
