"""The training loop shared by the tokenizer and the transformer: one step contract, many guarantees.

A *task* says what a batch is and what its loss is; this loop owns everything else: the official schedule,
mixed precision, gradient accumulation and clipping, EMA, DDP, progress, metrics, evaluation and atomic,
resumable checkpoints. *The run is a pure function of (config, seed, step)*: data order comes from a
step-indexed sampler and every RNG state is checkpointed, so a run killed at any point and resumed ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from nextscale.train import dist
from nextscale.train.checkpoint import LAST, Resumed, restore_rng, rng_state, save_checkpoint
from nextscale.train.config import LoopConfig
from nextscale.train.metrics_log import MetricsLog
from nextscale.train.optim import EMA, apply_schedule, make_adamw

log = logging.getLogger("nextscale.train")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Config fields that say how this invocation runs, not what is trained: a resume may change them silently.
NOT_TRAINING_SETTINGS = ("resume", "resume_from", "stop_after", "progress", "progress_every_s")


class Task(Protocol):
    model: nn.Module  # the module being trained (unwrapped)
    generators: dict[str, torch.Generator]  # task-owned RNGs, checkpointed with the run
    images_per_step: int

    def batches(self, start_step: int) -> Iterator[Any]:
        """This rank's batch for every global step from ``start_step`` on (deterministic)."""
        ...

    def loss(
        self, model: nn.Module, batch: Any, step: int, micro: int, num_micro: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of micro-batch ``micro`` of ``batch`` (already scaled for accumulation) and metrics."""
        ...

    def after_step(self, step: int) -> dict[str, float]: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def export(self, out_dir: Path, model: nn.Module) -> Path: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Task state that must survive a resume (tensors only)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def train(
    task: Task, cfg: LoopConfig, info: dist.DistInfo, device: torch.device, resumed: Resumed | None
) -> dict[str, Any]:
    """Run ``task`` to ``cfg.steps`` (from ``resumed``); returns the last metrics and, when done, the export path."""
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    model = task.model.to(device)
    opt = make_adamw(model, cfg.lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler(
        device.type, enabled=cfg.precision == "fp16", init_scale=2.0**11, growth_interval=1000
    )
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    start = 0
    if resumed is not None:
        start = _restore(resumed.state, model, opt, scaler, ema, task, cfg)
        if info.is_main:
            log.info("resumed from %s at step %d", resumed.path, start)
    newest = resumed.path if resumed is not None else None
    ddp_model = dist.wrap(model, info, device)
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)  # type: ignore[assignment]
    metrics = MetricsLog(out / "metrics.jsonl", enabled=info.is_main, truncate_after=start if start else None)
    last: dict[str, Any] = {}
    t0, seen = time.perf_counter(), 0
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    bar, lines = _progress(cfg, start, stop, info)
    batches = task.batches(start)
    for step in range(start, stop):
        batch = next(batches)
        lr = apply_schedule(
            opt, cfg.lr, step, cfg.steps, cfg.warmup_steps, cfg.weight_decay, cfg.wd_end, cfg.wp0, cfg.wpe
        )
        stats = _optimizer_step(task, ddp_model, model, opt, scaler, batch, step, cfg, device)
        if ema is not None:
            ema.update(model)
        stats.update(task.after_step(step))
        seen += task.images_per_step
        if bar is not None:
            bar.update(1)
        if lines is not None:
            lines.update(step + 1, stats["loss"], task.images_per_step)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            dt = time.perf_counter() - t0
            stats = _mean_over_ranks(stats, info)
            last = {"step": step + 1, "lr": lr, **stats, "images_per_s": seen / max(dt, 1e-9)}
            if bar is not None:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}", refresh=False)
            metrics.write({"split": "train", **last})
            t0, seen = time.perf_counter(), 0
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val = _evaluate(task, model, ema)
            metrics.write({"split": "val", "step": step + 1, **val})
            if info.is_main:
                log.info("step %d: %s", step + 1, ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == stop:
            _checkpoint(ckpt_dir, newest, step + 1, model, opt, scaler, ema, task, cfg, info)
            newest = ckpt_dir / LAST
    if bar is not None:
        bar.close()
    result: dict[str, Any] = {"step": stop, "last": last}
    if stop == cfg.steps and info.is_main:
        if ema is not None:
            ema.copy_to(model)
        result["export"] = str(task.export(out, model))
    dist.barrier(info)
    return result


def _optimizer_step(
    task: Task,
    ddp_model: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: Any,
    step: int,
    cfg: LoopConfig,
    device: torch.device,
) -> dict[str, float]:
    sums: dict[str, float] = {}
    n = cfg.grad_accum
    for micro in range(n):
        ddp = getattr(ddp_model, "_orig_mod", ddp_model)  # torch.compile wraps the DDP module
        sync = micro == n - 1 or not isinstance(ddp, nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else ddp.no_sync(), _autocast(cfg, device):
            loss, stats = task.loss(ddp_model, batch, step, micro, n)
        scaler.scale(loss).backward()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v / n
    scaler.unscale_(opt)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return {**sums, "grad_norm": float(norm)}


def _mean_over_ranks(stats: dict[str, float], info: dist.DistInfo) -> dict[str, float]:
    """Metrics of the global batch (each rank saw a slice of it)."""
    if not info.enabled or not stats:
        return stats
    keys = sorted(stats)
    vals = dist.all_mean(torch.tensor([stats[k] for k in keys], dtype=torch.float64), info)
    return dict(zip(keys, vals.tolist()))


def _autocast(cfg: LoopConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP[cfg.precision])


def _evaluate(task: Task, model: nn.Module, ema: EMA | None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        if ema is None:
            return task.evaluate(model)
        with ema.applied(model):
            return task.evaluate(model)
    finally:
        model.train(was_training)


def _checkpoint(
    folder: Path,
    newest: Path | None,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: EMA | None,
    task: Task,
    cfg: LoopConfig,
    info: dist.DistInfo,
) -> None:
    if info.is_main:
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(task.generators),
            "config": cfg.to_dict(),
            "ema": ema.state_dict() if ema is not None else {},
            "task": task.state_dict(),
        }
        save_checkpoint(state, folder, newest)
    dist.barrier(info)


def _restore(
    state: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: EMA | None,
    task: Task,
    cfg: LoopConfig,
) -> int:
    saved = {k: v for k, v in state["config"].items() if k not in NOT_TRAINING_SETTINGS}
    now = {k: v for k, v in cfg.to_dict().items() if k in saved}
    changed = {k: (saved[k], now[k]) for k in saved if k in now and saved[k] != now[k]}
    if changed:
        log.warning("resuming with changed settings (checkpoint -> now): %s", changed)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None and state.get("ema"):
        ema.load_state_dict(state["ema"])
    restore_rng(state["rng"], task.generators)
    task.load_state_dict(state.get("task", {}))
    return int(state["step"])


def _progress(cfg: LoopConfig, start: int, stop: int, info: dist.DistInfo) -> tuple[Any, ProgressLines | None]:
    """A tqdm bar on a terminal; in logs and CI, where a bar only shows up at the end, progress lines."""
    if not (cfg.progress and info.is_main):
        return None, None
    if not sys.stderr.isatty():
        return None, ProgressLines(cfg, start, stop)
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True), None


class ProgressLines:
    """A log line every ``cfg.progress_every_s`` seconds and at each tenth of the steps: a short run still shows
    its course in ten lines, a long one never goes quiet for longer than the interval."""

    def __init__(self, cfg: LoopConfig, start: int, stop: int, clock: Callable[[], float] = time.monotonic):
        self.steps, self.start, self.stop, self.clock = cfg.steps, start, stop, clock
        self.every_s, self.stride = cfg.progress_every_s, max(1, math.ceil(cfg.steps / 10))
        self.t_start = self.t_line = clock()
        self.loss_sum, self.n, self.images = 0.0, 0, 0

    def update(self, step: int, loss: float, images: int) -> None:
        """``step`` steps are done; the latest had ``loss`` (this rank's) over ``images`` images."""
        self.loss_sum, self.n, self.images = self.loss_sum + loss, self.n + 1, self.images + images
        now = self.clock()
        if step % self.stride and now - self.t_line < self.every_s:
            return
        eta_s = (self.stop - step) * (now - self.t_start) / (step - self.start)
        log.info(
            "step %d/%d (%d%%): loss %.4f, %.1f images/s, ETA %s",
            step,
            self.steps,
            100 * step // self.steps,
            self.loss_sum / self.n,
            self.images / max(now - self.t_line, 1e-9),
            format_duration(eta_s),
        )
        self.t_line, self.loss_sum, self.n, self.images = now, 0.0, 0, 0


def format_duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
