"""Proactive drafting (SJD-PAC): a small tree of guesses at the front of a speculative window, verified losslessly.

SJD-PAC (Kang et al., "SJD-PAC: Accelerating Speculative Jacobi Decoding via Proactive Drafting and Adaptive
Continuation", CVPR 2026, arXiv 2603.18599; code KangJialiang/SJD-PAC). After a refusal, the next window's first
slots are the ones whose guesses fail most: their targets were computed on a context that just changed. Proactive
drafting offers ``K`` guesses for each of the first ``D`` slots, as a K-ary tree (every guess at slot d has the slot
d+1 guesses as children), then the usual chain from the first guess of each slot (the *main path*). Adaptive
continuation — keep a later guess where its target barely moved — is MC-SJD's coupled redraw (``coupled_redraw``):
the official code keeps a guess when its stale acceptance test passes and redraws it from the residual otherwise,
which is the maximal coupling.

Guesses of one slot are drawn without replacement from the slot's q (the main one by the Jacobi / coupled redraw,
the others after it), the same K for every parent. At each parent the children are tested in order by recursive
rejection sampling without replacement (Jeon et al., "Recursive Speculative Decoding", 2024): child k is kept with
``rule.accept_prob(p_k, q_k, x_k)``, where ``p_1 = p`` (the parent's output), ``q_1 = q``, and after a refusal
``p_{k+1} = norm(rule.residual(p_k, q_k, x_k))`` and ``q_{k+1}`` is ``q_k`` without ``x_k``, renormalised; if every
child is refused the token is drawn from ``p_{K+1}``. With the exact rule every fixed token follows p (tested like
SJD's chain against an enumerated joint distribution). Slots whose q is one guess (fresh guesses) have one child.

Differences from the official code: it picks the longest accepted path over all leaves, each tested on its own
coin; here the first accepted child wins at every parent, as the recursive scheme requires. The official tree
counts the root as a level (``tree_depth=3`` = 2 slots of guesses here).

The template here is the tree's shape for given (K, D, window), computed once: the *fed* nodes (the inputs of a
pass: the root — the lane's last fixed token — and every guess with children) and the *candidates* (every guess,
with its coin column). Shapes: ``M`` lanes, ``F`` fed nodes, ``C`` candidates, ``V`` codes, ``w`` window.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import torch

from nextscale.engine.sampling import sample_inverse_cdf


@dataclass(frozen=True)
class TreeTemplate:
    """The tree's shape. Fed node f: its slot (``-1``: the root), its digits (child index per slot on its path; all
    zero on the main path), its parent. ``child_cand_FK[f, k]``: the candidate index of f's k-th child at the next
    slot (-1: none), ``child_fed_FK``: that child's fed index (-1: a leaf). ``ancestor_FF[i, j]``: j is i or above
    it. ``main_cand_w``: the main path's candidate per slot, ``main_fed_w``: the fed node holding slot j's main guess
    (-1 for the window's last slot, whose output nobody needs)."""

    K: int
    D: int
    window: int
    slot_F: tuple[int, ...]
    digits_F: tuple[tuple[int, ...], ...]
    parent_F: tuple[int, ...]
    cand_slot_C: tuple[int, ...]
    cand_k_C: tuple[int, ...]
    child_cand_FK: torch.Tensor
    child_fed_FK: torch.Tensor
    ancestor_FF: torch.Tensor
    main_cand_w: torch.Tensor
    main_fed_w: torch.Tensor

    @property
    def fed(self) -> int:
        return len(self.slot_F)

    @property
    def k_F(self) -> tuple[int, ...]:
        """Which guess of its slot each fed node holds (0 for the root and the main path)."""
        return tuple(dg[-1] if dg else 0 for dg in self.digits_F)

    @property
    def candidates(self) -> int:
        return len(self.cand_slot_C)


@cache
def tree_template(K: int, D: int, window: int) -> TreeTemplate:
    """The template for ``K`` guesses per parent at the first ``D`` slots of a ``window``-slot window."""
    D = min(D, window)
    fed: list[tuple[int, ...]] = [()]  # digits; the root has none
    for d in range(window - 1):  # a guess at slot d is fed when it has children (slot d + 1 is in the window)
        if d < D - 1:
            fed += [tuple(t) for t in itertools.product(range(K), repeat=d + 1)]
        else:
            fed.append((0,) * (d + 1))  # the main path only
    index = {dg: f for f, dg in enumerate(fed)}
    cands: list[tuple[int, ...]] = []
    for d in range(window):
        cands += [tuple(t) for t in itertools.product(range(K), repeat=d + 1)] if d < D else [(0,) * (d + 1)]
    cand_index = {dg: c for c, dg in enumerate(cands)}
    F = len(fed)
    child_cand = torch.full((F, K), -1, dtype=torch.long)
    child_fed = torch.full((F, K), -1, dtype=torch.long)
    for f, dg in enumerate(fed):
        for k in range(K):
            child = (*dg, k)
            child_cand[f, k] = cand_index.get(child, -1)
            child_fed[f, k] = index.get(child, -1)
    ancestor = torch.zeros(F, F, dtype=torch.bool)
    for f, dg in enumerate(fed):
        for depth in range(len(dg) + 1):
            ancestor[f, index[dg[:depth]]] = True
    main_cand = torch.tensor([cand_index[(0,) * (d + 1)] for d in range(window)])
    main_fed = torch.tensor([index.get((0,) * (d + 1), -1) for d in range(window)])
    return TreeTemplate(
        K,
        D,
        window,
        tuple(len(dg) - 1 for dg in fed),
        tuple(fed),
        tuple(index[dg[:-1]] if dg else -1 for dg in fed),
        tuple(len(dg) - 1 for dg in cands),
        tuple(dg[-1] for dg in cands),
        child_cand,
        child_fed,
        ancestor,
        main_cand,
        main_fed,
    )


def fed_valid(tmpl: TreeTemplate, tree_ok_MD: torch.Tensor, l_M: torch.Tensor) -> torch.Tensor:
    """Which fed nodes each lane feeds [M, F]: a node whose path uses a second-or-later guess only at slots that have
    them (``tree_ok``), and whose children's slot is in the lane's window (``l_M`` slots this pass)."""
    M, device = len(l_M), l_M.device
    ok_F = torch.ones(M, tmpl.fed, dtype=torch.bool, device=device)
    for f, dg in enumerate(tmpl.digits_F):
        for d, k in enumerate(dg):
            if k:
                ok_F[:, f] &= tree_ok_MD[:, d]
    slot_F = torch.tensor(tmpl.slot_F, device=device)
    return ok_F & (slot_F + 1 < l_M[:, None])


def draw_without(q_MV: torch.Tensor, taken_MV: torch.Tensor, u_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from ``q`` without the codes ``taken``, renormalised, by the inverse CDF at ``u``; and
    whether the row had any mass left."""
    rest_MV = q_MV.masked_fill(taken_MV, 0.0)
    has_M = rest_MV.sum(dim=-1) > 0
    return sample_inverse_cdf(torch.where(has_M[:, None], rest_MV, q_MV), u_M), has_M


def alternatives(
    q_MDV: torch.Tensor, main_MD: torch.Tensor, u_MDk: torch.Tensor, computed_MD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guesses 2..K of each tree slot: drawn without replacement from the slot's q after its main guess. Returns
    (guesses [M, D, K-1], whether the slot has a full set [M, D]: its q is a computed distribution with K codes)."""
    M, D, V = q_MDV.shape
    K1 = u_MDk.shape[2]
    q_mV = q_MDV.reshape(-1, V)
    taken_mV = torch.zeros_like(q_mV, dtype=torch.bool).scatter_(1, main_MD.reshape(-1, 1), True)
    ok_m = computed_MD.reshape(-1).clone()
    out = []
    for k in range(K1):
        x_m, has_m = draw_without(q_mV, taken_mV, u_MDk[:, :, k].reshape(-1))
        ok_m &= has_m
        taken_mV.scatter_(1, x_m[:, None], True)
        out.append(x_m)
    alt_MDk = torch.stack(out, dim=1).view(M, D, K1) if out else main_MD.new_zeros(M, D, 0)
    return alt_MDk, ok_m.view(M, D)
