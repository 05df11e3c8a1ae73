"""Raster training (``nextscale train --arch llamagen``): a LlamaGen GPT on a single-scale tokenizer learns, resumes
bit-identically, exports a folder ``LlamaGenPipeline`` samples from, drops conditions by the stated rule, and
refuses bad settings in one line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nextscale.config import VQVAEConfig
from nextscale.errors import ConfigError
from nextscale.models.native_var import load_tokenizer, save_tokenizer
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.pipelines.raster import LlamaGenPipeline
from nextscale.pipelines.registry import family_of_folder
from nextscale.train import dist
from nextscale.train.config import LlamaGenTrainConfig, VAETrainConfig, VARTrainConfig
from nextscale.train.metrics_log import read_metrics
from nextscale.train.runner import run_training

from .helpers import IMAGE_FOLDER_CLASSES, make_image_folder

VOCAB = 32
VAE_KW = dict(
    image_size=16,
    vocab_size=VOCAB,
    z_channels=8,
    ch=32,
    ch_mult=(1, 2),
    patch_nums=(8,),  # ONE scale: a plain VQ-VAE, 8x8 raster grid of 64 tokens
    batch_size=8,
    steps=4,
    lr=2e-3,
    log_every=2,
    eval_every=100,
    ckpt_every=100,
    progress=False,
)
GPT_KW = dict(
    depth=2,
    embed_dim=32,
    num_heads=2,
    batch_size=8,
    steps=10,
    lr=3e-3,
    log_every=1,
    eval_every=5,
    ckpt_every=2,
    warmup=0.2,
    progress=False,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("vae1")
    result = run_training(VAETrainConfig(data=str(data_dir), out_dir=str(out), **VAE_KW))
    return Path(result["export"])


def cfg(data_dir: Path, tokenizer: Path, out: Path, **kw) -> LlamaGenTrainConfig:
    return LlamaGenTrainConfig(data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(out), **{**GPT_KW, **kw})


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def test_training_lowers_the_loss_and_exports_a_raster_model(tmp_path, tokenizer, data_dir):
    result = run_training(cfg(data_dir, tokenizer, tmp_path / "run"))
    losses = train_losses(tmp_path / "run")
    # the official init zeroes the output head: every logit is 0, the first loss is ln(codebook size)
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=1e-4)
    assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
    val = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"]
    assert {"loss", "acc", "loss_null", "class_gain"} <= set(val[-1]) and val[-1]["loss"] < math.log(VOCAB)

    folder = Path(result["export"])
    assert family_of_folder(folder) == "raster"
    pipe = LlamaGenPipeline.from_pretrained(folder)
    c = pipe.config
    assert (c.n_layer, c.dim, c.n_head, c.vocab_size, c.grid_size, c.num_classes) == (2, 32, 2, VOCAB, 8, 3)
    assert pipe.class_names == tuple(sorted(IMAGE_FOLDER_CLASSES)) and pipe.tokenizer.kind == "VQVAE"
    out = pipe(["checker", "disc"], cfg=2.0, top_k=0, seed=0, output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and out.tokens.shape == (2, 64)
    again = pipe(["checker", "disc"], cfg=2.0, top_k=0, seed=0, output_type="np")
    assert torch.equal(out.tokens, again.tokens)
    # the exported weights are the trained ones (float32, exactly)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    w = load_file(folder / "transformer" / "model.safetensors")
    assert w.keys() == ckpt["model"].keys() and all(torch.equal(w[k], ckpt["model"][k]) for k in w)


def test_stop_and_resume_equals_uninterrupted(tmp_path, tokenizer, data_dir):
    kw = dict(ema=0.9, hflip=True, steps=6)
    full = run_training(cfg(data_dir, tokenizer, tmp_path / "full", **kw))
    part = run_training(cfg(data_dir, tokenizer, tmp_path / "split", stop_after=3, **kw))
    assert part["step"] == 3 and "export" not in part
    rest = run_training(cfg(data_dir, tokenizer, tmp_path / "split", resume=True, **kw))
    assert rest["step"] == 6
    a = load_file(Path(full["export"]) / "transformer" / "model.safetensors")
    b = load_file(Path(rest["export"]) / "transformer" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "split")


def test_condition_dropout_is_drawn_per_global_batch(tmp_path, tokenizer, data_dir):
    """10 % of the labels become the null class, from one draw per image of the GLOBAL batch: rank r of N gets
    slice r of the single-process draw, so a run does not depend on the number of ranks."""
    from nextscale.train.llamagen_task import LlamaGenTask
    from nextscale.train.tokens import drop_conditions

    c = cfg(data_dir, tokenizer, tmp_path / "r", batch_size=8)
    task = LlamaGenTask(c, dist.DistInfo(), torch.device("cpu"))
    null = task.model.cfg.null_class
    assert null == 3
    # the batches: tokens as cached, labels = true label, or null exactly where rand(global batch) < cond_drop
    g = torch.Generator().manual_seed(c.seed + 101)
    dropped = 0
    for (step, _epoch, idx), (tok, lab) in zip(task.sampler.batches(0), task.batches(0), strict=False):
        want = torch.where(torch.rand(8, generator=g) < 0.1, null, task.train_tokens.labels_N[idx])
        assert torch.equal(lab, want) and torch.equal(tok, task.train_tokens.idx_NL[idx])
        dropped += int((lab == null).sum())
        if step == 30:
            break
    assert dropped > 0
    labels = torch.arange(4000) % 3
    single = drop_conditions(labels, 0.1, null, torch.Generator().manual_seed(5), dist.DistInfo())
    assert 0.08 < float((single == null).float().mean()) < 0.12
    assert torch.equal(single[single != null], labels[single != null])
    halves = [
        drop_conditions(labels[r * 2000 : (r + 1) * 2000], 0.1, null, torch.Generator().manual_seed(5), info)
        for r, info in enumerate(dist.DistInfo(rank=r, world_size=2) for r in range(2))
    ]
    assert torch.equal(torch.cat(halves), single)
    none = drop_conditions(labels, 0.0, null, torch.Generator().manual_seed(5), dist.DistInfo())
    assert torch.equal(none, labels)


def test_export_flag_writes_the_newest_checkpoint(tmp_path, tokenizer, data_dir, capsys):
    from nextscale.cli.main import main

    run_training(cfg(data_dir, tokenizer, tmp_path / "run", stop_after=4))
    assert not (tmp_path / "run" / "model").exists()
    assert main(["train", "--arch", "llamagen", "--out-dir", str(tmp_path / "run"), "--export"]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    w = load_file(tmp_path / "run" / "model" / "transformer" / "model.safetensors")
    assert ckpt["step"] == 4 and all(torch.equal(w[k], ckpt["model"][k]) for k in w)
    assert LlamaGenPipeline.from_pretrained(tmp_path / "run" / "model").num_classes == 3
    capsys.readouterr()
    assert main(["train", "--out-dir", str(tmp_path / "run"), "--export"]) == 2  # --arch var: not this run's kind
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a checkpoint of a VARTrainConfig run" in err[0], err


def test_train_vae_makes_a_single_scale_tokenizer(tokenizer):
    vae_cfg = load_tokenizer(tokenizer).cfg
    assert vae_cfg.patch_nums == (8,) and vae_cfg.latent_size == 8 and vae_cfg.image_size == 16
    val = [r for r in read_metrics(tokenizer.parent / "metrics.jsonl") if r["split"] == "val"]
    assert {"psnr", "psnr_s0", "usage_s0"} <= set(val[-1])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--arch", "nope"], "arch must be one of var, llamagen, infinity, got 'nope'"),
        (["train-vae", "--arch", "nope"], "arch must be one of msvq, bsq, got 'nope'"),
        (
            ["train", "--arch", "llamagen", "--tokenizer", "t", "--loss-from-scale", "2", "--mlp-ratio", "2"],
            "--mlp-ratio, --loss-from-scale: not a setting of --arch llamagen",
        ),
        (["train", "--tokenizer", "t", "--num-kv-heads", "2"], "--num-kv-heads: not a setting of --arch var"),
        (["train", "--arch", "llamagen"], "tokenizer is required: a single-scale VQ-VAE folder"),
        (
            ["train", "--arch", "llamagen", "--tokenizer", "t", "--embed-dim", "32", "--num-heads", "3"],
            "embed_dim 32 is not divisible by num_heads 3",
        ),
        (
            ["train", "--arch", "llamagen", "--tokenizer", "t", "--embed-dim", "24", "--num-heads", "4"],
            "the head dim embed_dim / num_heads = 6 must be a multiple of 4",
        ),
        (
            ["train", "--arch", "llamagen", "--tokenizer", "t", "--num-kv-heads", "3"],
            "num_kv_heads must be an int >= 1 dividing num_heads 4, got 3",
        ),
        (
            ["train", "--arch", "llamagen", "--tokenizer", "t", "--cond-drop", "1"],
            "cond_drop must be a finite number in [0, 1), got 1.0",
        ),
        (
            ["train-vae", "--patch-nums", "16", "--image-size", "64", "--ch-mult", "1,2"],
            "image_size 64 != patch_nums[-1] * 2**(len(ch_mult)-1) = 16 * 2",
        ),
        (["train", "--arch", "llamagen", "--export"], "--export needs --out-dir"),
    ],
)
def test_bad_flags_fail_in_one_line(argv, message, capsys):
    from nextscale.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_wrong_kind_of_tokenizer_fails_in_one_line(tmp_path, tokenizer, data_dir, capsys):
    from nextscale.cli.main import main

    vae_cfg = VQVAEConfig(vocab_size=VOCAB, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 4, 8))
    multi = save_tokenizer(tmp_path / "multi", VQVAE(vae_cfg))
    common = ["--data", str(data_dir), "--out-dir", str(tmp_path / "o"), "--no-progress"]
    assert main(["train", "--arch", "llamagen", "--tokenizer", str(multi), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has patch_nums (1, 4, 8); --arch llamagen needs a single-scale VQ-VAE" in err[0], err
    assert main(["train", "--tokenizer", str(tokenizer), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has a single scale (patch_nums (8,))" in err[0] and "--arch llamagen" in err[0], err
    with pytest.raises(ConfigError, match=r"depth must be an int in 1\.\.4096, got 0"):
        LlamaGenTrainConfig(tokenizer="t", depth=0)
    assert VARTrainConfig(tokenizer="t").grad_clip == 2.0 and LlamaGenTrainConfig(tokenizer="t").grad_clip == 1.0


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, tokenizer, data_dir):
    common = ["-m", "nextscale", "train", "--arch", "llamagen", "--data", str(data_dir), "--tokenizer", str(tokenizer)]
    common += ["--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "8", "--steps", "4"]
    common += ["--ckpt-every", "4", "--log-every", "1", "--eval-every", "100", "--no-progress"]
    subprocess.run([sys.executable, *common, "--out-dir", str(tmp_path / "single")], check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519"]
    res = subprocess.run(
        [*torchrun, *common, "--out-dir", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 4
    np.testing.assert_allclose(ddp, single, rtol=1e-4)
    a = load_file(tmp_path / "single" / "model" / "transformer" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "model" / "transformer" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
