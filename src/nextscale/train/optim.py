"""The official VAR optimisation recipe: AdamW parameter groups, learning-rate and weight-decay schedules.

* No weight decay for 1-D parameters, biases, and names containing any of the official keys below (so
  ``class_emb.weight`` DOES decay).
* ``lr_factor`` is the official ``lin0`` schedule: linear warm-up from ``wp0`` to 1, flat for the first 5 % of
  the remaining steps, then linear decay to ``wpe``. Weight decay anneals with a half cosine from ``wd`` to
  ``wd_end``. Both are pure functions of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

NO_WD_KEYS = (
    "cls_token",
    "start_token",
    "task_token",
    "cfg_uncond",
    "pos_embed",
    "pos_1LC",
    "pos_start",
    "start_pos",
    "lvl_embed",
    "gamma",
    "beta",
    "ada_gss",
    "moe_bias",
    "scale_mul",
)


def param_groups(model: nn.Module, no_wd_keys: tuple[str, ...] = NO_WD_KEYS) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith("bias") or any(k in name for k in no_wd_keys):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "wd_scale": 1.0}, {"params": no_decay, "wd_scale": 0.0}]


def make_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    groups = param_groups(model)
    for g in groups:
        g["weight_decay"] = weight_decay * g["wd_scale"]
    kw = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kw)


def lr_factor(step: int, total: int, warmup: int, wp0: float = 0.005, wpe: float = 0.01) -> float:
    """Official ``lin0``: multiply the peak learning rate by this at ``step`` of ``total``."""
    if warmup > 0 and step < warmup:
        return wp0 + (1 - wp0) * step / warmup
    passed = (step - warmup) / max(1, total - 1 - warmup)
    T = 0.05
    if passed < T:
        return 1.0
    return wpe + (1 - wpe) * (1 - passed) / (1 - T)


def wd_at(step: int, total: int, wd: float, wd_end: float) -> float:
    passed = step / max(1, total - 1)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * passed))


def apply_schedule(
    opt: torch.optim.Optimizer,
    peak_lr: float,
    step: int,
    total: int,
    warmup: int,
    wd: float,
    wd_end: float,
    wp0: float = 0.005,
    wpe: float = 0.01,
) -> float:
    lr = peak_lr * lr_factor(step, total, warmup, wp0, wpe)
    cur_wd = wd_at(step, total, wd, wd_end)
    for g in opt.param_groups:
        g["lr"] = lr
        g["weight_decay"] = cur_wd * g.get("wd_scale", 1.0)
    return lr


def progressive_stage(step: int, total: int, warmup: int, pg: float, pg0: int, num_scales: int) -> int:
    """Official progressive training: how many scales (minus one) are trained at ``step``; -1 = all.

    During warm-up only the first ``pg0 + 1`` scales; then one more scale at a time until ``pg * total``.
    """
    if pg <= 0:
        return -1
    if step <= warmup:
        return pg0
    if step >= total * pg:
        return num_scales - 1
    progress = min(max((step - warmup) / (total * pg - warmup), 0.0), 1.0)
    return pg0 + round(progress * (num_scales - 1 - pg0))


class EMA:
    """Exponential moving average of a model's parameters (the weights exported for sampling).

    Parameters only: buffers are constants or derived (VAR's mask holds -inf, and lerp(-inf, -inf) is NaN).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in self.shadow.items():
            v.copy_(sd[k])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k])

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in ``model`` for the duration of the block; the trained ones afterwards."""
        trained = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(trained[k])
