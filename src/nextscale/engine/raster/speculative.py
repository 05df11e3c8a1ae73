"""Speculative decoding for raster (LlamaGen) models: one verification loop, interchangeable acceptance rules.

The loop is Speculative Jacobi Decoding (SJD: Teng et al., "Accelerating Auto-regressive Text-to-Image Generation
with Training-free Speculative Jacobi Decoding", ICLR 2025; github tyshiwo1/Accelerating-T2I-AR-with-SJD). What
decides whether a guessed token is kept is an ``AcceptRule``; the rules themselves — SJD's lossless test, GSD's
group test (So et al., "Grouped Speculative Decoding for Autoregressive Image Generation", ICCV 2025) and LANTERN's
relaxed test (Jang et al., "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative Decoding",
ICLR 2025) — are plug-ins in ``nextscale.accel.speculative``. The engine never imports them.

One pass, per image (``n`` tokens fixed so far, a window of ``w`` guesses ``d_0 .. d_{w-1}`` for tokens
``n .. n+w-1``, each with the distribution ``q_j`` it was drawn from):

1. Feed ``[token n-1 (the class token when n = 0), d_0 .. d_{w-2}]`` at positions ``n .. n+w-1``: output ``j`` is
   the target distribution ``p_j`` of token ``n+j`` given the guesses before it (guided, then temperature / top-k /
   top-p filtered: exactly what plain sampling draws from, ``cfg_interval`` included).
2. Walk the window left to right: keep ``d_j`` with probability ``rule.accept_prob(p_j, q_j, d_j)``; at the first
   refusal draw token ``n+j`` from ``rule.residual(...)`` (normalised) and stop. A pass fixes 1 .. w tokens.
3. Jacobi update: every guess after the refusal is redrawn from the ``p`` just computed for its position (and that
   ``p`` becomes its ``q``); slots beyond what was computed get fresh guesses — uniformly random codes (SJD's
   ``random`` scheme, the paper's) or the left neighbour in the grid (``repeat``, SJD's ``repeat_horizon``), both
   with a one-hot ``q``. Either way a guess is drawn independently of the coin that later tests it, which is all
   the lossless rule needs: with ``min(1, p/q)`` and ``max(0, p - q)`` every fixed token follows ``p`` exactly
   (tested against the enumerated joint distribution of a tiny model).

``window = 1`` feeds only the last token: one fresh guess, tested against its own ``p`` — plain sampling in
distribution (not in RNG stream: ``sample_raster`` draws differently).

Batching. Images accept different numbers of tokens, so after the first pass every image sits at its own
position: the loop keeps its keys and values in a per-row cache and calls the model with a layout that places each
row at its own position (``engine.raster.row_kv``: ``RowKV``, ``RowWindows``).

The loop is a state object (``SpeculativeDecoder``: ``inputs()`` -> one GPT call -> ``advance(logits)``) driven by
``sample_speculative`` here and by the serving engine (``engine.raster.state.SpeculativeGeneration``), whose
per-row cache is the request's rows of the engine's KV pool: a cache of exactly L positions suffices, as positions
past the grid (padding of windows that run off it) are never stored.

RNG discipline: before its first pass and at every pass, image ``i`` draws exactly ``3 x window`` uniforms
(float64) from its own generator — acceptance coins, inverse-CDF draws for the residual / Jacobi redraws, fresh
guesses; slot j always uses column j — whatever its batch, its position or the call's length. Image i alone
therefore equals image i in any batch (tested for every rule). With ``rng="official"`` (one generator for the
batch) the batch is drawn at once and results depend on the batch.

Cost notes: the per-image draws are a Python loop over the images (one generator call each per pass); everything
else is vectorised over images, window slots and the vocabulary. Finished images and the null-class rows of images
whose guidance has ended (``cfg_interval``) leave the batch; their KV rows move to the front of the cache (one
copy per change).

Not verified against the papers: the window convention (SJD's code feeds the last accepted token plus the window
in one call like here, but counts its ``max_num_new_tokens`` slightly differently), the per-row batching (the
official codes cut every row to the batch's shortest accepted prefix), and speed-ups on real checkpoints (none here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from nextscale.engine.raster.params import RasterParams
from nextscale.engine.raster.row_kv import RowKV, RowWindows
from nextscale.engine.raster.sampler import (
    RasterResult,
    RasterStep,
    StepCallback,
    cfg_guide,
    check_request,
    filter_logits_,
)
from nextscale.engine.sampling import Generators, cfg_labels
from nextscale.errors import InvalidInputError
from nextscale.models.llamagen import LlamaGen

DraftInit = Literal["random", "repeat"]
DRAFT_INITS: tuple[str, ...] = ("random", "repeat")

# Uniforms per window slot and pass: the acceptance coin, an inverse-CDF draw, a fresh guess.
_DRAWS = 3


class AcceptRule(Protocol):
    """How a guessed token is tested against the target. All tensors are flattened positions ``M``:
    ``p_MV`` the target distribution, ``q_MV`` the distribution the guess was drawn from, ``draft_M`` the guess
    (``q_MV[m, draft_M[m]] > 0``). ``lossless``: whether kept tokens follow ``p`` exactly. ``draft_init``: how the
    loop makes guesses for slots it has no distribution for yet (``"random"`` or ``"repeat"``)."""

    @property
    def lossless(self) -> bool: ...

    @property
    def draft_init(self) -> str: ...

    @property
    def coupled(self) -> bool:
        """Redraw a slot after a refusal by maximal coupling with its previous guess (MC-SJD) rather than
        independently: the guess still follows the new ``p``, and stays what it was as often as that allows."""
        ...

    def accept_prob(self, p_MV: torch.Tensor, q_MV: torch.Tensor, draft_M: torch.Tensor) -> torch.Tensor:
        """Probability [M] in [0, 1] of keeping each guess."""
        ...

    def residual(self, p_MV: torch.Tensor, q_MV: torch.Tensor, draft_M: torch.Tensor) -> torch.Tensor:
        """Unnormalised weights [M, V] >= 0 to draw from where the guess was refused (all zero: draw from p)."""
        ...


# ---- pure helpers --------------------------------------------------------------------------------------------------
def sample_inverse_cdf(weights_MV: torch.Tensor, u_M: torch.Tensor) -> torch.Tensor:
    """One draw per row from unnormalised weights, by the inverse CDF at uniform ``u`` (float64 sums, so one
    uniform per draw suffices and the draw never lands on a zero-weight code)."""
    cdf_MV = weights_MV.double().cumsum(dim=-1)
    x_M1 = (u_M.double() * cdf_MV[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf_MV, x_M1, right=True).squeeze(1).clamp_(max=weights_MV.shape[-1] - 1)


def draw_uniforms(generators: Generators, images: Sequence[int], window: int, device: torch.device) -> torch.Tensor:
    """This pass's uniforms [N, 3, window] (float64) for the active images: one call per image on its own
    generator (so its stream does not depend on the batch), or one call for the batch on a shared generator."""
    if isinstance(generators, torch.Generator):
        return torch.rand(len(images), _DRAWS, window, dtype=torch.float64, device=device, generator=generators)
    gens = list(generators)
    return torch.stack(
        [torch.rand(_DRAWS, window, dtype=torch.float64, device=device, generator=gens[i]) for i in images]
    )


def fresh_guesses(
    init: str,
    u_Nw: torch.Tensor,
    fresh_Nw: torch.Tensor,
    draft_Nw: torch.Tensor,
    last_N: torch.Tensor,
    n_N: torch.Tensor,
    V: int,
    grid: int,
) -> torch.Tensor:
    """Fill the ``fresh`` slots of ``draft_Nw`` (tokens ``n + k``): a uniformly random code, or (``repeat``) the
    token to the left in the grid — the previous slot or ``last_N`` (token n-1) — with random codes in column 0."""
    rand_Nw = (u_Nw * V).long().clamp_(max=V - 1)
    out = torch.where(fresh_Nw, rand_Nw, draft_Nw)
    if init == "random":
        return out
    w = draft_Nw.shape[1]
    col0_Nw = (n_N[:, None] + torch.arange(w, device=n_N.device)) % grid == 0
    ext = torch.cat((last_N[:, None], out), dim=1)
    anchor = torch.cat((torch.ones_like(col0_Nw[:, :1]), ~fresh_Nw | col0_Nw), dim=1)
    idx = torch.arange(w + 1, device=n_N.device).expand_as(ext)
    src = torch.where(anchor, idx, torch.zeros_like(idx)).cummax(dim=1).values  # nearest anchor at or left
    return ext.gather(1, src)[:, 1:]


def coupled_redraw(
    p_NlV: torch.Tensor, q_NlV: torch.Tensor, draft_Nl: torch.Tensor, coin_Nl: torch.Tensor, u_Nl: torch.Tensor
) -> torch.Tensor:
    """MC-SJD's Jacobi update (arXiv 2510.24211, by GSD's authors: coupled draft sampling): a new guess from ``p``,
    maximally coupled with the old guess ``draft`` (drawn from ``q``) — keep it with probability ``min(1, p(d)/q(d))``,
    else draw from ``norm(max(0, p - q))`` (``p`` where that is empty). The new guess follows ``p`` exactly, so the
    acceptance test stays lossless, and it equals the old one with the largest probability any such draw can have:
    as ``p`` settles between passes, guesses stop changing and get kept.

    Uniforms: ``coin`` is the slot's acceptance coin of this pass, which decided nothing (the slot lies after the
    refusal), ``u`` its inverse-CDF uniform; both are the slot's own, so the redraw stays independent of every other
    slot and of the next pass's coin."""
    N, l, V = p_NlV.shape
    p_MV, q_MV, d_M = p_NlV.reshape(-1, V), q_NlV.reshape(-1, V), draft_Nl.reshape(-1)
    p_d, q_d = p_MV.gather(1, d_M[:, None]).squeeze(1), q_MV.gather(1, d_M[:, None]).squeeze(1)
    keep_M = coin_Nl.reshape(-1) * q_d < p_d  # u < min(1, p/q), without dividing (q(d) > 0 by construction)
    res_MV = (p_MV - q_MV).clamp_min(0)
    res_MV = torch.where(res_MV.sum(dim=-1, keepdim=True) > 0, res_MV, p_MV)
    return torch.where(keep_M, d_M, sample_inverse_cdf(res_MV, u_Nl.reshape(-1))).view(N, l)


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InvalidInputError(f"window must be an int >= 1 (guesses verified per pass), got {window!r}")


# ---- the loop ------------------------------------------------------------------------------------------------------
class _Batch:
    """The images still being sampled and their windows. Rows of the transformer (and of the KV cache): the
    conditional row of every active image, then the null-class rows of those still guided, in image order."""

    def __init__(self, labels_B: torch.Tensor, window: int, V: int, guided: bool):
        B, device = labels_B.shape[0], labels_B.device
        self.img_N = torch.arange(B, device=device)
        self.n_N = torch.zeros(B, dtype=torch.long, device=device)
        self.draft_Nw = torch.zeros(B, window, dtype=torch.long, device=device)
        self.q_NwV = torch.zeros(B, window, V, device=device)
        self.null_N = torch.full((B,), guided, dtype=torch.bool, device=device)

    @property
    def rows_img(self) -> torch.Tensor:
        """Active-image index of every row."""
        return torch.cat((torch.arange(len(self.img_N), device=self.img_N.device), self.null_N.nonzero().view(-1)))

    def keep(self, keep_N: torch.Tensor, null_N: torch.Tensor, kv: RowKV) -> None:
        """Keep the images ``keep_N`` (bool), with null rows where ``null_N``; the KV rows follow."""
        N = len(self.img_N)
        null_row_N = N + self.null_N.long().cumsum(0) - 1
        rows = torch.cat((keep_N.nonzero().view(-1), null_row_N[keep_N & null_N]))
        if len(rows) != N + int(self.null_N.sum()):
            kv.keep(rows)
        self.null_N = null_N[keep_N]
        for name in ("img_N", "n_N", "draft_Nw", "q_NwV"):
            setattr(self, name, getattr(self, name)[keep_N])


def _target_probs(
    logits_RlV: torch.Tensor, batch: _Batch, guided_Nl: torch.Tensor, params: RasterParams
) -> torch.Tensor:
    """Guided (where the token is) and filtered target distributions [N, l, V], as plain sampling computes them."""
    N = len(batch.img_N)
    logits_NlV = logits_RlV[:N]
    if logits_RlV.shape[0] > N:
        has = batch.null_N.nonzero().view(-1)
        cond = logits_NlV[has]
        mixed = cfg_guide(torch.cat((cond, logits_RlV[N:])), params.cfg_scale)
        logits_NlV[has] = torch.where(guided_Nl[has, :, None], mixed, cond)
    return filter_logits_(logits_NlV, params.temperature, params.top_k, params.top_p).softmax(dim=-1)


def _inputs(
    model: LlamaGen, batch: _Batch, labels_B: torch.Tensor, tokens_BL: torch.Tensor, l: int, params: RasterParams
) -> torch.Tensor:
    """Row inputs [R, l, C] at positions ``n .. n+l-1``: token n-1 (the class token at n = 0), then the guesses."""
    rows_img = batch.rows_img
    if bool((batch.n_N == 0).all()):  # the first pass (afterwards every image has fixed a token)
        labels_R = cfg_labels(labels_B, model.cfg.null_class) if params.guided else labels_B
        guesses = model.embed_tokens(batch.draft_Nw[rows_img, : l - 1])
        return torch.cat((model.embed_classes(labels_R), guesses), dim=1)
    last_N = tokens_BL[batch.img_N, batch.n_N - 1]
    return model.embed_tokens(torch.cat((last_N[:, None], batch.draft_Nw[:, : l - 1]), dim=1)[rows_img])


def _verify(
    rule: AcceptRule, p_NlV: torch.Tensor, batch: _Batch, u_N3w: torch.Tensor, valid_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Test the guesses left to right: (guesses kept before the first refusal [N], tokens fixed [N], the window's
    tokens [N, l] — kept guesses, then at a refusal a draw from the rule's residual, or from p where it is zero)."""
    N, l, V = p_NlV.shape
    draft_Nl, q_NlV = batch.draft_Nw[:, :l], batch.q_NwV[:, :l]
    a_Nl = rule.accept_prob(p_NlV.reshape(-1, V), q_NlV.reshape(-1, V), draft_Nl.reshape(-1)).view(N, l)
    j_l = torch.arange(l, device=p_NlV.device)
    ok_Nl = (u_N3w[:, 0, :l] < a_Nl) & (j_l < valid_N[:, None])
    kept_N = ok_Nl.long().cumprod(dim=1).sum(dim=1)
    refused_N = kept_N < valid_N
    tokens_Nl = draft_Nl.clone()
    r = refused_N.nonzero().view(-1)
    if len(r):
        m = kept_N[r]
        p_rV = p_NlV[r, m]
        res_rV = rule.residual(p_rV, q_NlV[r, m], draft_Nl[r, m])
        res_rV = torch.where(res_rV.sum(dim=-1, keepdim=True) > 0, res_rV, p_rV)
        tokens_Nl[r, m] = sample_inverse_cdf(res_rV, u_N3w[r, 1, m])
    return kept_N, kept_N + refused_N.long(), tokens_Nl


def _next_windows(
    rule: AcceptRule,
    batch: _Batch,
    p_NlV: torch.Tensor,
    u_N3w: torch.Tensor,
    adv_N: torch.Tensor,
    valid_N: torch.Tensor,
    last_N: torch.Tensor,
    grid: int,
) -> None:
    """Slide every window by the tokens it fixed. Slots this pass computed a p for (those after a refusal) are
    redrawn from it, with q = p (the Jacobi update); the others get fresh guesses with a one-hot q."""
    N, l, V = p_NlV.shape
    w = batch.draft_Nw.shape[1]
    if rule.coupled:
        jacobi_Nl = coupled_redraw(p_NlV, batch.q_NwV[:, :l], batch.draft_Nw[:, :l], u_N3w[:, 0, :l], u_N3w[:, 1, :l])
    else:
        jacobi_Nl = sample_inverse_cdf(p_NlV.reshape(-1, V), u_N3w[:, 1, :l].reshape(-1)).view(N, l)
    src_Nw = torch.arange(w, device=p_NlV.device) + adv_N[:, None]  # the old slot each new slot continues
    computed_Nw = src_Nw < valid_N[:, None]
    src_Nw = src_Nw.clamp(max=l - 1)
    batch.n_N = batch.n_N + adv_N
    draft_Nw = torch.where(computed_Nw, jacobi_Nl.gather(1, src_Nw), batch.draft_Nw)
    draft_Nw = fresh_guesses(rule.draft_init, u_N3w[:, 2], ~computed_Nw, draft_Nw, last_N, batch.n_N, V, grid)
    one_hot_NwV = torch.zeros_like(batch.q_NwV).scatter_(2, draft_Nw.unsqueeze(2), 1.0)
    q_NwV = p_NlV.gather(1, src_Nw[:, :, None].expand(-1, -1, V))
    batch.draft_Nw, batch.q_NwV = draft_Nw, torch.where(computed_Nw[:, :, None], q_NwV, one_hot_NwV)


@dataclass(frozen=True)
class SpeculativePlan:
    """How a raster request is decoded speculatively: an acceptance rule and the window (guesses per pass). The
    engine's counterpart of a VAR request's ``RequestPlan``; ``LlamaGenPipeline.speculative_plan`` builds one from
    a spec string."""

    rule: AcceptRule
    window: int

    def __post_init__(self) -> None:
        _check_window(self.window)
        if self.rule.draft_init not in DRAFT_INITS:
            raise InvalidInputError(f"draft_init must be one of {', '.join(DRAFT_INITS)}, got {self.rule.draft_init!r}")


class SpeculativeDecoder:
    """One speculative request: ``B`` images, each with its own window. *A pass feeds ``inputs()`` through the GPT
    and ``advance`` verifies the windows with the pass's logits.* Who runs the GPT is the caller's business:
    ``sample_speculative`` below, or the serving engine (``engine.raster.state.SpeculativeGeneration``).

    ``fixed``: tokens every image has fixed (raster positions ``< fixed`` are final for the whole request)."""

    def __init__(
        self,
        model: LlamaGen,
        labels_B: torch.Tensor,
        params: RasterParams,
        plan: SpeculativePlan,
        generators: Generators,
        kv: RowKV,
    ):
        check_request(model, labels_B)
        cfg, device = model.cfg, labels_B.device
        B, L, V, w = labels_B.shape[0], cfg.seq_len, model.vocab_size, plan.window
        rows = B * (2 if params.guided else 1)
        if len(kv.k[0]) < rows or kv.max_len < L:
            raise ValueError(f"a KV cache of {len(kv.k[0])} rows x {kv.max_len} positions is too small: {rows} x {L}")
        self.model, self.labels_B, self.params, self.rule, self.window = model, labels_B, params, plan.rule, w
        self.gens, self.kv, self.L, self.V, self.grid = generators, kv, L, V, cfg.grid_size
        self.guided_T = torch.tensor([params.guided_at(t) for t in range(L + w)], device=device)
        self.last_guided = max((t for t in range(L) if params.guided_at(t)), default=-1)
        self.table_Pc2 = model.rope(0, cfg.num_positions, device)
        self.tokens_BL = torch.zeros(B, L, dtype=torch.long, device=device)
        self.passes_B = torch.zeros(B, dtype=torch.long, device=device)
        self.kept_B = torch.zeros(B, dtype=torch.long, device=device)
        self.calls = self.row_tokens = self.fixed = 0
        self.batch = batch = _Batch(labels_B, w, V, params.guided)
        # The first window: all fresh guesses (an image's first draw set; the empty window "fixed" nothing yet).
        u_N3w = draw_uniforms(generators, range(B), w, device)
        batch.draft_Nw = fresh_guesses(
            self.rule.draft_init,
            u_N3w[:, 2],
            torch.ones_like(batch.draft_Nw, dtype=torch.bool),
            batch.draft_Nw,
            batch.draft_Nw[:, 0],
            batch.n_N,
            V,
            self.grid,
        )
        batch.q_NwV.scatter_(2, batch.draft_Nw.unsqueeze(2), 1.0)

    @property
    def done(self) -> bool:
        return not len(self.batch.img_N)

    @property
    def rows(self) -> int:
        """Rows the next pass feeds (conditional rows of unfinished images, null rows of those still guided)."""
        return len(self.batch.img_N) + int(self.batch.null_N.sum())

    def inputs(self) -> tuple[torch.Tensor, RowWindows]:
        """This pass's rows [R, l, C] and their layout (each row at its own position, one KV row each)."""
        batch = self.batch
        l = min(self.window, self.L - int(batch.n_N.min()))
        x_RlC = _inputs(self.model, batch, self.labels_B, self.tokens_BL, l, self.params)
        return x_RlC, RowWindows(self.kv, batch.n_N[batch.rows_img], l, self.table_Pc2)

    def advance(self, logits_RlV: torch.Tensor) -> None:
        """Verify every window against this pass's logits [R, l, V], fix the accepted tokens, slide the windows;
        finished images (and null rows with no guided token left) leave the batch."""
        batch, L, device = self.batch, self.L, self.tokens_BL.device
        R, l, _ = logits_RlV.shape
        self.calls, self.row_tokens = self.calls + 1, self.row_tokens + R * l
        self.passes_B[batch.img_N] += 1
        n_N = batch.n_N
        guided_Nl = self.guided_T[n_N[:, None] + torch.arange(l, device=device)]
        p_NlV = _target_probs(logits_RlV, batch, guided_Nl, self.params)
        u_N3w = draw_uniforms(self.gens, batch.img_N.tolist(), self.window, device)
        valid_N = (L - n_N).clamp(max=self.window)  # slots inside the grid
        kept_N, adv_N, new_Nl = _verify(self.rule, p_NlV, batch, u_N3w, valid_N)
        bi, ji = (torch.arange(l, device=device) < adv_N[:, None]).nonzero(as_tuple=True)
        self.tokens_BL[batch.img_N[bi], n_N[bi] + ji] = new_Nl[bi, ji]
        self.kept_B[batch.img_N] += kept_N
        last_N = self.tokens_BL[batch.img_N, (n_N + adv_N - 1).clamp(max=L - 1)]
        _next_windows(self.rule, batch, p_NlV, u_N3w, adv_N, valid_N, last_N, self.grid)
        self.fixed = int(batch.n_N.min())  # images that finished earlier left the batch at n = L
        batch.keep(batch.n_N < L, batch.null_N & (batch.n_N <= self.last_guided), self.kv)

    def stats(self) -> dict:
        passes = self.passes_B.double()
        B = self.tokens_BL.shape[0]
        return {
            "forward_passes": float(passes.mean()),
            "forward_passes_per_image": self.passes_B.tolist(),
            "mean_accepted": float((self.L / passes).mean()),
            "accepted_drafts": float((self.kept_B / passes).mean()),
            "calls": self.calls,
            "row_tokens": self.row_tokens / B,
            "guided_steps": sum(self.params.guided_at(t) for t in range(self.L)),
            "window": self.window,
        }


@torch.no_grad()
def sample_speculative(
    model: LlamaGen,
    labels_B: torch.Tensor,
    params: RasterParams,
    rule: AcceptRule,
    window: int,
    generators: Generators | None = None,
    on_step: StepCallback | None = None,
) -> RasterResult:
    """Sample ``labels_B`` with windows of ``window`` guesses verified per forward pass, kept by ``rule``.

    ``on_step`` gets a ``RasterStep`` per token t, in raster order, once every image has fixed token t (its logit
    fields are empty [0, V] tensors: a token's logits come from whichever pass fixed it). ``stats``:
    ``forward_passes`` (passes per image, mean), ``forward_passes_per_image``, ``mean_accepted`` (tokens fixed per
    pass, ``L / passes`` averaged over images), ``accepted_drafts`` (guesses kept per pass, mean over images),
    ``calls`` (transformer calls for the batch), ``row_tokens`` (row-positions computed per image), ``guided_steps``.
    """
    plan = SpeculativePlan(rule, window)
    if labels_B.ndim != 1 or labels_B.numel() == 0:
        raise InvalidInputError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels_B.shape)}")
    B = labels_B.shape[0]
    gens = params.generators(B, labels_B.device) if generators is None else generators
    kv = RowKV.allocate(model, B * (2 if params.guided else 1), model.cfg.seq_len)
    dec = SpeculativeDecoder(model, labels_B, params, plan, gens, kv)
    announced = 0
    while not dec.done:
        dec.advance(model.forward_tokens(*dec.inputs()))
        if on_step is not None:
            empty = torch.empty(0, dec.V, device=labels_B.device)
            for t in range(announced, dec.fixed):
                on_step(RasterStep(t, empty, empty, params.guided_at(t), dec.tokens_BL[:, t]))
            announced = dec.fixed
    return RasterResult(dec.tokens_BL, dec.stats())
