"""The state of one raster (LlamaGen) request in the serving engine: which token it draws next, from what.

The engine's counterpart of ``engine.state.Generation`` for raster models. *A step feeds ``x`` (every row's input at
position ``t``: the class token at t = 0, else token t-1) through the GPT, and ``advance`` turns the step's logits
into token ``t``.* Who runs the GPT is not this module's business: ``engine.raster.runner`` packs the steps of many
requests, each at its own position, into one call.

A request draws exactly what ``engine.raster.sample_raster`` draws for the same labels, settings and generators:
the same pure functions (``cfg_guide``, ``filter_logits_``, ``draw_exponential_``) in the same order, the same rows
(the null-class rows leave once guidance has ended, ``cfg_interval``; their cache rows are never read again) and
one exponential draw per image and step from the request's own generators.

Shapes: ``B`` images, ``R`` rows (2B with guidance: conditional rows first), ``L`` image tokens, ``V`` codes,
``C`` width.
"""

from __future__ import annotations

import torch

from nextscale.engine.kv_cache import KVSlot
from nextscale.engine.raster.params import RasterParams
from nextscale.engine.raster.row_kv import RowKV, RowWindows
from nextscale.engine.raster.sampler import cfg_guide, draw_exponential_, filter_logits_
from nextscale.engine.raster.speculative import SpeculativeDecoder, SpeculativePlan
from nextscale.engine.sampling import Generators, cfg_labels
from nextscale.models.llamagen import LlamaGen


def raster_units(
    params: RasterParams, num_images: int, num_tokens: int, positions: int = 1
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """The scheduler's view of a request: (KV rows it holds, query tokens per row of each unit, rows of each unit).

    One unit per token; a unit computes one position of every row still fed (both guidance rows while the token is
    guided, the conditional ones after ``cfg_interval``), so it costs that many tokens. A speculative request
    computes up to ``positions`` per row and pass (``SpeculativePlan.max_positions``: its window, or its windows of
    every ZipAR lane), and a pass completes one or more units (the engine tells the scheduler how many: the tokens
    every image has fixed)."""
    rows = 2 * num_images if params.guided else num_images
    unit_rows = tuple(rows if params.guided_at(t) else num_images for t in range(num_tokens))
    return rows, (positions,) * num_tokens, unit_rows


class _RasterRequest:
    """What the engine reads of a raster request of either kind: ``t`` tokens final for every image, ``tokens_BL``
    (zeros where not drawn yet: previews embed the whole grid), the grid's width, the KV slot it frees."""

    t: int
    grid: int
    tokens_BL: torch.Tensor
    kv: KVSlot

    @property
    def rows_done(self) -> int:
        """Complete rows of the token grid so far."""
        return self.t // self.grid

    @property
    def tokens(self) -> list[torch.Tensor]:
        """The tokens final so far, [B, t], in a list like a VAR request's per-scale maps."""
        return [self.tokens_BL[:, : self.t]]

    def release(self) -> None:
        self.kv.free()


class RasterGeneration(_RasterRequest):
    """One raster request: ``B`` images drawn token by token, their KV rows a slot of the engine's pool."""

    def __init__(
        self, model: LlamaGen, labels_B: torch.Tensor, params: RasterParams, generators: Generators, kv: KVSlot
    ):
        cfg = model.cfg
        self.model, self.params, self.generators, self.kv = model, params, generators, kv
        self.B, self.L, self.grid = labels_B.shape[0], cfg.seq_len, cfg.grid_size
        rows_R = cfg_labels(labels_B, cfg.null_class) if params.guided else labels_B
        self.R = rows_R.shape[0]
        if kv.rows < self.R or kv.max_len < self.L:
            raise ValueError(
                f"a KV slot of {kv.rows} rows x {kv.max_len} positions is too small for {self.R} x {self.L}"
            )
        self.t = 0  # the next token to draw; also the position this step's inputs sit at
        # Zeros, not empty: previews embed the whole grid (the rows not drawn yet are then replaced).
        self.tokens_BL = torch.zeros(self.B, self.L, dtype=torch.long, device=labels_B.device)
        self._q_BV = torch.empty(self.B, model.vocab_size, dtype=torch.float32, device=labels_B.device)
        self.x = model.embed_classes(rows_R)  # [rows, 1, C]: this step's inputs

    @property
    def done(self) -> bool:
        return self.t >= self.L

    @property
    def rows(self) -> int:
        """Rows this step feeds: R while the token is guided, B after."""
        return self.x.shape[0]

    def advance(self, logits_RV: torch.Tensor) -> torch.Tensor:
        """Draw token ``t`` of every image from this step's logits [rows, V] (filtered in place: nothing reads them
        again) and prepare the next step's inputs; returns the tokens [B]."""
        p, t, B = self.params, self.t, self.B
        logits_BV = cfg_guide(logits_RV, p.cfg_scale) if p.guided_at(t) else logits_RV[:B]
        probs_BV = filter_logits_(logits_BV, p.temperature, p.top_k, p.top_p).softmax(dim=-1)
        idx_B = torch.argmax(probs_BV.div_(draw_exponential_(self._q_BV, self.generators)), dim=-1)
        self.tokens_BL[:, t] = idx_B
        self.t = t + 1
        if not self.done:
            # Token t is fed back at position t + 1, the same token to both rows of its image while guided.
            rows = self.R if p.guided_at(self.t) else B
            self.x = self.model.embed_tokens(idx_B.repeat(rows // B).unsqueeze(1))
        return idx_B


class SpeculativeGeneration(_RasterRequest):
    """One speculative raster request (``SpeculativePlan``): a ``SpeculativeDecoder`` whose per-row KV cache is
    the request's slot of the engine's pool. A step is one pass: every image verifies its own window, so a step
    fixes one or more tokens of every image; ``t`` counts the tokens every image has fixed."""

    def __init__(
        self,
        model: LlamaGen,
        labels_B: torch.Tensor,
        params: RasterParams,
        plan: SpeculativePlan,
        generators: Generators,
        kv: KVSlot,
    ):
        self.kv, self.grid = kv, model.cfg.grid_size
        self.decoder = SpeculativeDecoder(model, labels_B, params, plan, generators, RowKV.on_slot(kv))
        self.tokens_BL = self.decoder.tokens_BL

    @property
    def t(self) -> int:  # type: ignore[override]  # a plain attribute of the one-token kind
        return self.decoder.fixed

    @property
    def done(self) -> bool:
        return self.decoder.done

    def inputs(self) -> tuple[torch.Tensor, RowWindows]:
        return self.decoder.inputs()

    def advance(self, logits_RlV: torch.Tensor) -> None:
        self.decoder.advance(logits_RlV)
