"""Entry point of the training jobs: set up (distributed) execution, build the task, run the loop; or export the
model of a checkpoint without training (``--export``).

A run is refused before any expensive work or any write: the config validates every setting as it is built,
``preflight`` checks the device and every place the run will write, the task checks the tokenizer and the model's
shape before it reads the data, and the data before it tokenizes. The run folder is written only once training
starts (the tokens go to the cache all runs share), and a run that fails before its first checkpoint leaves the
folder as it found it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from nextscale import env
from nextscale.errors import CheckpointError, ConfigError
from nextscale.fileio import MODEL_INDEX, atomic_file, check_writable, folder_target
from nextscale.train import dist
from nextscale.train.checkpoint import LAST, newest_checkpoint, open_resume, remove_stale_temp_files
from nextscale.train.config import (
    BSQTrainConfig,
    InfinityTrainConfig,
    LlamaGenTrainConfig,
    LoopConfig,
    VAETrainConfig,
    VARTrainConfig,
)
from nextscale.train.loop import Task, train

log = logging.getLogger("nextscale.train")
# What a run writes at the top of its folder (besides checkpoints/ and the export); a failed start puts back what
# was there before.
RUN_FILES = ("config.json", "metrics.jsonl")


def run_training(cfg: LoopConfig) -> dict[str, Any]:
    """Train (or resume) the job ``cfg`` describes; returns the final step, metrics and export path."""
    preflight(cfg)
    info = dist.init(torch.device(cfg.device))
    device = dist.device_for(cfg.device, info)
    if not info.is_main:
        logging.getLogger("nextscale").setLevel(logging.WARNING)  # rank-0-only logging
    try:
        out, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
        resumed = open_resume(cfg, ckpt_dir)  # a bad checkpoint fails here, before the data and model are set up
        task = make_task(cfg, info, device)  # writes nothing in the run folder (tokens go to the shared cache)
        with _undone_unless_checkpointed(out, ckpt_dir, cfg.export_name, enabled=info.is_main):
            if info.is_main:
                _prepare_run_folder(cfg, ckpt_dir)
                n = sum(p.numel() for p in task.model.parameters())
                log.info(
                    "%s: %s parameters, %d steps of %d images on %d process(es)",
                    type(cfg).__name__,
                    f"{n:,}",
                    cfg.steps,
                    cfg.batch_size,
                    info.world_size,
                )
            result = train(task, cfg, info, device, resumed)
        result["is_main"] = info.is_main
        return result
    finally:
        dist.shutdown(info)


def preflight(cfg: LoopConfig) -> None:
    """What can be refused before any data is read: the device, the split of the batch over the processes, and
    every place the run writes (the run folder, its export, the token cache), each checked without writing."""
    check_device_present(cfg.device)
    launched = env.distributed()
    world = launched[1] if launched is not None else 1
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(
            f"batch_size {cfg.batch_size} does not split evenly over {world} process(es) x grad_accum "
            f"{cfg.grad_accum}; use a multiple of {world * cfg.grad_accum}"
        )
    out = Path(cfg.out_dir)
    check_writable(out, f"out_dir {cfg.out_dir}")
    # The export ends the run: a folder there that the end of training may not replace is refused now, not then.
    folder_target(out / cfg.export_name, (MODEL_INDEX,))
    if isinstance(cfg, InfinityTrainConfig) and not Path(cfg.tokenizer).exists():
        raise ConfigError(f"tokenizer {cfg.tokenizer}: no such folder")
    if isinstance(cfg, (VAETrainConfig, InfinityTrainConfig)) and cfg.init_from and not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from {cfg.init_from}: no such folder or file")
    if isinstance(cfg, (VARTrainConfig, LlamaGenTrainConfig)):
        from nextscale.train.tokens import token_cache_dir

        for name in ("tokenizer", "init_from"):
            path = getattr(cfg, name, None)
            if path is not None and not Path(path).exists():
                raise ConfigError(f"{name} {path}: no such folder or file")
        cache = token_cache_dir()
        check_writable(cache, f"token cache {cache} (set ${env.CACHE} to put it elsewhere)")


def check_device_present(spec: str) -> None:
    """One-line error unless the accelerator ``spec`` names is there (its syntax is the config's business)."""
    device = torch.device(spec)
    present = {
        "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": int(torch.backends.mps.is_available()),
        "xpu": torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0,
    }
    if device.type not in present:
        return
    count = present[device.type]
    if count == 0:
        raise ConfigError(f"device {spec}: no {device.type} device is available here; use --device cpu")
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {spec}: only {device.type}:0..{device.type}:{count - 1} are available")


def make_task(cfg: LoopConfig, info: dist.DistInfo, device: torch.device) -> Task:
    """The task of a training config: tokenizer (VAE), VAR, or raster GPT (LlamaGen). (``cast``: each task's
    ``model`` is its own module class, which a Protocol's mutable ``nn.Module`` attribute does not admit.)"""
    if isinstance(cfg, BSQTrainConfig):
        from nextscale.train.bsq_task import BSQTask

        return cast(Task, BSQTask(cfg, info, device))
    if isinstance(cfg, VAETrainConfig):
        from nextscale.train.vae_task import VAETask

        return cast(Task, VAETask(cfg, info, device))
    if isinstance(cfg, VARTrainConfig):
        from nextscale.train.var_task import VARTask

        return cast(Task, VARTask(cfg, info, device))
    if isinstance(cfg, InfinityTrainConfig):
        from nextscale.train.infinity_task import InfinityTask

        return cast(Task, InfinityTask(cfg, info, device))
    if isinstance(cfg, LlamaGenTrainConfig):
        from nextscale.train.llamagen_task import LlamaGenTask

        return cast(Task, LlamaGenTask(cfg, info, device))
    raise TypeError(f"unknown training config {type(cfg).__name__}")


def export_checkpoint(cls: type[LoopConfig], out_dir: str, resume_from: str | None = None) -> dict[str, Any]:
    """Export the model of a run's newest checkpoint (``out_dir/checkpoints/last.pt``, else ``prev.pt``; or
    ``resume_from``) to ``out_dir`` as the end of training would (EMA weights when the run keeps an EMA), without
    training. The run's settings come from the checkpoint, so only the folder (and the job kind) is needed."""
    if env.distributed() is not None:
        raise ConfigError("--export runs in a single process; run it without torchrun")
    ckpt_dir = Path(out_dir) / "checkpoints"
    if resume_from:
        resumed = open_resume(LoopConfig(out_dir=out_dir, resume_from=resume_from), ckpt_dir)
    else:
        resumed = newest_checkpoint(ckpt_dir)
    if resumed is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to export (train first, or name one with --resume-from)")
    state = resumed.state
    fields = {f.name for f in dataclasses.fields(cls)}
    foreign = sorted(set(state["config"]) - fields)
    if foreign:
        raise CheckpointError(
            f"{resumed.path}: not a checkpoint of a {cls.__name__} run (it has the settings {foreign[:3]})"
        )
    try:
        saved = cls.from_dict(state["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{resumed.path}: its settings are not a valid {cls.__name__}: {e}") from e
    # The weights are all an export needs: the CPU whatever the run trained on (a CUDA run may be exported anywhere).
    cfg = dataclasses.replace(saved, out_dir=out_dir, device="cpu", progress=False)
    task = make_task(cfg, dist.DistInfo(), torch.device("cpu"))
    model = task.model
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{resumed.path}: weights do not fit the {cls.__name__} they were saved with") from e
    if state.get("ema"):  # what the loop exports at the end: the averaged weights
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(state["ema"][k])
    path = task.export(Path(out_dir), model)
    log.info("exported the step-%d weights of %s to %s", int(state["step"]), resumed.path, path)
    return {"step": int(state["step"]), "export": str(path), "is_main": True}


def _prepare_run_folder(cfg: LoopConfig, ckpt_dir: Path) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(
        out / "config.json", (json.dumps({"job": type(cfg).__name__, **cfg.to_dict()}, indent=2) + "\n").encode()
    )
    removed = remove_stale_temp_files(ckpt_dir)
    if removed:
        log.info("removed %d stale temp file(s) of checkpoint writes a killed run left in %s", removed, ckpt_dir)


def _write_atomic(path: Path, data: bytes) -> None:
    def write(f: Any) -> None:
        f.write(data)

    atomic_file(path, write)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@contextlib.contextmanager
def _undone_unless_checkpointed(out: Path, ckpt_dir: Path, export_name: str, enabled: bool) -> Iterator[None]:
    """A run that fails (or is interrupted) before it writes a checkpoint leaves ``out`` as it found it: the run
    files it created there are removed, the ones it rewrote are put back, a folder it created goes. Once it has
    written a checkpoint the folder holds a resumable run and is kept as it is. Nothing that was there before the
    run, and nothing but the run's own files, is ever deleted."""
    if not enabled:
        yield
        return
    out = Path(os.path.abspath(out))
    created = out  # the outermost folder this run would create (None: out exists)
    while not created.parent.exists():
        created = created.parent
    created_top = None if out.exists() else created
    before = set(os.listdir(out)) if out.is_dir() else set()
    saved = {name: (out / name).read_bytes() for name in RUN_FILES if (out / name).is_file()}
    checkpoint_before = _file_id(ckpt_dir / LAST)
    try:
        yield
    except BaseException:
        if _file_id(ckpt_dir / LAST) == checkpoint_before:
            _undo(out, {*RUN_FILES, ckpt_dir.name, export_name} - before, saved, created_top)
        raise


def _undo(out: Path, created: set[str], saved: dict[str, bytes], created_top: Path | None) -> None:
    try:
        for name in created:
            path = out / name
            if not os.path.lexists(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        for name, data in saved.items():
            _write_atomic(out / name, data)
        if created_top is not None:
            folder = out
            while True:
                folder.rmdir()  # refused (and reported) if anyone else put files in the folders this run made
                if folder == created_top:
                    break
                folder = folder.parent
    except OSError as e:  # the original error is the one to report; this only leaves more behind
        log.warning("could not remove everything this failed run wrote in %s: %s", out, e)
