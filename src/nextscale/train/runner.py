"""Entry point of both training jobs: set up (distributed) execution, build the task, run the loop."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from nextscale.train import dist
from nextscale.train.checkpoint import open_resume, remove_stale_temp_files
from nextscale.train.config import LoopConfig, VAETrainConfig, VARTrainConfig
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
        task: Task
        if isinstance(cfg, VAETrainConfig):
            from nextscale.train.vae_task import VAETask

            task = VAETask(cfg, info, device)
        elif isinstance(cfg, VARTrainConfig):
            from nextscale.train.var_task import VARTask

            task = VARTask(cfg, info, device)
        else:
            raise TypeError(f"unknown training config {type(cfg).__name__}")
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


def _prepare_run_folder(cfg: LoopConfig, ckpt_dir: Path) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"job": type(cfg).__name__, **cfg.to_dict()}, indent=2) + "\n")
    removed = remove_stale_temp_files(ckpt_dir)
    if removed:
        log.info("removed %d stale temp file(s) of checkpoint writes a killed run left in %s", removed, ckpt_dir)
