"""Runs one fused transformer call over several requests, each at its own scale ("selective batching").

The tokens of all scheduled units — every request's conditional and unconditional rows at that request's
current scale — are packed into one [N, C] matrix, so every linear layer is one GEMM over all of them. Only
two things are per request: the AdaLN vectors (per row, applied per segment of equal-length rows) and
attention, which each request runs over its own KV cache. Units are ordered by scale so that requests at the
same scale form one segment.

Shapes: ``N`` packed tokens, ``R`` packed rows, ``l`` tokens per row of a unit, ``H`` heads, ``c`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nextscale.engine.kv_cache import KVSlot
from nextscale.engine.var.state import Generation, ScaleResult
from nextscale.models.attention import KVAttend
from nextscale.models.var import VAR, Conditioning


@dataclass(frozen=True)
class Segment:
    """Consecutive rows of equal length: tokens [t0, t1), rows [r0, r1), ``l`` tokens per row."""

    t0: int
    t1: int
    r0: int
    r1: int
    l: int


@dataclass(frozen=True)
class AttnSpan:
    """Tokens [t0, t1) = ``rows`` x ``l`` queries of one request — or of several requests at the same scale
    whose KV-pool slots are adjacent (``slots``), which then attend in one call over one slice of the pool."""

    t0: int
    t1: int
    rows: int
    l: int
    kv: KVAttend | None = None  # a request's own store (e.g. a compressed cache), which attends by itself
    slots: tuple[KVSlot, ...] = ()

    @property
    def rows_full(self) -> bool:
        """Every slot of the span is written in full (no unguided unit among them)."""
        return bool(self.slots) and self.rows == sum(s.rows for s in self.slots)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.slots:
            k_all, v_all = self.slots[0].pool.write_run(layer, list(self.slots), k, v)
            return F.scaled_dot_product_attention(q, k_all, v_all, scale=scale)
        assert self.kv is not None
        return self.kv.attend(layer, q, k, v, scale)


class RaggedStep:
    """Layout of a packed call: tokens [N, C], q/k/v [N, H, c]."""

    def __init__(self, segments: list[Segment], spans: list[AttnSpan], device: torch.device | str = "cpu"):
        self.segments, self.spans = segments, spans
        # With several segments (requests at different scales), per-token AdaLN vectors are gathered by one
        # index instead of one small op per segment: the iteration's cost then no longer grows with the number
        # of distinct scales in it (measured ~0.7 ms per extra scale on the demo model, which cost tail latency).
        self.row_N = (
            None
            if len(segments) < 2
            else torch.cat([torch.arange(s.r0, s.r1, device=device).repeat_interleave(s.l) for s in segments])
        )

    def _rows(self, x: torch.Tensor, s: Segment) -> torch.Tensor:
        return x[s.t0 : s.t1].view(s.r1 - s.r0, s.l, x.shape[-1])

    def modulate(self, h: torch.Tensor, scale_RC: torch.Tensor, shift_RC: torch.Tensor) -> torch.Tensor:
        # ``h`` is a fresh LayerNorm output, so it is updated in place (same elementwise ops in the same order as
        # the dense layout: h * (1 + scale) + shift, so the values are bit-identical).
        if self.row_N is not None:
            return h.mul_(scale_RC.add(1).index_select(0, self.row_N)).add_(shift_RC.index_select(0, self.row_N))
        for s in self.segments:
            hs = self._rows(h, s)
            hs.mul_(scale_RC[s.r0 : s.r1].unsqueeze(1).add(1)).add_(shift_RC[s.r0 : s.r1].unsqueeze(1))
        return h

    def gate(self, y: torch.Tensor, gamma_RC: torch.Tensor) -> torch.Tensor:
        if self.row_N is not None:
            return y.mul_(gamma_RC.index_select(0, self.row_N))
        for s in self.segments:
            self._rows(y, s).mul_(gamma_RC[s.r0 : s.r1].unsqueeze(1))
        return y

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        H, c = q.shape[-2:]
        for sp in self.spans:

            def per_row(t: torch.Tensor, sp: AttnSpan = sp) -> torch.Tensor:
                return t[sp.t0 : sp.t1].view(sp.rows, sp.l, H, c).transpose(1, 2)  # [R, H, l, c]

            o = sp.attend(layer, per_row(q), per_row(k), per_row(v), scale)
            out[sp.t0 : sp.t1].view(sp.rows, sp.l, H, c).copy_(o.transpose(1, 2))
        return out


class ModelRunner:
    """Executes scheduled units: pack -> one transformer call -> per-request sampling and advance."""

    def __init__(self, var: VAR):
        self.var = var
        self.lvl_pos = var.level_pos()  # shared by every request

    @torch.inference_mode()
    def execute(self, units: list[Generation]) -> list[ScaleResult]:
        """Advance every unit by one scale (each unit = one request at its current scale).

        Units whose plan changes what the blocks compute (a block hook, e.g. token pruning) or that recompute a
        prefix run on their own, in the dense layout their plan gives; all others are fused into one call."""
        results: list[ScaleResult | None] = [None] * len(units)
        by_model: dict[int, list[int]] = {}
        for i, u in enumerate(units):
            if u.step.hook is None and not u.prefill:
                by_model.setdefault(id(u.model), []).append(i)
        for fused in by_model.values():  # one fused call per transformer (the main one, a CoDe refiner)
            for i, r in zip(fused, self._fused([units[i] for i in fused])):
                results[i] = r
        for i, u in enumerate(units):
            if results[i] is None:
                results[i] = u.advance(u.model.forward_tokens(u.x, u.cond, u.layout(), u.block_fn()))
        return [r for r in results if r is not None]

    def _fused(self, units: list[Generation]) -> list[ScaleResult]:
        # By scale, then by KV-pool row: same-scale requests with adjacent slots become one attention call.
        order = sorted(range(len(units)), key=lambda i: (units[i].si, units[i].kv.start))
        ordered = [units[i] for i in order]
        model = ordered[0].model
        assert all(u.model is model for u in ordered), "a fused call runs on one transformer"
        C = model.C
        x = torch.cat([u.x.reshape(-1, C) for u in ordered]) if len(ordered) > 1 else ordered[0].x.reshape(-1, C)
        cond = Conditioning.cat([u.cond for u in ordered])
        layout = RaggedStep(*self._plan(ordered), device=x.device)
        logits_NV = model.forward_tokens(x, cond, layout)
        results: list[ScaleResult] = [None] * len(units)  # type: ignore[list-item]
        t = 0
        for i, u in zip(order, ordered):
            n = u.rows * u.tokens_this_scale
            results[i] = u.advance(logits_NV[t : t + n].view(u.rows, u.tokens_this_scale, -1))
            t += n
        return results

    @staticmethod
    def _plan(units: list[Generation]) -> tuple[list[Segment], list[AttnSpan]]:
        segments: list[Segment] = []
        spans: list[AttnSpan] = []
        t = r = 0
        for u in units:
            l, rows = u.tokens_this_scale, u.rows
            prev = spans[-1] if spans else None
            if (
                isinstance(u.kv, KVSlot)
                and rows == u.kv.rows  # a unit writing fewer rows than its slot (unguided) attends alone
                and prev is not None
                and prev.rows_full
                and prev.slots
                and prev.l == l
                and prev.slots[-1].pool is u.kv.pool
                and prev.slots[-1].start + prev.slots[-1].rows == u.kv.start
                and prev.slots[-1].lengths == u.kv.lengths
            ):
                spans[-1] = AttnSpan(prev.t0, t + rows * l, prev.rows + rows, l, slots=(*prev.slots, u.kv))
            elif isinstance(u.kv, KVSlot):
                spans.append(AttnSpan(t, t + rows * l, rows, l, slots=(u.kv,)))
            else:
                spans.append(AttnSpan(t, t + rows * l, rows, l, kv=u.kv))
            if segments and segments[-1].l == l:
                last = segments[-1]
                segments[-1] = Segment(last.t0, t + rows * l, last.r0, r + rows, l)
            else:
                segments.append(Segment(t, t + rows * l, r, r + rows, l))
            t += rows * l
            r += rows
        return segments, spans
