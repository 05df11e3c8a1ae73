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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from nextscale.models.attention import KVGeometry

if TYPE_CHECKING:
    from nextscale.engine.var.plan import StepPlan


class KVModel(Protocol):
    """A model whose KV cache the caller owns: it says what one row holds (``models.attention.KVGeometry``)."""

    def kv_geometry(self) -> KVGeometry: ...


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

    def attend(
        self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor, scale: float
    ) -> torch.Tensor:
        k, v = self.write(layer, k_RHlc, v_RHlc)
        return F.scaled_dot_product_attention(q_RHlc, k, v, scale=scale)


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
    def for_model(cls, model: KVModel, rows: int, max_len: int | None = None) -> KVPool:
        """A pool of ``rows`` rows of the model's full length (or ``max_len`` positions)."""
        g = model.kv_geometry()
        return cls(g.layers, rows, g.heads, g.head_dim, max_len or g.max_len, g.dtype, g.device)

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

    def attend(
        self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Append this scale's keys/values, then attend over everything cached (the plain cached step)."""
        k, v = self.write(layer, k_RHlc, v_RHlc)
        return F.scaled_dot_product_attention(q_RHlc, k, v, scale=scale)

    @property
    def keys_seen(self) -> list[int]:
        """Per layer, the keys the last step's queries attended to."""
        return self.lengths

    @property
    def nbytes_reserved(self) -> int:
        return self.nbytes_used

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
    def for_model(cls, model: KVModel, rows: int, max_len: int | None = None) -> KVCache:
        return cls(KVPool.for_model(model, rows, max_len))

    def free(self) -> None:
        super().free()
        self.pool.k.clear()  # the pool is private: its memory goes with the slot
        self.pool.v.clear()


# ---- compressed caches (ScaleKV, HACK) --------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Rows [r0, r1) of one layer's compressed cache, stored at cell ``cell`` of pool layer ``bin``'s memory
    (a cell holds one position of one row: H x c numbers)."""

    bin: int
    cell: int
    r0: int
    r1: int


def pack_layers(rows: int, caps: Sequence[int], bin_cells: int, bins: int) -> list[list[Piece]] | None:
    """Place every layer's compressed cache, ``rows`` x ``caps[j]`` cells, into ``bins`` bins of ``bin_cells``
    cells each (the pool rows a request holds, in every pool layer), splitting a layer's rows across bins where one
    is full. None if they do not fit. A layer's cache then need not be as long as the pool's rows: layers that keep
    few positions share the memory that one full-length layer would take."""
    out: list[list[Piece]] = []
    b = cell = 0
    for cap in caps:
        pieces: list[Piece] = []
        r = 0
        while r < rows and cap > 0:
            fit = (bin_cells - cell) // cap
            if fit == 0:
                b, cell = b + 1, 0
                if b >= bins:
                    return None
                continue
            t = min(fit, rows - r)
            pieces.append(Piece(b, cell, r, r + t))
            cell += t * cap
            r += t
        out.append(pieces)
    return out


def compact_rows(rows: int, caps: Sequence[int], seq_len: int) -> int:
    """Pool rows that hold a compressed cache of ``rows`` rows with per-layer capacities ``caps``."""
    depth = len(caps)
    m = max(1, math.ceil(rows * sum(caps) / (depth * seq_len)))
    while pack_layers(rows, caps, m * seq_len, depth) is None:  # ends by m = rows when every cap <= seq_len
        m += 1
    return m


class CompactKV:
    """A compressed KV cache: per layer at most ``caps[layer]`` positions per row and head, chosen after every
    scale by the step's ``kv_select`` (ScaleKV's per-layer budgets, HACK's head-aware rule), stored in pool rows.

    A compressing step attends over the kept history plus its own keys (concatenated for that one layer), then
    keeps ``kv_keep[layer]`` of them — so the current scale's keys are never stored at full length, and a last
    scale with ``kv_keep`` 0 stores nothing. Each head keeps its own positions; all heads of a layer keep the same
    number. The memory is ``slot.rows`` rows of a ``KVPool`` (all its layers), packed by ``pack_layers``.
    """

    def __init__(self, slot: KVSlot, rows: int, caps: Sequence[int]):
        pool = slot.pool
        self.slot, self.rows, self.caps = slot, rows, tuple(caps)
        H, c = pool.k[0].shape[1], pool.k[0].shape[3]
        bin_cells = slot.rows * pool.max_len
        packed = pack_layers(rows, self.caps, bin_cells, pool.num_layers)
        if packed is None:
            raise RuntimeError(f"a compressed cache of {rows} rows x {self.caps} does not fit in {slot.rows} pool rows")

        def view(t: torch.Tensor, p: Piece, cap: int) -> torch.Tensor:
            flat = t[slot.start : slot.start + slot.rows].view(-1)
            return flat[(p.cell) * H * c : (p.cell + (p.r1 - p.r0) * cap) * H * c].view(p.r1 - p.r0, H, cap, c)

        self.pieces = packed
        self.k = [[view(pool.k[p.bin], p, cap) for p in ps] for ps, cap in zip(packed, self.caps)]
        self.v = [[view(pool.v[p.bin], p, cap) for p in ps] for ps, cap in zip(packed, self.caps)]
        self.lengths = [0] * len(self.caps)
        self.keys_seen = [0] * len(self.caps)
        self.element_bytes = 2 * H * c * pool.k[0].element_size()
        self.step: StepPlan | None = None  # the current scale's plan (set by ``Generation`` before each step)
        self.si, self.pn = 0, 1

    @classmethod
    def own(cls, model: KVModel, rows: int, caps: Sequence[int]) -> CompactKV:
        """A compressed cache with a private pool (the pipeline's sampler)."""
        seq_len = model.kv_geometry().max_len
        return cls(KVCache.for_model(model, compact_rows(rows, caps, seq_len)), rows, caps)

    @property
    def length(self) -> int:
        return self.lengths[-1]

    @property
    def start(self) -> int:
        return self.slot.start

    def attend(
        self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor, scale: float
    ) -> torch.Tensor:
        step = self.step
        keep = None if step is None or step.kv_keep is None else step.kv_keep[layer]
        n, R, l = self.lengths[layer], q_RHlc.shape[0], q_RHlc.shape[2]
        self.keys_seen[layer] = n + l
        fits = keep is None or n + l <= keep
        if fits and n + l > self.caps[layer]:
            raise RuntimeError(f"compressed KV cache overflow in layer {layer}: {n + l} > {self.caps[layer]}")
        out = torch.empty_like(q_RHlc)
        for p, k_st, v_st in zip(self.pieces[layer], self.k[layer], self.v[layer]):
            if p.r0 >= R:  # an unguided scale runs fewer rows: the unconditional ones are never read again
                continue
            r1 = min(p.r1, R)
            rows, mine = slice(p.r0, r1), slice(0, r1 - p.r0)
            q, k, v = q_RHlc[rows], k_RHlc[rows], v_RHlc[rows]
            if fits:  # room for this scale's keys: append in place, as an uncompressed cache does
                k_st[mine, :, n : n + l].copy_(k)
                v_st[mine, :, n : n + l].copy_(v)
                k_all, v_all = k_st[mine, :, : n + l], v_st[mine, :, : n + l]
            else:
                k_all = torch.cat((k_st[mine, :, :n], k), dim=2)
                v_all = torch.cat((v_st[mine, :, :n], v), dim=2)
            out[rows] = F.scaled_dot_product_attention(q, k_all, v_all, scale=scale)
            if not fits and keep:
                assert step is not None and step.kv_select is not None
                idx_RHk = step.kv_select(layer, self.si, self.pn, q, k_all, scale, keep)
                gather = idx_RHk.unsqueeze(-1).expand(*idx_RHk.shape, k.shape[-1])
                k_st[mine, :, :keep].copy_(k_all.gather(2, gather))
                v_st[mine, :, :keep].copy_(v_all.gather(2, gather))
        if not fits:
            self.lengths[layer] = keep or 0
        else:
            self.lengths[layer] = n + l
        return out

    @property
    def nbytes_used(self) -> int:
        return self.element_bytes * self.rows * sum(self.lengths)

    @property
    def nbytes_reserved(self) -> int:
        """Bytes the cache may hold at its fullest (its per-layer capacities): what it takes from a pool."""
        return self.element_bytes * self.rows * sum(self.caps)

    def check_integrity(self, uniform: bool = True) -> None:
        assert all(0 <= n <= c for n, c in zip(self.lengths, self.caps)), f"lengths {self.lengths} > {self.caps}"
        self.slot.check_integrity(uniform=False)

    def free(self) -> None:
        self.slot.free()
        self.lengths = []


RequestKV = KVSlot | CompactKV  # what a request's ``Generation`` holds for one transformer
