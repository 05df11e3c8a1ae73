"""Training: tokenizer and transformer end to end on a tiny synthetic image folder, exact resumption after a
kill, and DDP on 2 CPU processes matching a single process."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nextscale.errors import ConfigError
from nextscale.pipelines.var import VARPipeline
from nextscale.train.config import LlamaGenTrainConfig, VAETrainConfig, VARTrainConfig
from nextscale.train.metrics_log import plot_losses, read_metrics
from nextscale.train.runner import run_training

from .helpers import IMAGE_FOLDER_CLASSES, make_image_folder

VAE_KW = dict(
    image_size=16,
    vocab_size=32,
    z_channels=8,
    ch=32,
    ch_mult=(1, 2),
    patch_nums=(1, 2, 4, 8),
    batch_size=8,
    steps=6,
    lr=2e-3,
    log_every=1,
    eval_every=3,
    ckpt_every=2,
    dead_code_every=2,
    progress=False,
)
VAR_KW = dict(
    depth=2,
    embed_dim=64,
    num_heads=1,
    batch_size=8,
    steps=8,
    lr=1e-3,
    log_every=1,
    eval_every=4,
    ckpt_every=2,
    progress=False,
    warmup=0.25,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("vae")
    result = run_training(VAETrainConfig(data=str(data_dir), out_dir=str(out), **VAE_KW))
    assert result["step"] == 6
    return Path(result["export"])


def test_tokenizer_training_reports_psnr_and_usage(tokenizer):
    recs = read_metrics(tokenizer.parent / "metrics.jsonl")
    val = [r for r in recs if r["split"] == "val"]
    assert val and all(f"usage_s{si}" in val[-1] and f"psnr_s{si}" in val[-1] for si in range(4))
    assert val[-1]["psnr_s3"] >= val[-1]["psnr_s0"] - 0.5, "finer scales reconstruct at least as well"
    train = [r for r in recs if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert any(r.get("codes_reseeded", 0) > 0 for r in train), "dead codes get re-seeded"
    assert (tokenizer / "vae" / "model.safetensors").is_file()


def test_transformer_training_exports_a_working_model(tmp_path, tokenizer, data_dir):
    cfg = VARTrainConfig(data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(tmp_path / "run"), **VAR_KW)
    result = run_training(cfg)
    pipe = VARPipeline.from_pretrained(result["export"])
    assert pipe.class_names == tuple(sorted(IMAGE_FOLDER_CLASSES))
    out = pipe(["checker", "disc"], seed=0, output_type="np")
    assert out.images.shape == (2, 16, 16, 3)
    val = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"]
    assert {"loss", "acc", "acc_tail", "acc_s0"} <= set(val[-1])
    png = plot_losses(tmp_path / "run" / "metrics.jsonl", tmp_path / "loss.png")
    assert Image.open(png).size == (800, 450)


def test_loss_from_scale_trains_the_late_scales_only(tmp_path, tokenizer, data_dir):
    """A CoDe refiner's recipe: the early scales' tokens condition the late ones but get no gradient."""
    from nextscale.train import dist
    from nextscale.train.var_task import VARTask

    cfg = VARTrainConfig(
        data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(tmp_path / "r"), **VAR_KW, loss_from_scale=2
    )
    task = VARTask(cfg, dist.init(torch.device("cpu")), torch.device("cpu"))
    b = task.model.scales.begin_ends[2][0]
    w = task.loss_weight_L
    assert (w[:b] == 0).all() and torch.allclose(w[b:].sum(), torch.tensor(1.0))
    with pytest.raises(ConfigError, match=r"loss_from_scale must be an int in 0\.\.4096, got -1"):
        VARTrainConfig(tokenizer="t", loss_from_scale=-1)
    bad = VARTrainConfig(
        data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(tmp_path / "b"), **VAR_KW, loss_from_scale=9
    )
    with pytest.raises(ConfigError, match=r"loss_from_scale=9: the model has scales 0\.\.3"):
        VARTask(bad, dist.init(torch.device("cpu")), torch.device("cpu"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model" / "transformer" / "model.safetensors")


@pytest.mark.parametrize("kind", ["var", "vae"])
def test_stop_and_resume_equals_uninterrupted(tmp_path, tokenizer, data_dir, kind):
    def cfg(out: str, **kw):
        if kind == "vae":
            return VAETrainConfig(data=str(data_dir), out_dir=str(tmp_path / out), **{**VAE_KW, **kw})
        return VARTrainConfig(
            data=str(data_dir),
            tokenizer=str(tokenizer),
            out_dir=str(tmp_path / out),
            **{**VAR_KW, "ema": 0.9, "hflip": True, **kw},
        )

    full = run_training(cfg("full"))
    part = run_training(cfg("split", stop_after=3))
    assert part["step"] == 3 and "export" not in part
    rest = run_training(cfg("split", resume=True))
    assert rest["step"] == cfg("x").steps
    sub = "tokenizer/vae" if kind == "vae" else "model/transformer"
    a = load_file(Path(full["export"]).parent / sub / "model.safetensors")
    b = load_file(Path(rest["export"]).parent / sub / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    val = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["split"] == "val"]
    assert val and all(np.isfinite(v) for r in val for k, v in r.items() if isinstance(v, float)), val
    losses = [
        [r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["split"] == "train"]
        for d in ("full", "split")
    ]
    assert losses[0] == losses[1], "the metrics log holds one history, identical to the uninterrupted run's"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nextscale", *args]


def test_killed_process_resumes_to_the_same_weights(tmp_path, tokenizer, data_dir):
    common = [
        "train",
        "--data",
        str(data_dir),
        "--tokenizer",
        str(tokenizer),
        "--depth",
        "2",
        "--embed-dim",
        "64",
        "--num-heads",
        "1",
        "--batch-size",
        "8",
        "--steps",
        "30",
        "--ckpt-every",
        "3",
        "--log-every",
        "1",
        "--eval-every",
        "100",
        "--no-progress",
    ]
    subprocess.run(_cli(*common, "--out-dir", str(tmp_path / "full")), check=True, capture_output=True)
    proc = subprocess.Popen(
        _cli(*common, "--out-dir", str(tmp_path / "killed")), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() or ckpt.with_name("prev.pt").exists(), "last.pt, or prev.pt while last.pt was written"
    assert not (tmp_path / "killed" / "model").exists(), "killed before the end"
    subprocess.run(_cli(*common, "--out-dir", str(tmp_path / "killed"), "--resume"), check=True, capture_output=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_corrupt_checkpoint(tmp_path, tokenizer, data_dir):
    from nextscale.errors import CheckpointError

    cfg = VARTrainConfig(
        data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(tmp_path / "r"), **{**VAR_KW, "stop_after": 2}
    )
    run_training(cfg)
    ckpt = tmp_path / "r" / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable training checkpoint"):
        run_training(VARTrainConfig(**{**cfg.to_dict(), "resume": True, "stop_after": None}))


def _flags(kw: dict) -> list[str]:
    """The command-line spelling of training keyword arguments."""
    out: list[str] = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return out


@contextlib.contextmanager
def _train_logs(caplog):
    """Every "nextscale" record in ``caplog`` exactly once, whatever ran before: caplog's handler on the logger
    itself (an in-process CLI run stops it propagating to root) and, meanwhile, no propagation (else the handler's
    copy on root got each record a second time)."""
    logger = logging.getLogger("nextscale")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False
    try:
        with caplog.at_level(logging.INFO, logger="nextscale"):
            yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate


def test_corrupt_last_checkpoint_points_to_the_older_one(tmp_path, data_dir, capsys):
    """A killed run left an empty last.pt and a temp file: --resume names the bad file and the older checkpoint
    in one line; --resume-from that one cleans up and finishes, and last.pt plus one older are kept."""
    from nextscale.cli.main import main
    from nextscale.train.checkpoint import load_training_state

    ckpts = tmp_path / "run" / "checkpoints"
    argv = [
        "train-vae",
        "--data",
        str(data_dir),
        "--out-dir",
        str(tmp_path / "run"),
        *_flags({**VAE_KW, "eval_every": 100}),
    ]
    assert main([*argv, "--stop-after", "4"]) == 0
    capsys.readouterr()
    assert [load_training_state(ckpts / n)["step"] for n in ("prev.pt", "last.pt")] == [2, 4]
    (ckpts / "last.pt").write_bytes(b"")
    (ckpts / ".last.pt.k1ll3d").write_bytes(b"half a checkpoint")  # what a kill during torch.save leaves
    (ckpts / "notes.txt").write_text("not ours to delete")
    assert main([*argv, "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "last.pt: the file is empty (0 bytes)" in lines[0], lines
    assert f"--resume-from {ckpts / 'prev.pt'}" in lines[0], lines
    assert main([*argv, "--resume-from", str(ckpts / "prev.pt")]) == 0
    err = capsys.readouterr().err
    assert "removed 1 stale temp file" in err and f"resumed from {ckpts / 'prev.pt'} at step 2" in err, err
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "notes.txt", "prev.pt"]
    assert [load_training_state(ckpts / n)["step"] for n in ("prev.pt", "last.pt")] == [4, 6]
    assert (tmp_path / "run" / "tokenizer" / "vae" / "model.safetensors").is_file()


def test_resume_uses_prev_when_killed_between_rotating_and_writing(tmp_path, data_dir, caplog):
    cfg = VAETrainConfig(data=str(data_dir), out_dir=str(tmp_path / "run"), **{**VAE_KW, "eval_every": 100})
    run_training(dataclasses.replace(cfg, stop_after=4))
    ckpts = tmp_path / "run" / "checkpoints"
    os.replace(ckpts / "last.pt", ckpts / "prev.pt")  # the step-6 save's first move; killed before the write
    with _train_logs(caplog):
        assert run_training(dataclasses.replace(cfg, resume=True))["step"] == 6
    assert f"resumed from {ckpts / 'prev.pt'} at step 4" in caplog.text


def test_progress_lines_every_tenth_of_the_run_and_every_interval(caplog):
    from nextscale.train.loop import ProgressLines

    now = [0.0]
    lines = ProgressLines(VAETrainConfig(steps=100, progress_every_s=3.0), start=0, stop=100, clock=lambda: now[0])
    with _train_logs(caplog):
        for step in range(1, 21):
            now[0] += 1.0
            lines.update(step, loss=float(step), images=8)
    assert [int(s) for s in re.findall(r"step (\d+)/100", caplog.text)] == [3, 6, 9, 10, 13, 16, 19, 20]
    # loss: mean since the previous line; images/s: since the previous line; ETA: at this invocation's pace
    assert caplog.records[-1].getMessage() == "step 20/100 (20%): loss 20.0000, 8.0 images/s, ETA 1m20s"


@pytest.mark.parametrize(
    "terminal, progress, expect", [(True, True, "bar"), (False, True, "lines"), (False, False, None)]
)
def test_a_terminal_gets_the_bar_and_logs_get_lines(monkeypatch, terminal, progress, expect):
    from nextscale.train import loop
    from nextscale.train.dist import DistInfo

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    monkeypatch.setattr(sys, "stderr", Stream())
    bar, lines = loop._progress(VAETrainConfig(steps=10, progress=progress), 0, 10, DistInfo())
    assert (bar is not None, lines is not None) == (expect == "bar", expect == "lines")
    if bar is not None:
        bar.close()


def test_two_process_ddp_matches_single_process(tmp_path, tokenizer, data_dir):
    common = [
        "train",
        "--data",
        str(data_dir),
        "--tokenizer",
        str(tokenizer),
        "--depth",
        "2",
        "--embed-dim",
        "64",
        "--num-heads",
        "1",
        "--batch-size",
        "8",
        "--steps",
        "4",
        "--ckpt-every",
        "4",
        "--log-every",
        "1",
        "--eval-every",
        "100",
        "--no-progress",
    ]
    subprocess.run(_cli(*common, "--out-dir", str(tmp_path / "single")), check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            "-m",
            "nextscale",
            *common,
            "--out-dir",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    single, ddp = (
        [r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["split"] == "train"]
        for d in ("single", "ddp")
    )
    assert len(single) == len(ddp) == 4
    np.testing.assert_allclose(ddp, single, rtol=1e-4)
    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    cfg = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg["batch_size"] == 8


def test_fine_tuning_onto_a_different_number_of_classes(tmp_path, tokenizer, data_dir, caplog):
    """A 3-class model fine-tuned on 2 classes: the architecture and every non-class weight carry over, the
    class embedding keeps the first rows and the null row, and the resize is stated in the log."""
    import shutil

    base = run_training(
        VARTrainConfig(data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(tmp_path / "base"), **VAR_KW)
    )
    two = tmp_path / "two"
    for name in IMAGE_FOLDER_CLASSES[:2]:
        shutil.copytree(data_dir / name, two / name)
    kw = {**VAR_KW, "depth": 1, "embed_dim": 32, "steps": 1, "lr": 1e-9, "warmup": 0.0}  # ignored: pretrained shape
    with _train_logs(caplog):
        tuned = run_training(
            VARTrainConfig(
                data=str(two),
                tokenizer=str(tokenizer),
                out_dir=str(tmp_path / "ft"),
                init_from=base["export"],
                **kw,
            )
        )
    assert "class embedding resized from 3+1 to 2+1 rows" in caplog.text
    pipe = VARPipeline.from_pretrained(tuned["export"])
    assert pipe.class_names == tuple(sorted(IMAGE_FOLDER_CLASSES[:2])) and pipe.transformer.cfg.depth == VAR_KW["depth"]
    a, b = weights(tmp_path / "base"), weights(tmp_path / "ft")
    assert a.keys() == b.keys()
    emb_a, emb_b = a["class_emb.weight"], b["class_emb.weight"]
    assert emb_a.shape[0] == 4 and emb_b.shape[0] == 3
    # rows are kept by index (class names of a new dataset rarely match the pretrained ones)
    torch.testing.assert_close(emb_b[:2], emb_a[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(emb_b[2], emb_a[3], atol=1e-5, rtol=0)  # null (unconditional) row
    for k in a:
        if k != "class_emb.weight":
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_a_tokenizer_trains_on_from_the_weights_of_one_of_its_shape(tmp_path, tokenizer, data_dir, caplog):
    """``init_from`` for a tokenizer: the run starts from its weights (a step at a learning rate of ~0 exports
    them as they were), and one of another shape is refused naming the difference."""
    kw = {**VAE_KW, "steps": 1, "lr": 1e-9, "warmup": 0.0, "dead_code_every": 0}
    with _train_logs(caplog):
        tuned = run_training(
            VAETrainConfig(data=str(data_dir), out_dir=str(tmp_path / "on"), init_from=str(tokenizer), **kw)
        )
    assert f"initialised from {tokenizer}" in caplog.text
    a = load_file(tokenizer / "vae" / "model.safetensors")
    b = load_file(Path(tuned["export"]) / "vae" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    wider = VAETrainConfig(
        data=str(data_dir), out_dir=str(tmp_path / "wider"), init_from=str(tokenizer), **{**kw, "vocab_size": 64}
    )
    with pytest.raises(ConfigError, match=r"a tokenizer of another shape: vocab_size 32 \(this run: 64\)"):
        run_training(wider)


@pytest.mark.parametrize("kind", ["var", "vae"])
def test_bf16_autocast_training_runs_and_exports_float32_weights(tmp_path, tokenizer, data_dir, kind):
    # the quantizer's nearest-code search must stay in float32 under autocast (it fails on mixed dtypes)
    if kind == "vae":
        cfg = VAETrainConfig(
            data=str(data_dir),
            out_dir=str(tmp_path / "run"),
            precision="bf16",
            **{**VAE_KW, "steps": 3, "eval_every": 3},
        )
    else:
        cfg = VARTrainConfig(
            data=str(data_dir),
            tokenizer=str(tokenizer),
            out_dir=str(tmp_path / "run"),
            precision="bf16",
            **{**VAR_KW, "steps": 3, "eval_every": 3},
        )
    out = run_training(cfg)
    sub = "tokenizer/vae" if kind == "vae" else "model/transformer"
    w = load_file(Path(out["export"]).parent / sub / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in w.values())
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(train) == 3 and all(np.isfinite(r["loss"]) for r in train)


# ---- refused before any work, nothing left behind, tokens shared by runs ----------------------------------------


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (empty when ``root`` does not exist)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A token cache of this test alone (not yet created)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEXTSCALE_CACHE", str(cache))
    return cache


def _exit_code(argv: list[str]) -> int:
    from nextscale.cli.main import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusal
        return int(e.code or 0)


@pytest.mark.parametrize(
    "cls, kw, message",
    [
        (VARTrainConfig, {"depth": 0}, "depth must be an int in 1..4096, got 0"),
        (VARTrainConfig, {"lr": float("nan")}, "lr must be a finite number in (0, 1], got nan"),
        (VARTrainConfig, {"lr": float("inf")}, "lr must be a finite number in (0, 1], got inf"),
        (VARTrainConfig, {"steps": True}, "steps must be an int in 1..2147483647, got True"),
        (VARTrainConfig, {"batch_size": 2.0}, "batch_size must be an int in 1..2147483647, got 2.0"),
        (VARTrainConfig, {"seed": -1}, "seed must be an int in 0..9223372036854775807, got -1"),
        (VARTrainConfig, {"warmup": 1.0}, "warmup must be a finite number in [0, 1), got 1.0"),
        (VARTrainConfig, {"cond_drop": 1.0}, "cond_drop must be a finite number in [0, 1), got 1.0"),
        (VARTrainConfig, {"grad_clip": -1.0}, "grad_clip must be a finite number in [0, 1e+06], got -1.0"),
        (VARTrainConfig, {"weight_decay_end": float("nan")}, "weight_decay_end must be a finite number in [0, 100]"),
        (VARTrainConfig, {"embed_dim": 100, "num_heads": 3}, "embed_dim 100 is not divisible by num_heads 3"),
        (VARTrainConfig, {"mlp_ratio": 0.001, "embed_dim": 64, "num_heads": 1}, "gives an MLP of no units"),
        (VARTrainConfig, {"device": "bogus"}, "device must be a device such as cpu, cuda or cuda:1"),
        (VARTrainConfig, {"precision": "fp8"}, "precision must be one of fp32, bf16, fp16, got 'fp8'"),
        (VARTrainConfig, {"progress": "yes"}, "progress must be true or false, got 'yes'"),
        (VARTrainConfig, {"out_dir": ""}, "out_dir must be a folder path, got ''"),
        (VARTrainConfig, {"batch_size": 10, "grad_accum": 4}, "batch_size 10 is not divisible by grad_accum 4"),
        (VAETrainConfig, {"patch_nums": (1, 4, 2)}, "patch_nums must be strictly increasing"),
        (VAETrainConfig, {"ch_mult": ()}, "ch_mult must be a non-empty list of ints in 1..64"),
        (VAETrainConfig, {"ch": 30}, "must be a multiple of 32 (GroupNorm groups)"),
        (VAETrainConfig, {"beta": float("-inf")}, "beta must be a finite number in [0, 1e+06], got -inf"),
        (VAETrainConfig, {"vocab_size": 1}, "vocab_size must be an int in 2..16777216, got 1"),
        (LlamaGenTrainConfig, {"num_kv_heads": 0}, "num_kv_heads must be an int in 1..65536, got 0"),
    ],
)
def test_every_setting_is_checked_when_the_config_is_built(cls, kw, message):
    base = {} if cls is VAETrainConfig else {"tokenizer": "t"}
    with pytest.raises(ConfigError) as e:
        cls(**base, **kw)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_every_numeric_setting_declares_its_range():
    """The range is the one place a setting's allowed values live: the config checks it, the CLI parses with it."""
    import typing

    from nextscale.train.config import FLOATS, INT_LISTS, INTS

    declared = {**INTS, **FLOATS, **INT_LISTS}
    for cls in (VAETrainConfig, VARTrainConfig, LlamaGenTrainConfig):
        hints = typing.get_type_hints(cls)
        numeric = [f.name for f in dataclasses.fields(cls) if re.search(r"\b(int|float)\b", str(hints[f.name]))]
        assert numeric and not set(numeric) - set(declared), set(numeric) - set(declared)
        cls(**({} if cls is VAETrainConfig else {"tokenizer": "t"}))  # the defaults lie inside their ranges


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--depth", "0"], "argument --depth: expected an integer in 1..4_096, got '0'"),
        (["train", "--steps", "abc"], "argument --steps: expected an integer in 1..2_147_483_647, got 'abc'"),
        (["train", "--lr", "nan"], "argument --lr: expected a finite number > 0 and <= 1, got 'nan'"),
        (["train-vae", "--patch-nums", "1,x"], "argument --patch-nums: expected comma-separated integers in 1..1024"),
        (["train-vae", "--init-from", "/nonexistent/tok"], "init_from /nonexistent/tok: no such folder or file"),
        (["train", "--tokenizer", "t", "--cond-drop", "1"], "cond_drop must be a finite number in [0, 1), got 1.0"),
    ],
)
def test_bad_flags_are_one_line_before_anything_happens(tmp_path, own_cache, argv, message, capsys):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert _exit_code([*argv, "--out-dir", str(out)]) == 2
    assert time.perf_counter() - t0 < 1.0, "refused at once, not after reading or tokenizing the data"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and not own_cache.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss-from-scale", "9"], "loss_from_scale=9: the model has scales 0..3"),
        (["--arch", "llamagen"], "--arch llamagen needs a single-scale VQ-VAE"),
        (["--progressive", "0.5", "--pg0", "4"], "pg0=4: progressive training starts within the scales 0..3"),
        (["--batch-size", "512"], "the dataset has 72 items, fewer than one global batch of 512"),
        (["--init-from", "{tmp}/missing"], "init_from {tmp}/missing: no such folder or file"),
        (["--tokenizer", "{tmp}/missing"], "tokenizer {tmp}/missing: no such folder or file"),
        (["--out-dir", "{tmp}/file.txt/run"], "cannot be created: {tmp}/file.txt is a file, not a folder"),
    ],
)
def test_settings_the_tokenizer_or_data_refuse_are_refused_before_tokenizing(
    tmp_path, own_cache, tokenizer, data_dir, extra, message, capsys
):
    """Nothing is tokenized, cached or written for a run that cannot start (the issue: 107 s of tokenizing, then
    the error, and a 36 MB cache and a config.json left behind)."""
    (tmp_path / "file.txt").write_text("a file, not a folder")
    before = _listing(tmp_path)
    argv = ["train", "--data", str(data_dir), "--tokenizer", str(tokenizer), "--out-dir", str(tmp_path / "run")]
    argv += ["--depth", "1", "--embed-dim", "32", "--num-heads", "1", "--batch-size", "8", "--steps", "2"]
    assert _exit_code([*argv, *[x.format(tmp=tmp_path) for x in extra]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert _listing(tmp_path) == before, "no cache, no run folder"


def _fail_at_optimizer_step(monkeypatch, n: int, before_crash=lambda: None) -> None:
    """Make the ``n``-th optimizer step of a run raise (a crash mid-training: out of memory, a NaN guard, a bug)."""
    from nextscale.train import loop

    real, calls = loop._optimizer_step, []

    def step(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            before_crash()
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(loop, "_optimizer_step", step)


def test_a_failed_first_start_leaves_nothing_behind(tmp_path, tokenizer, data_dir, monkeypatch):
    """Crashing after config.json and the first metrics are written, before any checkpoint: the folders this run
    created are gone; in a folder that existed, only what was there before remains, unchanged."""
    kw = {**VAR_KW, "ckpt_every": 4}  # metrics after every step; the crash comes at step 2, before a checkpoint
    new = tmp_path / "new" / "run"
    _fail_at_optimizer_step(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(VARTrainConfig(data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(new), **kw))
    assert not (tmp_path / "new").exists()

    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text('{"my": "own"}')
    before = _contents(mine)
    added = mine / "added-while-it-ran.txt"  # not the run's: kept
    _fail_at_optimizer_step(monkeypatch, 2, before_crash=lambda: added.write_text("also mine"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(VARTrainConfig(data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(mine), **kw))
    assert _contents(mine) == {**before, added.name: b"also mine"} and (mine / "sub").is_dir()


def test_a_failed_resume_leaves_the_run_as_it_was(tmp_path, tokenizer, data_dir, monkeypatch):
    """A resumed run that crashes before its next checkpoint puts back the config.json and metrics.jsonl it
    rewrote, so the folder is the resumable run it was; after a checkpoint the folder is kept as it is."""
    cfg = VARTrainConfig(data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(tmp_path / "r"), **VAR_KW)
    run_training(dataclasses.replace(cfg, stop_after=2))
    before = _contents(tmp_path / "r")
    assert {"config.json", "metrics.jsonl", "checkpoints/last.pt"} <= set(before)
    _fail_at_optimizer_step(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(dataclasses.replace(cfg, resume=True, lr=2e-3))
    assert _contents(tmp_path / "r") == before
    _fail_at_optimizer_step(monkeypatch, 3)  # steps 3 and 4 done, checkpoint at 4, crash at step 5
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(dataclasses.replace(cfg, resume=True))
    kept = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert kept["step"] == 4 and json.loads((tmp_path / "r" / "config.json").read_text())["resume"] is True


def test_a_new_run_folder_reuses_the_tokens_of_earlier_runs(tmp_path, own_cache, tokenizer, data_dir, caplog):
    kw = {**VAR_KW, "steps": 1, "eval_every": 100, "ckpt_every": 100}

    def run(name: str) -> str:
        caplog.clear()
        with _train_logs(caplog):
            run_training(
                VARTrainConfig(data=str(data_dir), tokenizer=str(tokenizer), out_dir=str(tmp_path / name), **kw)
            )
        return caplog.text

    first = run("a")
    assert "tokenizing 72 train images once" in first and "tokenizing 72 test images once" in first, first
    cached = _listing(own_cache)
    assert sorted(Path(p).name.split("-")[1] for p in cached if p.endswith(".pt")) == ["test", "train"]
    assert not (tmp_path / "a" / "cache").exists(), "the run folder holds the run, not the tokens"
    second = run("b")
    assert "tokenizing" not in second and second.count("reusing the cached tokens of 72") == 2, second
    assert _listing(own_cache) == cached, "not one cache file rewritten"


def test_the_token_cache_key_follows_the_images_and_the_tokenizer(tmp_path, tokenizer, data_dir):
    import shutil

    from nextscale.data import TensorImageDataset, load_dataset
    from nextscale.models.native_var import load_tokenizer
    from nextscale.train.tokens import cache_path

    vae = load_tokenizer(tokenizer)
    key = cache_path(vae, load_dataset(str(data_dir), "train", 16), "train", False)
    assert key == cache_path(vae, load_dataset(str(data_dir), "train", 16), "train", False), "stable"
    assert key != cache_path(vae, load_dataset(str(data_dir), "train", 16), "train", True)  # + mirrored
    assert key != cache_path(vae, load_dataset(str(data_dir), "test", 16), "train", False)  # centre crops
    copy = shutil.copytree(data_dir, tmp_path / "copy")
    img = next(copy.rglob("*.png"))
    before = cache_path(vae, load_dataset(str(copy), "train", 16), "train", False)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))  # the image was edited
    assert before != cache_path(vae, load_dataset(str(copy), "train", 16), "train", False)
    pixels = np.zeros((4, 16, 16), np.uint8)
    same = cache_path(vae, TensorImageDataset(pixels, [0, 1, 0, 1], ["a", "b"]), "train", False)
    assert same == cache_path(vae, TensorImageDataset(pixels.copy(), [0, 1, 0, 1], ["a", "b"]), "train", False)
    pixels[0, 0, 0] = 1
    assert same != cache_path(vae, TensorImageDataset(pixels, [0, 1, 0, 1], ["a", "b"]), "train", False)
    with torch.no_grad():
        vae.quantize.embedding.weight[0, 0] += 1e-3  # a retrained tokenizer
    assert key != cache_path(vae, load_dataset(str(data_dir), "train", 16), "train", False)


def test_a_damaged_cache_file_is_tokenized_again(own_cache, tokenizer, data_dir, caplog):
    from nextscale.data import load_dataset
    from nextscale.models.native_var import load_tokenizer
    from nextscale.train.dist import DistInfo
    from nextscale.train.tokens import cache_path, cached_tokens

    vae, ds = load_tokenizer(tokenizer), load_dataset(str(data_dir), "test", 16)
    good = cached_tokens(vae, ds, "test", False, DistInfo(), progress=False)
    path = cache_path(vae, ds, "test", False)
    path.write_bytes(b"half a file")
    with _train_logs(caplog):
        again = cached_tokens(vae, ds, "test", False, DistInfo(), progress=False)
    assert "are unreadable" in caplog.text and "tokenizing 72 test images once" in caplog.text
    assert torch.equal(again.idx_NL, good.idx_NL) and torch.equal(again.labels_N, good.labels_N)
    assert torch.equal(torch.load(path, weights_only=True)["idx"], good.idx_NL)


def test_tokenizing_reports_progress_at_most_every_10_s(caplog, monkeypatch):
    from nextscale.train.tokens import TokenizeProgress

    now = [0.0]
    with _train_logs(caplog):
        bar = TokenizeProgress(1000, "train", enabled=True, clock=lambda: now[0])
        for _ in range(10):  # 100 images every 4 s
            now[0] += 4.0
            bar.update(100)
        bar.close()
        TokenizeProgress(10, "test", enabled=False).update(10)
    assert [r.getMessage() for r in caplog.records] == [
        "tokenizing train: 300/1000 images (30%), ETA 28s",
        "tokenizing train: 600/1000 images (60%), ETA 16s",
        "tokenizing train: 900/1000 images (90%), ETA 4s",
    ]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = TokenizeProgress(10, "train", enabled=True)
    assert bar.bar is not None and not bar.lines
    bar.close()


def test_the_cache_folder_is_the_users_and_never_theirs_in_the_suite(monkeypatch, tmp_path_factory):
    from nextscale import env

    assert env.cache_dir().is_relative_to(tmp_path_factory.getbasetemp()), "the suite must not write the user's cache"
    monkeypatch.delenv("NEXTSCALE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert env.cache_dir() == Path("/x/cache/nextscale")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec: ignored
    assert env.cache_dir() == Path.home() / ".cache" / "nextscale"
    monkeypatch.setenv("NEXTSCALE_CACHE", "~/elsewhere")
    assert env.cache_dir() == Path.home() / "elsewhere"


def test_export_of_a_folder_without_a_checkpoint_is_one_line(tmp_path, capsys):
    from nextscale.cli.main import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--export", "--out-dir", str(empty)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"nextscale: error: {empty / 'checkpoints'}: no checkpoint to export (train first, or name one with "
        "--resume-from)"
    ]
    assert list(empty.iterdir()) == []
