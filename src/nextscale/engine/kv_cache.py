"""Explicit key/value caches for next-scale sampling.

A VAR generation has a fixed total length (``L`` = 680 tokens at 256 px), so a cache is preallocated once
per request: per layer, keys and values of shape [R, H, L, c]. Each scale appends ``l`` positions to every
layer. The model never holds a cache; callers pass one into ``CachedStep`` (or the engine's ragged layout).

``ConcatKVCache`` is the reference implementation (grows by concatenation, like the official code); the
preallocated caches must give identical attention inputs. The serving engine allocates caches as row ranges
(``KVSlot``) of one ``KVPool``: requests at the same scale whose slots are adjacent then attend in one call over a
contiguous slice of the pool, with no copy (Flover keeps batches contiguous the same way). The pipeline's
``KVCache`` is the same thing with a pool of its own.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nextscale.models.var import VAR


class ConcatKVCache:
    """The official scheme, kept as the oracle: each scale's keys/values are concatenated to the cache."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def write(self, layer: int, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.k[layer], self.v[layer]
        k = k_RHlc if old_k is None else torch.cat((old_k, k_RHlc), dim=2)
        v = v_RHlc if old_v is None else torch.cat((old_v, v_RHlc), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class KVPool:
    """Per-layer key/value storage [rows, H, L, c] shared by many requests, handed out as row ranges.

    Which rows a request gets is decided by the scheduler's ``RowAllocator`` (plain Python); the pool only
    holds the tensors and the live slots.
    """

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (rows, num_heads, max_len, head_dim)
        # torch.empty does not touch the pages: memory is committed as slots are first written.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows, self.max_len, self.num_layers = rows, max_len, num_layers
        self.slots: dict[int, KVSlot] = {}

    @classmethod
    def for_model(cls, model: VAR, rows: int) -> KVPool:
        cfg, w = model.cfg, model.head.weight
        return cls(cfg.depth, rows, cfg.num_heads, cfg.head_dim, cfg.seq_len, w.dtype, w.device)

    def slot(self, start: int, rows: int) -> KVSlot:
        assert start >= 0 and start + rows <= self.rows, f"rows {start}..{start + rows} outside the pool"
        for other in self.slots.values():
            assert start + rows <= other.start or other.start + other.rows <= start, "overlapping KV slots"
        slot = KVSlot(self, start, rows)
        self.slots[start] = slot
        return slot

    def write_run(
        self, layer: int, run: list[KVSlot], k_RHlc: torch.Tensor, v_RHlc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append for several adjacent slots at the same length with one copy; their keys/values as one view.

        A single slot may be written with fewer rows than it holds (an unguided scale writes the conditional rows
        only; the unconditional rows are never read again)."""
        first, n, l = run[0], run[0].lengths[layer], k_RHlc.shape[2]
        end = run[-1].start + run[-1].rows
        rows = slice(first.start, first.start + k_RHlc.shape[0])
        assert rows.stop == end or (len(run) == 1 and rows.stop < end), "rows do not match the slots"
        assert all(a.start + a.rows == b.start for a, b in itertools.pairwise(run)), "slots are not adjacent"
        assert all(s.lengths[layer] == n for s in run), "slots at different lengths"
        self.k[layer][rows, :, n : n + l].copy_(k_RHlc)
        self.v[layer][rows, :, n : n + l].copy_(v_RHlc)
        for s in run:
            s.lengths[layer] = n + l
        return self.k[layer][rows, :, : n + l], self.v[layer][rows, :, : n + l]


class KVSlot:
    """One request's rows [start, start+rows) of a ``KVPool``; same interface as ``KVCache``."""

    def __init__(self, pool: KVPool, start: int, rows: int):
        self.pool, self.start, self.rows = pool, start, rows
        self.lengths = [0] * pool.num_layers
        self.max_len = pool.max_len

    @property
    def length(self) -> int:
        return self.lengths[-1]

    def write(self, layer: int, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lengths[layer] + k_RHlc.shape[2] > self.max_len:
            raise RuntimeError(f"KV cache overflow in layer {layer}")
        return self.pool.write_run(layer, [self], k_RHlc, v_RHlc)

    @property
    def nbytes_used(self) -> int:
        """Bytes of the keys and values written so far (layers may hold different lengths, e.g. under pruning)."""
        p = self.pool
        if not p.k:
            return 0
        per_position = 2 * self.rows * p.k[0].shape[1] * p.k[0].shape[3] * p.k[0].element_size()
        return per_position * sum(self.lengths)

    def check_integrity(self, uniform: bool = True) -> None:
        """Lengths within bounds; with ``uniform`` (the exact plan) every layer at the same length."""
        assert not uniform or len(set(self.lengths)) == 1, f"layers out of step: {self.lengths}"
        assert all(0 <= n <= self.max_len for n in self.lengths), f"lengths {self.lengths} outside [0, {self.max_len}]"
        assert self.pool.slots.get(self.start) is self, "slot not owned by its pool"

    def free(self) -> None:
        if self.pool.slots.get(self.start) is self:
            del self.pool.slots[self.start]
        self.lengths = []


class KVCache(KVSlot):
    """A cache of its own for one batch (the pipeline's sampler): a ``KVSlot`` spanning a private one-slot pool,
    so the pool and the engine's slots share one write path and one integrity check."""

    def __init__(self, pool: KVPool):
        super().__init__(pool, 0, pool.rows)
        pool.slots[0] = self

    @classmethod
    def for_model(cls, model: VAR, rows: int, max_len: int | None = None) -> KVCache:
        cfg, w = model.cfg, model.head.weight
        return cls(KVPool(cfg.depth, rows, cfg.num_heads, cfg.head_dim, max_len or cfg.seq_len, w.dtype, w.device))

    def free(self) -> None:
        super().free()
        self.pool.k.clear()  # the pool is private: its memory goes with the slot
        self.pool.v.clear()
