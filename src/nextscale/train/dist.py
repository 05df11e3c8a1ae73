"""Optional distributed training: the single-process path is the default and stays identical.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the process group is initialised with gloo on CPU or nccl on
CUDA; models are wrapped in DDP; only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from nextscale import env


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: torch.device) -> DistInfo:
    """Join the process group if launched by torchrun; otherwise a single process."""
    launched = env.distributed()
    if launched is None:
        return DistInfo()
    rank, world, local = launched
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local)


def device_for(requested: str, info: DistInfo) -> torch.device:
    dev = torch.device(requested)
    if dev.type == "cuda" and dev.index is None and info.enabled:
        dev = torch.device("cuda", info.local_rank)
    return dev


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        tdist.all_reduce(values)
        values /= info.world_size
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and tdist.is_initialized():
        tdist.destroy_process_group()
