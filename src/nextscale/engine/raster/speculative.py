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

Lanes and ZipAR's order (He et al., "ZipAR: Accelerating Auto-regressive Image Generation through Spatial
Locality", arXiv 2412.04062; code ThisisBillhe/ZipAR, ``generate_zipar.py``). The loop above runs per *lane*: in
raster order an image has one lane, the whole grid; with ``zipar = N`` each grid row is a lane, and row r starts once
row r-1 has fixed N tokens, so every started row advances in the same pass, each with its own window and the same
rule. One transformer row holds all of an image's lane windows, each at its own positions, with a mask
(``RowWindows``): a query sees the positions before it that were fixed before this pass, the first input of every
lane (a fixed token) and its own lane's inputs before it — never another lane's guesses, nor a position not drawn
yet. A row's first token is predicted from the token before it in raster order, the end of the row above, which is
not drawn yet: as the official code, the row above's last fixed token stands in for it at its position, and once
the row above is complete its true last token is fed once more (a *flush*, predicting nothing) so that later queries
see its true keys. ZipAR conditions each token on fewer earlier tokens than raster order: lossy by design, whatever
the rule (tested against its own enumerated joint distribution; ``zipar`` >= the row length is raster order).

Batching. Images accept different numbers of tokens, so after the first pass every image sits at its own
position: the loop keeps its keys and values in a per-row cache and calls the model with a layout that places each
row at its own position (``engine.raster.row_kv``: ``RowKV``, ``RowWindows``).

The loop is a state object (``SpeculativeDecoder``: ``inputs()`` -> one GPT call -> ``advance(logits)``) driven by
``sample_speculative`` here and by the serving engine (``engine.raster.state.SpeculativeGeneration``), whose
per-row cache is the request's rows of the engine's KV pool: a cache of exactly L positions suffices, as positions
past the grid (padding of windows that run off it) are never stored.

RNG discipline: before its first pass and at every pass, image ``i`` draws exactly ``3 x lanes x window``
uniforms (float64) from its own generator — acceptance coins, inverse-CDF draws for the residual / Jacobi redraws,
fresh guesses; slot j of lane g always uses column (g, j) — whatever its batch, its position or the call's
length. Image i alone therefore equals image i in any batch (tested for every rule). With ``rng="official"`` (one
generator for the batch) the batch is drawn at once and results depend on the batch.

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
from nextscale.engine.raster.tree import TreeTemplate, alternatives, fed_valid, tree_template
from nextscale.engine.sampling import Generators, cfg_labels, sample_inverse_cdf
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

    @property
    def tree(self) -> int:
        """Guesses per parent at the window's first ``depth`` slots (SJD-PAC's proactive drafting; 1: a chain)."""
        ...

    @property
    def depth(self) -> int: ...

    def accept_prob(self, p_MV: torch.Tensor, q_MV: torch.Tensor, draft_M: torch.Tensor) -> torch.Tensor:
        """Probability [M] in [0, 1] of keeping each guess."""
        ...

    def residual(self, p_MV: torch.Tensor, q_MV: torch.Tensor, draft_M: torch.Tensor) -> torch.Tensor:
        """Unnormalised weights [M, V] >= 0 to draw from where the guess was refused (all zero: draw from p)."""
        ...


# ---- pure helpers --------------------------------------------------------------------------------------------------
def draw_uniforms(
    generators: Generators, images: Sequence[int], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """This pass's uniforms [N, *shape] (float64) for the active images: one call per image on its own generator
    (so its stream does not depend on the batch), or one call for the batch on a shared generator."""
    if isinstance(generators, torch.Generator):
        return torch.rand(len(images), *shape, dtype=torch.float64, device=device, generator=generators)
    gens = list(generators)
    return torch.stack([torch.rand(*shape, dtype=torch.float64, device=device, generator=gens[i]) for i in images])


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
    """The images still being sampled and their lanes. Rows of the transformer (and of the KV cache): the
    conditional row of every active image, then the null-class rows of those still guided, in image order.

    A lane is a stretch of the raster order decoded left to right with its own window: the whole grid (one lane per
    image), or with ZipAR one grid row each. Per image and lane: ``n`` tokens fixed, ``started``, the window's
    guesses and their q, and ``flush`` (the lane's successor started on a stand-in for the lane's last token, whose
    true keys must be written once it is fixed). ``seen_NS``: KV positions later queries may attend to."""

    def __init__(
        self,
        B: int,
        lanes: int,
        window: int,
        V: int,
        L: int,
        guided: bool,
        device: torch.device,
        tree: int = 1,
        depth: int = 0,
    ):
        self.img_N = torch.arange(B, device=device)
        self.null_N = torch.full((B,), guided, dtype=torch.bool, device=device)
        self.n_NG = torch.zeros(B, lanes, dtype=torch.long, device=device)
        self.started_NG = torch.zeros(B, lanes, dtype=torch.bool, device=device)
        self.started_NG[:, 0] = True
        self.flush_NG = torch.zeros(B, lanes, dtype=torch.bool, device=device)
        self.draft_NGw = torch.zeros(B, lanes, window, dtype=torch.long, device=device)
        self.q_NGwV = torch.zeros(B, lanes, window, V, device=device)
        self.seen_NS = torch.zeros(B, L, dtype=torch.bool, device=device)
        # SJD-PAC: guesses 2..K of the first D slots, and whether a slot has them (its q is a computed distribution).
        self.alt_NGDk = torch.zeros(B, lanes, depth, max(tree - 1, 0), dtype=torch.long, device=device)
        self.tree_ok_NGD = torch.zeros(B, lanes, depth, dtype=torch.bool, device=device)

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
        names = ("img_N", "n_NG", "started_NG", "flush_NG", "draft_NGw", "q_NGwV", "seen_NS", "alt_NGDk", "tree_ok_NGD")
        for name in names:
            setattr(self, name, getattr(self, name)[keep_N])


@dataclass(frozen=True)
class _Pass:
    """What ``inputs`` laid out for one pass, for ``advance``: the active lanes (image, lane), the row column of
    each of their fed nodes (-1: not fed), window slots; ``valid``: tokens each lane predicts (0 for a flush)."""

    ai_M: torch.Tensor
    ag_M: torch.Tensor
    col_MF: torch.Tensor
    l_M: torch.Tensor
    valid_M: torch.Tensor
    start_M: torch.Tensor
    flush_M: torch.Tensor
    q_pos_Nl: torch.Tensor


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


def _verify(
    rule: AcceptRule,
    p_MlV: torch.Tensor,
    draft_Ml: torch.Tensor,
    q_MlV: torch.Tensor,
    u_M3w: torch.Tensor,
    valid_M: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Test each lane's guesses left to right: (guesses kept before the first refusal [M], tokens fixed [M], the
    window's tokens [M, l] — kept guesses, then at a refusal a draw from the rule's residual, or from p where it is
    zero)."""
    M, l, V = p_MlV.shape
    a_Ml = rule.accept_prob(p_MlV.reshape(-1, V), q_MlV.reshape(-1, V), draft_Ml.reshape(-1)).view(M, l)
    j_l = torch.arange(l, device=p_MlV.device)
    ok_Ml = (u_M3w[:, 0, :l] < a_Ml) & (j_l < valid_M[:, None])
    kept_M = ok_Ml.long().cumprod(dim=1).sum(dim=1)
    refused_M = kept_M < valid_M
    tokens_Ml = draft_Ml.clone()
    r = refused_M.nonzero().view(-1)
    if len(r):
        m = kept_M[r]
        p_rV = p_MlV[r, m]
        res_rV = rule.residual(p_rV, q_MlV[r, m], draft_Ml[r, m])
        res_rV = torch.where(res_rV.sum(dim=-1, keepdim=True) > 0, res_rV, p_rV)
        tokens_Ml[r, m] = sample_inverse_cdf(res_rV, u_M3w[r, 1, m])
    return kept_M, kept_M + refused_M.long(), tokens_Ml


def _next_windows(
    rule: AcceptRule,
    draft_Mw: torch.Tensor,
    q_MwV: torch.Tensor,
    p_MlV: torch.Tensor,
    u_M3w: torch.Tensor,
    adv_M: torch.Tensor,
    valid_M: torch.Tensor,
    last_M: torch.Tensor,
    pos_M: torch.Tensor,
    grid: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slide every lane's window by the tokens it fixed (``pos_M``: the raster position of the new first slot).
    Slots this pass computed a p for (those after a refusal) are redrawn from it, with q = p (the Jacobi update);
    the others get fresh guesses with a one-hot q. Returns the new (guesses, q)."""
    M, l, V = p_MlV.shape
    w = draft_Mw.shape[1]
    if rule.coupled:
        jacobi_Ml = coupled_redraw(p_MlV, q_MwV[:, :l], draft_Mw[:, :l], u_M3w[:, 0, :l], u_M3w[:, 1, :l])
    else:
        jacobi_Ml = sample_inverse_cdf(p_MlV.reshape(-1, V), u_M3w[:, 1, :l].reshape(-1)).view(M, l)
    src_Mw = torch.arange(w, device=p_MlV.device) + adv_M[:, None]  # the old slot each new slot continues
    computed_Mw = src_Mw < valid_M[:, None]
    src_Mw = src_Mw.clamp(max=l - 1)
    new_Mw = torch.where(computed_Mw, jacobi_Ml.gather(1, src_Mw), draft_Mw)
    new_Mw = fresh_guesses(rule.draft_init, u_M3w[:, 2], ~computed_Mw, new_Mw, last_M, pos_M, V, grid)
    one_hot_MwV = torch.zeros_like(q_MwV).scatter_(2, new_Mw.unsqueeze(2), 1.0)
    q_new_MwV = p_MlV.gather(1, src_Mw[:, :, None].expand(-1, -1, V))
    return new_Mw, torch.where(computed_Mw[:, :, None], q_new_MwV, one_hot_MwV)


class _Draws:
    """One pass's uniforms of the active images, by use. A chain draws [3, lanes, window] per image: acceptance
    coins, inverse-CDF draws (residual, Jacobi redraws), fresh guesses; slot j of lane g uses column (g, j). With a
    tree (SJD-PAC) each lane draws a coin per candidate (``TreeTemplate``), then the inverse-CDF and fresh-guess
    columns per slot, then K-1 per tree slot for the next window's alternatives."""

    def __init__(self, dec: SpeculativeDecoder, u: torch.Tensor):
        self.u, self.tmpl, self.w = u, dec.tmpl, dec.window

    def main(self, ai_M: torch.Tensor, ag_M: torch.Tensor) -> torch.Tensor:
        """[M, 3, w]: the main path's coin, inverse-CDF and fresh-guess uniform per slot."""
        if self.tmpl.K == 1:
            return self.u[ai_M, :, ag_M]
        C, w = self.tmpl.candidates, self.w
        row_MU = self.u[ai_M, ag_M]
        coins_Mw = row_MU[:, self.tmpl.main_cand_w.to(row_MU.device)]
        return torch.stack((coins_Mw, row_MU[:, C : C + w], row_MU[:, C + w : C + 2 * w]), dim=1)

    def coins(self, ai_M: torch.Tensor, ag_M: torch.Tensor) -> torch.Tensor:
        """[M, C]: every candidate's coin."""
        return self.u[ai_M, ag_M, : self.tmpl.candidates]

    def alt(self, ai_M: torch.Tensor, ag_M: torch.Tensor) -> torch.Tensor:
        """[M, D, K-1]: the draws of the next window's alternatives."""
        t = self.tmpl
        return self.u[ai_M, ag_M, t.candidates + 2 * self.w :].reshape(len(ai_M), t.D, t.K - 1)


def _verify_tree(
    rule: AcceptRule,
    tmpl: TreeTemplate,
    p_MFV: torch.Tensor,
    p_MlV: torch.Tensor,
    draft_Mw: torch.Tensor,
    q_MwV: torch.Tensor,
    alt_MDk: torch.Tensor,
    tree_ok_MD: torch.Tensor,
    valid_M: torch.Tensor,
    coins_MC: torch.Tensor,
    u_M3w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_verify`` for a window whose first D slots are a tree (``nextscale.engine.raster.tree``): at each parent
    its children are tested in order by recursive rejection sampling without replacement; after the tree the main
    path continues as a chain. Returns (guesses kept, tokens fixed, the window's tokens [M, l], the fed node that
    carries each kept slot's token [M, l] (0 where none))."""
    M, l, _ = p_MlV.shape
    device = p_MlV.device
    ar = torch.arange(M, device=device)
    child_cand_FK, child_fed_FK = tmpl.child_cand_FK.to(device), tmpl.child_fed_FK.to(device)
    node_M = torch.zeros(M, dtype=torch.long, device=device)  # the root
    alive_M = valid_M > 0
    kept_M = torch.zeros(M, dtype=torch.long, device=device)
    adv_M = torch.zeros_like(kept_M)
    tokens_Ml = draft_Mw[:, :l].clone()
    path_Ml = torch.zeros(M, l, dtype=torch.long, device=device)
    D = min(tmpl.D, l)
    for d in range(D):
        live_M = alive_M & (d < valid_M)
        p_MV, q_MV = p_MFV[ar, node_M], q_MwV[:, d]
        acc_M = torch.full((M,), -1, dtype=torch.long, device=device)
        for k in range(tmpl.K):
            x_M = draft_Mw[:, d] if k == 0 else alt_MDk[:, d, k - 1]
            test_M = live_M & (acc_M < 0) & (tree_ok_MD[:, d] if k else torch.ones_like(live_M))
            if not bool(test_M.any()):
                break
            coin_M = coins_MC[ar, child_cand_FK[node_M, k].clamp(min=0)]
            ok_M = test_M & (coin_M < rule.accept_prob(p_MV, q_MV, x_M))
            acc_M = torch.where(ok_M, k, acc_M)
            # After a refusal: p_{k+1} = norm(residual), q_{k+1} = q_k without x_k (the next guess was drawn so).
            refused_M = (test_M & ~ok_M)[:, None]
            res_MV = rule.residual(p_MV, q_MV, x_M)
            res_MV = torch.where(res_MV.sum(-1, keepdim=True) > 0, res_MV, p_MV)
            p_MV = torch.where(refused_M, res_MV / res_MV.sum(-1, keepdim=True), p_MV)
            rest_MV = q_MV.scatter(1, x_M[:, None], 0.0)
            rest_MV = torch.where(rest_MV.sum(-1, keepdim=True) > 0, rest_MV / rest_MV.sum(-1, keepdim=True), q_MV)
            q_MV = torch.where(refused_M, rest_MV, q_MV)
        accepted_M = acc_M >= 0
        refused_M = live_M & ~accepted_M
        guesses_MK = torch.cat((draft_Mw[:, d : d + 1], alt_MDk[:, d]), dim=1)
        tokens_Ml[:, d] = torch.where(accepted_M, guesses_MK.gather(1, acc_M.clamp(min=0)[:, None]).squeeze(1), 0)
        r = refused_M.nonzero().view(-1)
        if len(r):
            tokens_Ml[r, d] = sample_inverse_cdf(p_MV[r], u_M3w[r, 1, d])
        kept_M += accepted_M.long()
        adv_M += live_M.long()
        child_M = child_fed_FK[node_M, acc_M.clamp(min=0)]
        path_Ml[:, d] = torch.where(accepted_M, child_M.clamp(min=0), 0)
        node_M = torch.where(accepted_M, child_M, node_M)
        alive_M = live_M & accepted_M & (child_M >= 0)  # a guess without children ends the path
    if l > D:  # the main path goes on as a chain
        go = alive_M.nonzero().view(-1)
        if len(go):
            c_kept, c_adv, c_tok = _verify(
                rule, p_MlV[go, D:], draft_Mw[go, D:l], q_MwV[go, D:l], u_M3w[go, :, D:], valid_M[go] - D
            )
            kept_M[go] += c_kept
            adv_M[go] += c_adv
            tokens_Ml[go, D:] = c_tok
            path_Ml[go, D:] = tmpl.main_fed_w[D:l].to(device).clamp(min=0)
    return kept_M, adv_M, tokens_Ml, path_Ml


@dataclass(frozen=True)
class SpeculativePlan:
    """How a raster request is decoded speculatively: an acceptance rule, the window (guesses per pass and lane)
    and the decoding order — raster (``zipar = 0``) or ZipAR's (``zipar = N``: a grid row starts once the row above
    has fixed N tokens; every started row then advances in the same passes). The engine's counterpart of a VAR
    request's ``RequestPlan``; ``LlamaGenPipeline.speculative_plan`` builds one from a spec string."""

    rule: AcceptRule
    window: int
    zipar: int = 0

    def __post_init__(self) -> None:
        _check_window(self.window)
        if self.rule.draft_init not in DRAFT_INITS:
            raise InvalidInputError(f"draft_init must be one of {', '.join(DRAFT_INITS)}, got {self.rule.draft_init!r}")
        if isinstance(self.zipar, bool) or not isinstance(self.zipar, int) or self.zipar < 0:
            raise InvalidInputError(f"zipar must be an int >= 0 (0: raster order), got {self.zipar!r}")

    def lanes(self, grid: int) -> int:
        """Lanes per image: one per grid row with ZipAR, else one."""
        return grid if self.zipar else 1

    def max_positions(self, grid: int, seq_len: int) -> int:
        """The most positions one row of a pass can feed (every lane its full window and tree), for the scheduler's
        budget."""
        per_lane = tree_template(self.rule.tree, self.rule.depth if self.rule.tree > 1 else 0, self.window).fed
        return min(per_lane * self.lanes(grid), seq_len * (1 + self.rule.tree))


class SpeculativeDecoder:
    """One speculative request: ``B`` images, each with its own lanes and windows. *A pass feeds ``inputs()``
    through the GPT and ``advance`` verifies the windows with the pass's logits.* Who runs the GPT is the caller's
    business: ``sample_speculative`` below, or the serving engine (``engine.raster.state.SpeculativeGeneration``).

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
        G = plan.lanes(self.grid)
        self.G, self.zipar = G, min(plan.zipar, self.grid)  # more than a row: each row waits for the one above
        self.lane_len = L // G
        self.base_G = torch.arange(G, device=device) * self.lane_len  # each lane's first raster position
        self.guided_L = torch.tensor([params.guided_at(t) for t in range(L)], device=device)
        self.last_guided = max((t for t in range(L) if params.guided_at(t)), default=-1)
        self.table_Pc2 = model.rope(0, cfg.num_positions, device)
        self.tokens_BL = torch.zeros(B, L, dtype=torch.long, device=device)
        self.passes_B = torch.zeros(B, dtype=torch.long, device=device)
        self.kept_B = torch.zeros(B, dtype=torch.long, device=device)
        self.calls = self.row_tokens = self.fixed = 0
        K, D = plan.rule.tree, (min(plan.rule.depth, w) if plan.rule.tree > 1 else 0)
        self.tmpl = tree_template(K, D, w)
        self._fed_slot_F = torch.tensor(self.tmpl.slot_F, device=device)
        self._fed_k_F = torch.tensor(self.tmpl.k_F, device=device)
        C = self.tmpl.candidates
        self._u_shape = (_DRAWS, G, w) if K == 1 else (G, C + 2 * w + D * (K - 1))
        self.batch = batch = _Batch(B, G, w, V, L, params.guided, device, K, D)
        self._pass: _Pass | None = None
        self._layout: RowWindows | None = None
        # The first window: all fresh guesses (an image's first draw set; the empty window "fixed" nothing yet).
        draws = _Draws(self, draw_uniforms(generators, range(B), self._u_shape, device))
        self._open_lanes(torch.zeros_like(batch.started_NG), batch.started_NG, draws)

    @property
    def done(self) -> bool:
        return not len(self.batch.img_N)

    @property
    def rows(self) -> int:
        """Rows the next pass feeds (conditional rows of unfinished images, null rows of those still guided)."""
        return len(self.batch.img_N) + int(self.batch.null_N.sum())

    def _open_lanes(self, was_NG: torch.Tensor, now_NG: torch.Tensor, draws: _Draws) -> None:
        """Give the lanes that start now (``now & ~was``) a window of fresh guesses, from their own columns of this
        pass's uniforms (a lane that did not run in the pass used none of them)."""
        b = self.batch
        ai, ag = (now_NG & ~was_NG).nonzero(as_tuple=True)
        if not len(ai):
            return
        w, pos_M = self.window, self.base_G[ag]
        draft_Mw = fresh_guesses(
            self.rule.draft_init,
            draws.main(ai, ag)[:, 2],
            torch.ones(len(ai), w, dtype=torch.bool, device=pos_M.device),
            b.draft_NGw[ai, ag],
            torch.zeros_like(pos_M),
            pos_M,
            self.V,
            self.grid,
        )
        b.draft_NGw[ai, ag] = draft_Mw
        b.q_NGwV[ai, ag] = torch.zeros_like(b.q_NGwV[ai, ag]).scatter_(2, draft_Mw.unsqueeze(2), 1.0)

    def inputs(self) -> tuple[torch.Tensor, RowWindows]:
        """This pass's rows [R, l, C] and their layout: every active lane's inputs of every image in the image's
        row, each at its own position — the lane's last fixed token, then each guess that has a successor in the
        window (the chain's, or with SJD-PAC's tree every guess of a slot before the last tree slot)."""
        b, device, w, Ln, tmpl = self.batch, self.tokens_BL.device, self.window, self.lane_len, self.tmpl
        N, G = b.n_NG.shape
        fin_NG = b.n_NG >= Ln
        # A finished lane whose successor started on a stand-in feeds its true last token once (a flush) while any
        # later lane of its image still has tokens to draw (their queries attend to it).
        open_after_NG = torch.zeros_like(fin_NG)
        if G > 1:
            open_after_NG[:, :-1] = (~fin_NG).flip(1).long().cumsum(1).flip(1)[:, 1:] > 0
        flush_NG = b.flush_NG & fin_NG & open_after_NG
        active_NG = b.started_NG & (~fin_NG | flush_NG)
        ai, ag = active_NG.nonzero(as_tuple=True)
        n_M = b.n_NG[ai, ag]
        flush_M = flush_NG[ai, ag]
        l_M = torch.where(flush_M, 1, (Ln - n_M).clamp(max=w))  # window slots this pass (a flush: its root only)
        start_M = self.base_G[ag] + n_M  # the sequence position of the lane's first input (token start - 1)
        # Fed nodes per lane (columns of the row): the root, and guesses whose successors are in the window.
        fed_MF = fed_valid(tmpl, b.tree_ok_NGD[ai, ag], l_M)
        cnt_M = fed_MF.sum(dim=1)
        cnt_NG = torch.zeros_like(b.n_NG).index_put_((ai, ag), cnt_M)
        off_M = (cnt_NG.cumsum(1) - cnt_NG)[ai, ag]
        l = int(cnt_NG.sum(1).max())
        col_MF = torch.where(fed_MF, off_M[:, None] + fed_MF.long().cumsum(1) - 1, -1)
        # The root: the lane's last fixed token; a lane's start feeds the token before it in raster order — fixed
        # if the lane above has finished, else (ZipAR) the lane above's last fixed token in its place, as the
        # official code does; the lane above then owes a flush.
        img_M = b.img_N[ai]
        before_M = (start_M - 1).clamp(min=0)
        stand_in_M = (n_M == 0) & (ag > 0)
        if bool(stand_in_M.any()):
            above_n_M = b.n_NG[ai, (ag - 1).clamp(min=0)]
            aux_M = stand_in_M & (above_n_M < Ln)
            b.flush_NG[ai[aux_M], ag[aux_M] - 1] = True
            before_M = torch.where(aux_M, self.base_G[(ag - 1).clamp(min=0)] + above_n_M - 1, before_M)
        # Node tokens: slot d's guess k (k = 0: the window's guess, else an SJD-PAC alternative).
        guesses_MwK = b.draft_NGw[ai, ag].unsqueeze(2)
        if tmpl.K > 1:
            alt_MwK = torch.zeros(len(ai), w, tmpl.K - 1, dtype=torch.long, device=device)
            alt_MwK[:, : tmpl.D] = b.alt_NGDk[ai, ag]
            guesses_MwK = torch.cat((guesses_MwK, alt_MwK), dim=2)
        slot_F, k_F = self._fed_slot_F.clamp(min=0), self._fed_k_F
        tok_MF = torch.where(self._fed_slot_F >= 0, guesses_MwK[:, slot_F, k_F], self.tokens_BL[img_M, before_M, None])
        mi, fi = fed_MF.nonzero(as_tuple=True)
        col = col_MF[mi, fi]
        q_pos_Nl = torch.full((N, l), self.kv.max_len, dtype=torch.long, device=device)  # padding: never stored
        q_pos_Nl[ai[mi], col] = start_M[mi] + self._fed_slot_F[fi] + 1
        own_RNll = None
        if bool((b.n_NG == 0).all()):  # the first pass (afterwards every image has fixed a token)
            labels_R = cfg_labels(self.labels_B, self.model.cfg.null_class) if self.params.guided else self.labels_B
            guesses = self.model.embed_tokens(b.draft_NGw[b.rows_img, 0, : l - 1])
            x_RlC = torch.cat((self.model.embed_classes(labels_R), guesses), dim=1)
            visible_NlT = None
            if tmpl.K > 1:  # deferred writes: the class-token call is a plain chain (no tree before a refusal)
                own_RNll = torch.ones(l, l, dtype=torch.bool, device=device).tril().expand(len(b.rows_img), l, l)
                visible_NlT = torch.zeros(N, l, self.L, dtype=torch.bool, device=device)[b.rows_img]
        else:
            tok_Nl = torch.zeros(N, l, dtype=torch.long, device=device)
            tok_Nl[ai[mi], col] = tok_MF[mi, fi]
            x_RlC = self.model.embed_tokens(tok_Nl[b.rows_img])
            # Query (lane, node) sees: positions before its own that were fixed before this pass, the root of every
            # lane (a fixed token, or a stand-in, fed in this pass) and the nodes above it in its own lane.
            firsts_NS = torch.zeros_like(b.seen_NS)
            firsts_NS[ai, start_M] = True
            key_S = torch.arange(self.L, device=device)
            if tmpl.K == 1:  # one chain per lane: its inputs are contiguous, so positions say it all
                qstart_Nl = torch.full((N, l), self.kv.max_len, dtype=torch.long, device=device)
                qstart_Nl[ai[mi], col] = start_M[mi]
                visible_NlT = (key_S <= q_pos_Nl[:, :, None]) & (
                    (b.seen_NS | firsts_NS)[:, None, :] | (key_S >= qstart_Nl[:, :, None])
                )
            else:  # a tree: several nodes share a position; this call's keys are attended apart from the cache's
                visible_NlT = (key_S <= q_pos_Nl[:, :, None]) & (b.seen_NS & ~firsts_NS)[:, None, :]
                lane_Nl = torch.full((N, l), -1, dtype=torch.long, device=device)
                node_Nl = torch.zeros(N, l, dtype=torch.long, device=device)
                lane_Nl[ai[mi], col], node_Nl[ai[mi], col] = mi, fi
                same_Nll = (lane_Nl[:, :, None] == lane_Nl[:, None, :]) & (lane_Nl[:, :, None] >= 0)
                above_Nll = tmpl.ancestor_FF.to(device)[node_Nl[:, :, None], node_Nl[:, None, :]]
                root_of_other_Nll = (node_Nl == 0)[:, None, :] & (q_pos_Nl[:, None, :] <= q_pos_Nl[:, :, None])
                own_RNll = ((same_Nll & above_Nll) | (~same_Nll & root_of_other_Nll))[b.rows_img]
            visible_NlT = visible_NlT[b.rows_img]
        valid_M = torch.where(flush_M, 0, l_M)
        self._pass = _Pass(ai, ag, col_MF, l_M, valid_M, start_M, flush_M, q_pos_Nl)
        layout = RowWindows(self.kv, q_pos_Nl[b.rows_img], self.table_Pc2, visible_NlT, own_RNll)
        self._layout = layout
        return x_RlC, layout

    def advance(self, logits_RlV: torch.Tensor) -> None:
        """Verify every lane's window against this pass's logits [R, l, V], fix the accepted tokens, slide the
        windows, start the lanes ZipAR lets start; finished images (and null rows with no guided token left) leave
        the batch."""
        b, L, device, ps, tmpl = self.batch, self.L, self.tokens_BL.device, self._pass, self.tmpl
        assert ps is not None and self._layout is not None, "inputs() first"
        self._pass = None
        R, l, _ = logits_RlV.shape
        self.calls, self.row_tokens = self.calls + 1, self.row_tokens + R * l
        self.passes_B[b.img_N] += 1
        # The input at sequence position s predicts raster token s.
        guided_Nl = self.guided_L[ps.q_pos_Nl.clamp(max=L - 1)]
        p_NlV = _target_probs(logits_RlV, b, guided_Nl, self.params)
        draws = _Draws(self, draw_uniforms(self.gens, b.img_N.tolist(), self._u_shape, device))
        ai, ag = ps.ai_M, ps.ag_M
        M = len(ai)
        wl = int(ps.l_M.max())
        # p at each fed node (the target of its children's slot); the main path's p per slot (root, main guesses).
        p_MFV = p_NlV[ai[:, None], ps.col_MF.clamp(min=0)]
        main_fed_w = torch.cat((torch.zeros(1, dtype=torch.long), tmpl.main_fed_w[: wl - 1])).to(device)
        p_MlV = p_MFV[:, main_fed_w]
        u_M3w = draws.main(ai, ag)
        draft_Mw, q_MwV = b.draft_NGw[ai, ag], b.q_NGwV[ai, ag]
        if tmpl.K == 1:
            kept_M, adv_M, new_Ml = _verify(self.rule, p_MlV, draft_Mw[:, :wl], q_MwV[:, :wl], u_M3w, ps.valid_M)
        else:
            kept_M, adv_M, new_Ml, path_Ml = _verify_tree(
                self.rule,
                tmpl,
                p_MFV,
                p_MlV,
                draft_Mw,
                q_MwV,
                b.alt_NGDk[ai, ag],
                b.tree_ok_NGD[ai, ag],
                ps.valid_M,
                draws.coins(ai, ag),
                u_M3w,
            )
            # Keep the keys of the root (a fixed token, a stand-in or a flush) and of the kept guesses before the
            # last fixed token (it is fed again).
            ci, cj = (torch.arange(wl + 1, device=device) < adv_M.clamp(min=1)[:, None]).nonzero(as_tuple=True)
            fed_Ml1 = torch.cat((torch.zeros(M, 1, dtype=torch.long, device=device), path_Ml), dim=1)
            cols = ps.col_MF[ci, fed_Ml1[ci, cj]]
            img_k, null_row_N = ai[ci], len(b.img_N) + b.null_N.long().cumsum(0) - 1
            has_null_k = b.null_N[img_k]
            rows = torch.cat((img_k, null_row_N[img_k][has_null_k]))  # both rows of a guided image
            self._layout.commit(rows, torch.cat((cols, cols[has_null_k])))
        n_M = b.n_NG[ai, ag]
        pos0_M = self.base_G[ag] + n_M  # raster position of the window's first slot
        mi, mj = (torch.arange(wl, device=device) < adv_M[:, None]).nonzero(as_tuple=True)
        self.tokens_BL[b.img_N[ai[mi]], pos0_M[mi] + mj] = new_Ml[mi, mj]
        self.kept_B.index_add_(0, b.img_N[ai], kept_M)
        # KV positions now final: the lane's first input and the inputs that carried kept guesses.
        si, sj = (torch.arange(wl, device=device) < adv_M.clamp(min=1)[:, None]).nonzero(as_tuple=True)
        b.seen_NS[ai[si], ps.start_M[si] + sj] = True
        n_M = n_M + adv_M
        last_M = self.tokens_BL[b.img_N[ai], (self.base_G[ag] + n_M - 1).clamp(min=0, max=L - 1)]
        new_Mw, new_q_MwV = _next_windows(
            self.rule, draft_Mw, q_MwV, p_MlV, u_M3w, adv_M, ps.valid_M, last_M, self.base_G[ag] + n_M, self.grid
        )
        b.n_NG[ai, ag] = n_M
        b.draft_NGw[ai, ag], b.q_NGwV[ai, ag] = new_Mw, new_q_MwV
        if tmpl.K > 1:  # SJD-PAC: the next window's first D slots get K guesses where their q was computed
            D = tmpl.D
            computed_MD = torch.arange(D, device=device) + adv_M[:, None] < ps.valid_M[:, None]
            alt_MDk, ok_MD = alternatives(new_q_MwV[:, :D], new_Mw[:, :D], draws.alt(ai, ag), computed_MD)
            b.alt_NGDk[ai, ag], b.tree_ok_NGD[ai, ag] = alt_MDk, ok_MD
        b.flush_NG[ai[ps.flush_M], ag[ps.flush_M]] = False
        if self.G > 1:  # ZipAR: a lane starts once the lane above has fixed `zipar` tokens
            was_NG = b.started_NG.clone()
            b.started_NG[:, 1:] |= b.started_NG[:, :-1] & (b.n_NG[:, :-1] >= self.zipar)
            self._open_lanes(was_NG, b.started_NG, draws)
        prefix_N = self._prefix()
        self.fixed = int(prefix_N.min())  # images that finished earlier left the batch at prefix L
        b.keep(prefix_N < L, b.null_N & (prefix_N <= self.last_guided), self.kv)

    def _prefix(self) -> torch.Tensor:
        """Each active image's fixed raster prefix [N]: the position of its first token not fixed yet (L: none)."""
        b = self.batch
        open_NG = b.n_NG < self.lane_len
        g_N = open_NG.long().argmax(dim=1)
        at_N = self.base_G[g_N] + b.n_NG.gather(1, g_N[:, None]).squeeze(1)
        return torch.where(open_NG.any(dim=1), at_N, torch.full_like(at_N, self.L))

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
            "zipar": self.zipar,
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
    zipar: int = 0,
) -> RasterResult:
    """Sample ``labels_B`` with windows of ``window`` guesses verified per forward pass, kept by ``rule``; in raster
    order, or with ``zipar = N`` in ZipAR's (a grid row starts once the row above has fixed N tokens).

    ``on_step`` gets a ``RasterStep`` per token t, in raster order, once every image has fixed token t (its logit
    fields are empty [0, V] tensors: a token's logits come from whichever pass fixed it). ``stats``:
    ``forward_passes`` (passes per image, mean), ``forward_passes_per_image``, ``mean_accepted`` (tokens fixed per
    pass, ``L / passes`` averaged over images), ``accepted_drafts`` (guesses kept per pass, mean over images),
    ``calls`` (transformer calls for the batch), ``row_tokens`` (row-positions computed per image), ``guided_steps``.
    """
    plan = SpeculativePlan(rule, window, zipar)
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
