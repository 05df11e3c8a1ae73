"""Runs one fused GPT call over the raster requests scheduled in an iteration (Flover's temporal fusion, per token).

Every scheduled request contributes one new position of each of its rows, each request at its own position ``t``:
their inputs are stacked into one [N, 1, C] matrix, so every linear layer is one GEMM over all rows of all requests.
Attention is per request over its own KV slot of one ``KVPool`` (requests at the same position whose slots are
adjacent attend in one call over one slice of the pool, as ``engine.runner`` does for VAR scales).

Positions. ``LlamaGen.forward_tokens`` turns every row by the RoPE angles of one position, ``layout.start``. The
layout here sets ``start`` to image token (0, 0), whose angles are all zero: the model's own rotation is then an
exact identity (``x * 1 - y * 0 == x``), and ``attend`` turns q and k by each row's true position with the same
float32 operations as the model's ``apply_rope``. Each row's numbers are therefore bit-identical to a call at its own
position (``CachedCausal``), which the engine's contract (an image equals the pipeline's, token for token) needs.

Shapes: ``N`` rows of the fused call, ``H``/``Hkv`` query/key heads, ``c`` head dim, ``P`` RoPE positions (1 + L).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nextscale.engine.kv_cache import KVSlot
from nextscale.engine.raster.state import RasterGeneration, SpeculativeGeneration
from nextscale.errors import InvalidInputError
from nextscale.models.llamagen import LlamaGen, rotate_pairs, sdpa
from nextscale.models.tokenizers import to_unit_range_
from nextscale.models.tokenizers.raster import RasterTokenizer

# Image token (0, 0): all its RoPE angles are 0, so the model's shared rotation leaves q and k exactly as they are.
IDENTITY_POSITION = 1


def check_tokenizer(model: LlamaGen, tokenizer: RasterTokenizer) -> None:
    have, want = (tokenizer.vocab_size, tokenizer.grid), (model.vocab_size, model.cfg.grid_size)
    if have != want:
        raise InvalidInputError(f"the tokenizer (codebook, grid) is {have}, the GPT needs {want}")


def row_preview(tokenizer: RasterTokenizer, tokens_BL: torch.Tensor, rows: int) -> torch.Tensor:
    """Images [B, C, H, W] in [0, 1] of the first ``rows`` rows of the token grid, every later position filled with
    the tokenizer's mean code vector (a flat, neutral region), as ``LlamaGenPipeline``'s row previews."""
    return to_unit_range_(tokenizer.decode_rows(tokens_BL, rows))


def decode_steps(tokenizer: RasterTokenizer, tokens_BL: torch.Tensor) -> Iterator[torch.Tensor]:
    """The final decode as the engine's decode jobs run it (pieces, the last one the images in [-1, 1]): one piece,
    since a raster tokenizer decodes in one call. A generator, so that nothing runs before the job does."""
    yield tokenizer.decode_tokens(tokens_BL)


@dataclass(frozen=True)
class RowSpan:
    """Rows [r0, r1) of the fused call: one request, or several at position ``t`` with adjacent slots (``slots``)."""

    r0: int
    r1: int
    t: int
    slots: tuple[KVSlot, ...]

    @property
    def full(self) -> bool:
        """Every slot is written in full (a request whose guidance has ended feeds fewer rows: it attends alone)."""
        return self.r1 - self.r0 == sum(s.rows for s in self.slots)


class TokenStep:
    """A ``RasterLayout`` for one fused step: row n holds one new position of its request, whose RoPE (cos, sin)
    is ``cs_N1c2[n]``; ``spans`` say which rows attend over which KV slots."""

    start = IDENTITY_POSITION

    def __init__(self, spans: list[RowSpan], cs_N1c2: torch.Tensor):
        self.spans, self.cs_N1c2 = spans, cs_N1c2

    def attend(self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor) -> torch.Tensor:
        """``R = N``: every row of the call, ``l = 1``."""
        q_RHlc, k_RHlc = rotate_pairs(q_RHlc, self.cs_N1c2), rotate_pairs(k_RHlc, self.cs_N1c2)
        out = torch.empty_like(q_RHlc)
        for sp in self.spans:
            rows = slice(sp.r0, sp.r1)
            k_all, v_all = sp.slots[0].pool.write_run(layer, list(sp.slots), k_RHlc[rows], v_RHlc[rows])
            out[rows] = sdpa(q_RHlc[rows], k_all, v_all)  # the model's own call: same scale, same GQA expansion
        return out


class RasterRunner:
    """Executes scheduled raster units: pack -> one GPT call -> per-request draw and advance."""

    def __init__(self, model: LlamaGen):
        self.model = model
        self._table_Pc2 = model.rope(0, model.cfg.num_positions, model.output.weight.device)

    @torch.inference_mode()
    def execute(self, units: list[RasterGeneration | SpeculativeGeneration]) -> None:
        """Advance every unit by one step: the one-token units (ordered by position, then KV slot, so that requests
        admitted together attend together) in one fused call, then each speculative unit in a call of its own.

        Why speculative passes are not fused: a pass feeds every row a window at the row's own position, with its
        own mask over its own cache (``RowWindows``); fusing requests would pad every row to the longest window
        and attend row by row — on a CPU, where a pass's cost is its row-positions, that buys nothing."""
        tokens = [u for u in units if isinstance(u, RasterGeneration)]
        if tokens:
            self._token_step(tokens)
        for u in units:
            if isinstance(u, SpeculativeGeneration):
                u.advance(self.model.forward_tokens(*u.inputs()))

    def _token_step(self, units: list[RasterGeneration]) -> None:
        ordered = sorted(units, key=lambda u: (u.t, u.kv.start))
        x_N1C = torch.cat([u.x for u in ordered]) if len(ordered) > 1 else ordered[0].x
        pos_N = torch.tensor([u.t for u in ordered for _ in range(u.rows)], device=x_N1C.device)
        layout = TokenStep(self._spans(ordered), self._table_Pc2[pos_N].unsqueeze(1))
        logits_N1V = self.model.forward_tokens(x_N1C, layout)
        r = 0
        for u in ordered:
            rows = u.rows
            u.advance(logits_N1V[r : r + rows, -1])
            r += rows

    @staticmethod
    def _spans(units: list[RasterGeneration]) -> list[RowSpan]:
        spans: list[RowSpan] = []
        r = 0
        for u in units:
            prev = spans[-1] if spans else None
            span = RowSpan(r, r + u.rows, u.t, (u.kv,))
            if (
                prev is not None
                and prev.full
                and span.full
                and prev.t == u.t
                and prev.slots[-1].pool is u.kv.pool
                and prev.slots[-1].start + prev.slots[-1].rows == u.kv.start
            ):
                spans[-1] = RowSpan(prev.r0, span.r1, u.t, (*prev.slots, u.kv))
            else:
                spans.append(span)
            r += u.rows
        return spans
