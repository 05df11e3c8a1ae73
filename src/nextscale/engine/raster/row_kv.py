"""A KV cache where every row has its own length, and the attention layout that places each row at its own position.

Speculative decoding (``engine.raster.speculative``) batches images that have accepted different numbers of
guesses, so after the first pass every image sits at its own position. Each row keeps its own KV length (``RowKV``)
and one call covers any positions of every row — a window ``n_r .. n_r + l - 1``, several windows (ZipAR's lanes),
or a tree of guesses several of which share a position (SJD-PAC) — with a mask per query (``RowWindows``). The
layout turns q and k by each query's own RoPE angles (``models.llamagen.rotate_pairs``; the model's own rotation is
then the identity: ``start = None``). Everything a row sees — its RoPE turn, its mask — depends on that row only;
batch-mates change nothing but float rounding in the attention sums.

Shapes: ``R`` rows, ``H``/``Hkv`` query/key heads, ``l`` positions in this call, ``T`` cached positions attended
over, ``c`` head dim, ``P`` RoPE positions.
"""

from __future__ import annotations

import torch

from nextscale.engine.kv_cache import KVSlot
from nextscale.models.llamagen import LlamaGen, rotate_pairs, sdpa


class RowKV:
    """Keys/values [R, Hkv, T, c] per layer where each row has its own length (images accept different numbers of
    guesses). Nothing is rewound: a row's entries past its fixed length are overwritten by its next call and masked
    until then. Zero-initialised so that never-written slots are finite (a masked NaN would still poison ``0 * v``).

    Positions at or past ``max_len`` are not stored: only a row whose window runs off the grid computes them, as
    padding that no valid position ever attends to. ``max_len = L`` therefore suffices, which lets the serving engine
    hand a request the rows of its ordinary KV pool (``on_slot``)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v
        self.max_len = k[0].shape[2]

    @classmethod
    def allocate(cls, model: LlamaGen, rows: int, max_len: int) -> RowKV:
        cfg, w = model.cfg, model.output.weight
        shape = (rows, cfg.kv_heads, max_len, cfg.head_dim)
        return cls(
            [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)],
            [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)],
        )

    @classmethod
    def on_slot(cls, slot: KVSlot) -> RowKV:
        """Views of a pool slot's rows (zeroed here: a pool is allocated uninitialised)."""
        rows = slice(slot.start, slot.start + slot.rows)
        k, v = [t[rows] for t in slot.pool.k], [t[rows] for t in slot.pool.v]
        for t in (*k, *v):
            t.zero_()
        return cls(k, v)

    def write(
        self, layer: int, pos_Rl: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor, T: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store row r's new keys/values at positions ``pos_Rl[r]`` (those < ``max_len``); return every row's
        first T positions."""
        R, H, l, c = k_RHlc.shape
        if int(pos_Rl.max()) < self.max_len:
            idx = pos_Rl.view(R, 1, l, 1).expand(R, H, l, c)
            self.k[layer].scatter_(2, idx, k_RHlc)
            self.v[layer].scatter_(2, idx, v_RHlc)
        else:
            r, j = (pos_Rl < self.max_len).nonzero(as_tuple=True)
            self.k[layer][r, :, pos_Rl[r, j]] = k_RHlc[r, :, j]
            self.v[layer][r, :, pos_Rl[r, j]] = v_RHlc[r, :, j]
        return self.k[layer][:, :, :T], self.v[layer][:, :, :T]

    def keep(self, rows_R: torch.Tensor) -> None:
        """Keep only these rows, in this order: moved to the front of the storage (which a pool slot still owns)."""
        n = len(rows_R)
        for kv in (self.k, self.v):
            for i, t in enumerate(kv):
                t[:n] = t.index_select(0, rows_R)
                kv[i] = t[:n]


class RowWindows:
    """A ``RasterLayout`` where query i of row r sits at sequence position ``q_pos_Rl[r, i]`` of that row's own
    sequence and sees the keys ``visible_RlT[r, i]`` (default: every position up to its own). ``windows`` builds
    the common case, one contiguous window ``pos_R[r] .. pos_R[r] + l - 1`` per row; ZipAR's lanes
    (``engine.raster.speculative``) put several windows of one image, at different grid rows, in one row.

    Positions. The class-token call (every row at 0 .. l-1) lets the model apply its own RoPE (``start = 0``).
    Every other call sets ``start = None``: the model's rotation is then the identity and ``attend`` turns each
    query and key by its own position's angles, once — the same float32 operations as the model's, so a row's
    numbers do not depend on its batch-mates' positions, and any number of queries may share a position.

    Padding queries (a row with fewer positions than the call) sit at ``kv.max_len`` or beyond: their keys are not
    stored and they see position 0 only (so their softmax is finite; nothing reads their outputs).

    Deferred mode (``own_Rll`` given: a tree of guesses, several at one position): nothing is written during the
    call. Each query attends to the cached keys ``visible_RlT`` allows and to this call's own keys ``own_Rll``
    allows (query i sees input j); the call's keys and values are kept per layer, and ``commit`` writes the ones
    that turned out to be kept at their positions."""

    def __init__(
        self,
        kv: RowKV,
        q_pos_Rl: torch.Tensor,
        table_Pc2: torch.Tensor,
        visible_RlT: torch.Tensor | None = None,
        own_Rll: torch.Tensor | None = None,
    ):
        device, P = q_pos_Rl.device, table_Pc2.shape[0]
        self.kv, self.q_pos_Rl, self.own_Rll = kv, q_pos_Rl, own_Rll
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []
        real_Rl = q_pos_Rl < kv.max_len
        first = bool((q_pos_Rl[:, 0] == 0).all())
        if not first and bool((q_pos_Rl[:, 0] == 0).any()):
            raise RuntimeError("rows at position 0 must be called alone (their class token has no RoPE turn)")
        self.start: int | None = 0 if first else None
        self.T = min(int(q_pos_Rl[real_Rl].max()) + 1 if bool(real_Rl.any()) else 1, kv.max_len)
        key_pos = torch.arange(self.T, device=device)
        if visible_RlT is None:
            visible_RlT = key_pos <= q_pos_Rl[:, :, None]
        else:
            visible_RlT = visible_RlT[:, :, : self.T]
        self.mask_R1lT = torch.where(real_Rl[:, :, None], visible_RlT, key_pos == 0).unsqueeze(1)
        if own_Rll is not None:
            self.mask_R1lT = torch.cat((self.mask_R1lT, (own_Rll & real_Rl[:, :, None]).unsqueeze(1)), dim=-1)
        # Padding positions past the table only hold padding (never stored): clamp them into it.
        self.cs_Rlc2 = None if first else table_Pc2[q_pos_Rl.clamp(max=P - 1)]

    @classmethod
    def windows(cls, kv: RowKV, pos_R: torch.Tensor, l: int, table_Pc2: torch.Tensor) -> RowWindows:
        """Row r covers positions ``pos_R[r] .. pos_R[r] + l - 1``, causally (past the cache: padding)."""
        return cls(kv, pos_R[:, None] + torch.arange(l, device=pos_R.device), table_Pc2)

    def attend(self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor) -> torch.Tensor:
        if self.cs_Rlc2 is not None:
            q_RHlc, k_RHlc = rotate_pairs(q_RHlc, self.cs_Rlc2), rotate_pairs(k_RHlc, self.cs_Rlc2)
        if self.own_Rll is not None:
            self.new_k.append(k_RHlc)
            self.new_v.append(v_RHlc)
            k_RHTc = torch.cat((self.kv.k[layer][:, :, : self.T], k_RHlc), dim=2)
            v_RHTc = torch.cat((self.kv.v[layer][:, :, : self.T], v_RHlc), dim=2)
        else:
            k_RHTc, v_RHTc = self.kv.write(layer, self.q_pos_Rl, k_RHlc, v_RHlc, self.T)
        return sdpa(q_RHlc, k_RHTc, v_RHTc, mask=self.mask_R1lT)  # the model's own call: GQA expansion, scale

    def commit(self, rows_P: torch.Tensor, cols_P: torch.Tensor) -> None:
        """Deferred mode: store input ``cols_P[i]`` of row ``rows_P[i]`` at its position, in every layer."""
        pos_P = self.q_pos_Rl[rows_P, cols_P]
        for layer, (k_RHlc, v_RHlc) in enumerate(zip(self.new_k, self.new_v, strict=True)):
            self.kv.k[layer][rows_P, :, pos_P] = k_RHlc[rows_P, :, cols_P]
            self.kv.v[layer][rows_P, :, pos_P] = v_RHlc[rows_P, :, cols_P]
