"""Entry point of both training jobs: set up (distributed) execution, build the task, run the loop."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from nextscale.train import dist
from nextscale.train.config import LoopConfig, VAETrainConfig, VARTrainConfig
from nextscale.train.loop import Task, train

log = logging.getLogger("nextscale.train")


def run_training(cfg: LoopConfig) -> dict[str, Any]:
    """Train (or resume) the job ``cfg`` describes; returns the final step, metrics and export path."""
    info = dist.init(torch.device(cfg.device))
    device = dist.device_for(cfg.device, info)
    if info.is_main:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"job": type(cfg).__name__, **cfg.to_dict()}, indent=2) + "\n")
    else:
        logging.getLogger("nextscale").setLevel(logging.WARNING)  # rank-0-only logging
    try:
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
            log.info("%s: %s parameters, %d steps of %d images on %d process(es)", type(cfg).__name__, f"{n:,}",
                     cfg.steps, cfg.batch_size, info.world_size)
        result = train(task, cfg, info, device)
        result["is_main"] = info.is_main
        return result
    finally:
        dist.shutdown(info)
