"""Entry point of the training jobs: set up (distributed) execution, build the task, run the loop; or export the
model of a checkpoint without training (``--export``)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, cast

import torch

from nextscale import env
from nextscale.errors import CheckpointError, ConfigError
from nextscale.train import dist
from nextscale.train.checkpoint import open_resume, remove_stale_temp_files
from nextscale.train.config import LlamaGenTrainConfig, LoopConfig, VAETrainConfig, VARTrainConfig
from nextscale.train.loop import Task, train

log = logging.getLogger("nextscale.train")


def run_training(cfg: LoopConfig) -> dict[str, Any]:
    """Train (or resume) the job ``cfg`` describes; returns the final step, metrics and export path."""
    info = dist.init(torch.device(cfg.device))
    device = dist.device_for(cfg.device, info)
    if not info.is_main:
        logging.getLogger("nextscale").setLevel(logging.WARNING)  # rank-0-only logging
    try:
        ckpt_dir = Path(cfg.out_dir) / "checkpoints"
        resumed = open_resume(cfg, ckpt_dir)  # a bad checkpoint fails here, before the data and model are set up
        if info.is_main:
            _prepare_run_folder(cfg, ckpt_dir)
        task = make_task(cfg, info, device)
        if info.is_main:
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


def make_task(cfg: LoopConfig, info: dist.DistInfo, device: torch.device) -> Task:
    """The task of a training config: tokenizer (VAE), VAR, or raster GPT (LlamaGen). (``cast``: each task's
    ``model`` is its own module class, which a Protocol's mutable ``nn.Module`` attribute does not admit.)"""
    if isinstance(cfg, VAETrainConfig):
        from nextscale.train.vae_task import VAETask

        return cast(Task, VAETask(cfg, info, device))
    if isinstance(cfg, VARTrainConfig):
        from nextscale.train.var_task import VARTask

        return cast(Task, VARTask(cfg, info, device))
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
    resumed = open_resume(LoopConfig(out_dir=out_dir, resume=True, resume_from=resume_from), ckpt_dir)
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
    (out / "config.json").write_text(json.dumps({"job": type(cfg).__name__, **cfg.to_dict()}, indent=2) + "\n")
    removed = remove_stale_temp_files(ckpt_dir)
    if removed:
        log.info("removed %d stale temp file(s) of checkpoint writes a killed run left in %s", removed, ckpt_dir)
