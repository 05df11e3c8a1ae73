"""Numerical equality with the official LlamaGen implementation, on the fixtures in llamagen-official, and the
loader's handling of official files (dict layouts, weights_only, strict keys).

Tolerances are the ones the fixture README suggests: tokens and encode indices exact; latents 1e-5; logits
1e-4 (abs and rel), compared by argmax only where the stored top-1/top-2 margin exceeds 1e-3; images 1e-4, image
sums per pixel 1e-5; the training loss 1e-5 relative; sampled probabilities 1e-3 relative.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nextscale.engine.raster.sampler import (
    RasterParams,
    RasterStep,
    filter_logits_,
    reference_sample_raster,
    sample_raster,
)
from nextscale.errors import CheckpointError
from nextscale.models.llamagen_weights import (
    check_llamagen_pair,
    default_n_head,
    image_size_from_name,
    infer_llamagen_config,
    load_llamagen_gpt,
    load_llamagen_vq,
)
from nextscale.models.tokenizers.vq import VQConfig, VQModel

from .conftest import tiny_llamagen

LATENT_TOL, LOGIT_TOL, IMAGE_TOL, SUM_TOL, MARGIN = 1e-5, 1e-4, 1e-4, 1e-5, 1e-3
# The official implementation's outputs, copied unchanged from shared/fixtures/llamagen-official (README there).
FIXTURES = Path(__file__).parent / "fixtures" / "llamagen-official"


def _require_fixtures() -> None:
    if not (FIXTURES / "manifest.json").is_file():
        pytest.fail(f"llamagen-official fixtures missing under {FIXTURES}")


needs_fixtures = pytest.mark.usefixtures("llamagen_fixtures")


@pytest.fixture(scope="session")
def llamagen_fixtures() -> Path:
    _require_fixtures()
    return FIXTURES


pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str) -> dict[str, np.ndarray]:
    assert FIXTURES is not None
    return dict(np.load(FIXTURES / name))


def close(actual: torch.Tensor, expected: np.ndarray, atol: float, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def gpt():
    assert FIXTURES is not None
    model, _ = load_llamagen_gpt(FIXTURES / "c2i_tiny_256.pt", n_head=2)  # head dim 16: not in any shape
    return model


@pytest.fixture(scope="module")
def vq():
    assert FIXTURES is not None
    model, _ = load_llamagen_vq(FIXTURES / "vq_ds16_c2i_tiny.pt")
    return model


def check_logit_summaries(logits: torch.Tensor, ref: dict[str, np.ndarray], prefix: str, full: bool = True) -> None:
    """The fixture's per-row summaries of logits [..., V]: values to 1e-4, argmax where it is decisive."""
    top2 = logits.topk(2, dim=-1).values
    close(logits.max(-1).values, ref[f"{prefix}_max"], LOGIT_TOL, LOGIT_TOL)
    close(torch.logsumexp(logits, -1), ref[f"{prefix}_logsumexp"], LOGIT_TOL, LOGIT_TOL)
    close(logits.double().square().sum(-1), ref[f"{prefix}_sumsq"], LOGIT_TOL, LOGIT_TOL)
    margin = (top2[..., 0] - top2[..., 1]).numpy()
    if f"{prefix}_top2_margin" in ref:
        close(torch.from_numpy(margin), ref[f"{prefix}_top2_margin"], LOGIT_TOL, LOGIT_TOL)
        margin = ref[f"{prefix}_top2_margin"]
    # (cond/uncond store no margin: ours is within 1e-4 of theirs, so it tells which argmaxes are decisive.)
    decisive = margin > MARGIN
    assert decisive.mean() > 0.95
    np.testing.assert_array_equal(logits.argmax(-1).numpy()[decisive], ref[f"{prefix}_argmax"][decisive])
    if not full:
        return
    close(logits.double().mean(-1), ref[f"{prefix}_mean"], LOGIT_TOL, LOGIT_TOL)
    close(logits.topk(8, dim=-1).values, ref[f"{prefix}_top8_val"], LOGIT_TOL, LOGIT_TOL)
    # The official top-8 tokens carry the official top-8 values here too (robust to near-ties in the order).
    close(
        logits.gather(-1, torch.from_numpy(ref[f"{prefix}_top8_idx"])), ref[f"{prefix}_top8_val"], LOGIT_TOL, LOGIT_TOL
    )
    close(logits[..., ::1024], ref[f"{prefix}_stride1024"], LOGIT_TOL, LOGIT_TOL)


def check_image_summaries(img: torch.Tensor, ref: dict[str, np.ndarray], prefix: str) -> None:
    hw = img.shape[-2] * img.shape[-1]
    close(img.double().sum((2, 3)) / hw, ref[f"{prefix}_sum"] / hw, SUM_TOL)
    close(img.double().square().sum((2, 3)) / hw, ref[f"{prefix}_sumsq"] / hw, SUM_TOL)
    close(img[..., :16, :16], ref[f"{prefix}_crop_tl"], IMAGE_TOL)
    close(img[..., -16:, -16:], ref[f"{prefix}_crop_br"], IMAGE_TOL)


# ---- fixture integrity and config -----------------------------------------------------------------------------------
@needs_fixtures
def test_fixture_files_are_intact():
    assert FIXTURES is not None
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        digest = hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest()
        assert digest == info["sha256"], f"{name} differs from the manifest"


@needs_fixtures
def test_config_is_inferred_from_the_official_files(gpt, vq):
    c = gpt.cfg
    assert (c.dim, c.n_layer, c.n_head, c.kv_heads, c.head_dim, c.ffn_hidden) == (32, 2, 2, 2, 16, 256)
    assert (c.vocab_size, c.num_classes, c.null_class, c.image_size, c.grid_size) == (16384, 1000, 1000, 256, 16)
    v = vq.cfg
    assert (v.ch, v.ch_mult, v.decoder_ch_mult, v.num_res_blocks, v.z_channels) == (
        32,
        (1, 1, 2, 2, 4),
        (1, 1, 2, 2, 4),
        2,
        32,
    )
    assert (v.codebook_size, v.codebook_embed_dim, v.codebook_l2_norm, v.codebook_show_usage) == (16384, 8, True, True)
    assert v.downsample == 16
    check_llamagen_pair(gpt.cfg, vq.cfg)
    # The stored codebook rows are not unit length: only normalising on use matches the official quantiser.
    norms = vq.quantize.embedding.weight.norm(dim=-1)
    assert norms.min() < 0.9 and norms.max() > 1.1
    torch.testing.assert_close(vq.quantize.codebook().norm(dim=-1), torch.ones(16384))


# ---- VQ tokenizer -----------------------------------------------------------------------------------------------
@needs_fixtures
def test_vq_encode(vq):
    ref = load("vq_encode.npz")
    x = torch.from_numpy(load("images.npz")["images_u8"]).float() / 128 - 1  # the fixture's exact input
    with torch.no_grad():
        h = vq.encode_latent(x)
        close(h, ref["h"], LATENT_TOL)
        quant, idx_Bhw = vq.quantize(h)
        np.testing.assert_array_equal(idx_Bhw.flatten(1).numpy(), ref["indices"])
        close(quant, ref["quant"], LATENT_TOL)
        d = vq.quantize.distances(h.permute(0, 2, 3, 1).reshape(-1, 8)).topk(2, dim=-1, largest=False).values
        close(d[:, 0].view(2, 256), ref["nn_dist"], LATENT_TOL)
        close((d[:, 1] - d[:, 0]).view(2, 256), ref["nn_margin"], LATENT_TOL)
        np.testing.assert_array_equal(vq.encode(x).numpy(), ref["indices"])
        check_image_summaries(vq.decode_latent(quant), ref, "recon")


@needs_fixtures
def test_vq_decode(vq):
    ref = load("vq_decode.npz")
    idx = torch.from_numpy(ref["indices"])
    _, _, h, w = (int(s) for s in ref["qzshape"])
    with torch.no_grad():
        close(vq.quantize.lookup(idx, h, w), ref["quant"], LATENT_TOL)
        close(vq.decode(idx), ref["image"], IMAGE_TOL)


# ---- GPT ----------------------------------------------------------------------------------------------------------
@needs_fixtures
def test_teacher_forcing_logits_and_loss(gpt):
    ref = load("gpt_teacher_forcing.npz")
    idx, labels = torch.from_numpy(ref["idx"]), torch.from_numpy(ref["labels"])
    with torch.no_grad():
        logits = gpt(idx, labels)
    assert logits.shape == (2, 257, 16384) and logits.dtype == torch.float32
    check_logit_summaries(logits, ref, "logits")
    loss = F.cross_entropy(logits[:, :256].reshape(-1, 16384), idx.reshape(-1))  # the official training call
    np.testing.assert_allclose(loss.item(), float(ref["train_style_loss"]), rtol=1e-5)


SAMPLERS = {"reference": reference_sample_raster, "fast": sample_raster}


def fixture_params(ref: dict[str, np.ndarray], prefix: str = "") -> RasterParams:
    return RasterParams(
        cfg_scale=float(ref[f"{prefix}cfg_scale"]),
        cfg_interval=float(ref[f"{prefix}cfg_interval"]),
        temperature=float(ref.get(f"{prefix}temperature", 1.0)),
        top_k=int(ref.get(f"{prefix}top_k", 1)),
        top_p=float(ref.get(f"{prefix}top_p", 1.0)),
        seed=int(ref.get(f"{prefix}seed", 0)),
        rng="official",
    )


@needs_fixtures
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_greedy_sampling_run(gpt, vq, sampler):
    ref = load("gpt_sample_greedy.npz")
    steps: list[RasterStep] = []
    res = SAMPLERS[sampler](gpt, torch.from_numpy(ref["labels"]), fixture_params(ref), on_step=steps.append)
    np.testing.assert_array_equal(res.tokens_BL.numpy(), ref["tokens"])
    assert res.stats["forward_passes"] == 256 and res.stats["guided_steps"] == 256
    guided = torch.stack([s.logits_BV for s in steps], dim=1)  # [2, 256, V]: step t produces token t
    check_logit_summaries(guided, ref, "guided")
    rows = torch.stack([s.logits_RV for s in steps], dim=1)  # [4, 256, V]: conditional rows first
    check_logit_summaries(rows[:2], ref, "cond", full=False)
    check_logit_summaries(rows[2:], ref, "uncond", full=False)
    if sampler == "fast":
        with torch.no_grad():
            check_image_summaries(vq.decode(res.tokens_BL), ref, "image")


@needs_fixtures
@pytest.mark.parametrize("run", ["cfg_interval_run", "nocfg_run"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_greedy_variants(gpt, sampler, run):
    ref = load("gpt_sample_greedy_variants.npz")
    params = fixture_params(ref, f"{run}_")
    steps: list[RasterStep] = []
    res = SAMPLERS[sampler](gpt, torch.from_numpy(ref["labels"]), params, on_step=steps.append)
    np.testing.assert_array_equal(res.tokens_BL.numpy(), ref[f"{run}_tokens"])
    top2 = torch.stack([s.logits_BV for s in steps], dim=1).topk(2, dim=-1).values
    close(top2[..., 0] - top2[..., 1], ref[f"{run}_top2_margin"], LOGIT_TOL, LOGIT_TOL)
    if run == "cfg_interval_run":  # tokens 0..128 guided, the rest from the conditional logits
        assert [s.guided for s in steps] == [t <= 128 for t in range(256)]
        greedy = load("gpt_sample_greedy.npz")["tokens"]
        np.testing.assert_array_equal(res.tokens_BL.numpy()[:, :129], greedy[:, :129])
    else:  # no null rows at all
        assert steps[0].logits_RV.shape == (2, 16384) and not any(s.guided for s in steps)


@needs_fixtures
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_topk_sampling_with_the_official_rng_stream(gpt, sampler):
    """torch.manual_seed(1234) + generate(cfg 2.0, top_k 1000): the same 512 draws from the same CPU stream."""
    ref = load("gpt_sample_topk_torchrng.npz")
    params = fixture_params(ref)
    assert (params.top_k, params.cfg_scale, params.seed) == (1000, 2.0, 1234)
    steps: list[RasterStep] = []
    res = SAMPLERS[sampler](gpt, torch.from_numpy(ref["labels"]), params, on_step=steps.append)
    np.testing.assert_array_equal(res.tokens_BL.numpy(), ref["tokens"])
    guided = torch.stack([s.logits_BV for s in steps], dim=1)
    tok = res.tokens_BL.unsqueeze(-1)
    rank = (guided > guided.gather(-1, tok)).sum(-1)
    np.testing.assert_array_equal(rank.numpy(), ref["sampled_rank"])
    probs = filter_logits_(guided.clone(), 1.0, 1000, 1.0).softmax(-1).gather(-1, tok).squeeze(-1)
    close(probs, ref["sampled_prob"], 0.0, 1e-3)
    # Per-image streams draw other tokens (the run really depends on the RNG).
    per_image = sample_raster(gpt, torch.from_numpy(ref["labels"]), RasterParams(cfg_scale=2.0, top_k=1000, seed=1234))
    assert (per_image.tokens_BL.numpy() != ref["tokens"]).mean() > 0.5


# ---- loading official files ----------------------------------------------------------------------------------------
def tiny_vq() -> VQModel:
    cfg = VQConfig(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), z_channels=8, num_res_blocks=1)
    return VQModel(cfg).eval()


LAYOUTS = {
    "ddp": lambda sd: {"model": sd},
    "ddp-training": lambda sd: {"model": sd, "optimizer": {"state": {}}, "steps": 1000},
    "deepspeed": lambda sd: {"module": sd},
    "state_dict": lambda sd: {"state_dict": sd},
    "fsdp-bare": lambda sd: sd,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gpt_loads_from_every_official_layout(tmp_path, layout):
    model = tiny_llamagen(5, n_head=4, dim=64, n_kv_head=2)  # a 96 px model (6x6 grid)
    path = tmp_path / "c2i_T_384.pt"
    torch.save(LAYOUTS[layout](model.state_dict()), path)
    _, cfg = load_llamagen_gpt(path, n_head=4)
    assert cfg == dataclasses.replace(model.cfg, image_size=384)  # the size comes from the file name
    loaded, cfg = load_llamagen_gpt(path, n_head=4, image_size=96)  # ... unless given
    assert cfg == model.cfg and cfg.n_kv_head == 2  # GQA inferred from the wqkv rows
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    idx = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, torch.tensor([1])), model(idx, torch.tensor([1])), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["ddp", "fsdp-bare"])
def test_vq_loads_from_official_layouts(tmp_path, layout):
    model = tiny_vq()
    path = tmp_path / "vq.pt"
    torch.save(LAYOUTS[layout](model.state_dict()), path)
    loaded, cfg = load_llamagen_vq(path)
    assert cfg == model.cfg
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)


def one_line_error(path: Path, loader, **kw) -> str:
    with pytest.raises(CheckpointError) as err:
        loader(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_strict_keys_name_the_missing_and_unexpected_ones(tmp_path):
    sd = tiny_llamagen(6).state_dict()
    path = tmp_path / "gpt.pt"
    torch.save({"model": {k: v for k, v in sd.items() if k != "layers.1.ffn_norm.weight"}}, path)
    assert "missing" in (msg := one_line_error(path, load_llamagen_gpt, n_head=2)) and "layers.1.ffn_norm.weight" in msg
    torch.save({"model": {k: v for k, v in sd.items() if k != "norm.weight"}}, path)
    assert "norm.weight" in one_line_error(path, load_llamagen_gpt, n_head=2)
    torch.save({"model": {**sd, "layers.0.attention.wq_bias": torch.zeros(32)}}, path)
    msg = one_line_error(path, load_llamagen_gpt, n_head=2)
    assert "unexpected" in msg and "layers.0.attention.wq_bias" in msg
    torch.save({"model": {**sd, "output.weight": torch.zeros(512, 16)}}, path)
    assert "output.weight" in one_line_error(path, load_llamagen_gpt, n_head=2)
    # Derived state some code versions save (RoPE table, the mask and caches after generate()) is ignored.
    extra = {"freqs_cis": torch.zeros(37, 8, 2), "layers.0.attention.kv_cache.k_cache": torch.zeros(2, 2, 40, 16)}
    torch.save({"model": {**sd, **extra}}, path)
    load_llamagen_gpt(path, n_head=2)

    vq_sd = tiny_vq().state_dict()
    torch.save({"model": {k: v for k, v in vq_sd.items() if k != "decoder.mid.1.q.bias"}}, path)
    assert "decoder.mid.1.q.bias" in one_line_error(path, load_llamagen_vq)
    torch.save({"model": {**vq_sd, "quantize.ema_count": torch.zeros(64)}}, path)
    assert "quantize.ema_count" in one_line_error(path, load_llamagen_vq)


def test_wrong_files_and_pickles_are_refused(tmp_path):
    gpt_path, vq_path = tmp_path / "gpt.pt", tmp_path / "vq.pt"
    torch.save({"model": tiny_llamagen(7).state_dict()}, gpt_path)
    torch.save({"model": tiny_vq().state_dict()}, vq_path)
    assert "not the VQ tokenizer" in one_line_error(gpt_path, load_llamagen_vq)
    assert "not the GPT" in one_line_error(vq_path, load_llamagen_gpt)
    assert "n_head" in one_line_error(gpt_path, load_llamagen_gpt, n_head=3)
    # A training checkpoint with its argparse Namespace: refused by weights_only, said in one line.
    torch.save({"model": tiny_llamagen(7).state_dict(), "args": argparse.Namespace(lr=1e-4)}, gpt_path)
    assert "weights_only" in one_line_error(gpt_path, load_llamagen_gpt, n_head=2)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in one_line_error(tmp_path / "empty.pt", load_llamagen_gpt)
    assert "no such file" in one_line_error(tmp_path / "nope.pt", load_llamagen_gpt)


def test_unknown_shapes_default_to_the_release_conventions():
    assert [default_n_head(d) for d in (768, 1024, 1280, 1536, 3200, 512)] == [12, 16, 20, 24, 32, 8]
    assert [image_size_from_name(n) for n in ("c2i_B_256.pt", "c2i_XL_384.pt", "consolidated.pth")] == [256, 384, None]
    sd = tiny_llamagen(8, dim=64, n_head=4).state_dict()
    cfg = infer_llamagen_config(sd)  # width 64 -> one head of 64; image 256 by default
    assert (cfg.n_head, cfg.n_kv_head, cfg.image_size) == (1, None, 256)
    cfg = infer_llamagen_config(sd, n_head=4, image_size=96)
    assert (cfg.n_head, cfg.head_dim, cfg.seq_len) == (4, 16, 36)
