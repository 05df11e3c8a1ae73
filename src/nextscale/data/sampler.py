"""Step-indexed, sharded data order: which dataset indices each rank trains on at each global step.

The order is a pure function of ``(seed, epoch)``, so resuming at any step reproduces an uninterrupted run
exactly, and the ranks of a distributed run split every global batch without overlap.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from nextscale.errors import ConfigError


def seed_of(*parts: int) -> int:
    """Mix non-negative ints into one 64-bit seed (no collisions between nearby tuples, unlike a*K+b)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class ShardedBatchSampler:
    """Step-indexed data order: epoch ``e`` is a permutation seeded by ``(seed, e)``; step ``s`` takes the
    ``s``-th global batch of ``batch_size * world_size`` indices and rank ``r`` gets its ``r``-th slice.

    ``batches(start_step)`` therefore yields exactly what an uninterrupted run yields from that step on,
    whatever the step. With ``drop_last`` the tail of each epoch that does not fill a global batch is skipped;
    without it the last batch is completed with indices from the start of the same epoch's permutation.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True
    ):
        for name, v, lo in (
            ("num_items", num_items, 1),
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ConfigError(f"rank must be in 0..{world_size - 1} (world_size {world_size}), got {rank}")
        if drop_last and num_items < batch_size * world_size:
            raise ConfigError(
                f"the dataset has {num_items} items, fewer than one global batch of {batch_size} x "
                f"{world_size} rank(s); use a smaller batch or drop_last=False"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        n, g = self.num_items, self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_of(self.seed, epoch))
        return torch.randperm(self.num_items, generator=g)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        perm = self.permutation(epoch)
        need = self.steps_per_epoch * self.global_batch_size
        if need > len(perm):  # not drop_last: wrap around to fill the last global batch
            perm = perm.repeat(-(-need // len(perm)))[:need]
        return perm

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, int, list[int]]]:
        """Yield ``(step, epoch, this rank's indices)`` for every step from ``start_step`` on, forever."""
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ConfigError(f"start_step must be an int >= 0, got {start_step!r}")
        spe, g, b = self.steps_per_epoch, self.global_batch_size, self.batch_size
        step = start_step
        while True:
            epoch, offset = divmod(step, spe)
            order = self._epoch_order(epoch)
            for s in range(offset, spe):
                lo = s * g + self.rank * b
                yield epoch * spe + s, epoch, order[lo : lo + b].tolist()
            step = (epoch + 1) * spe
