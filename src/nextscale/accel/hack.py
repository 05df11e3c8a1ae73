"""``hack``: HACK's head-aware KV-cache compression (Qin et al., arXiv 2504.09261, AAAI 2026), as an alternative
selector on ``scalekv``'s hook.

VAR's attention heads come in two kinds. *Contextual* heads attend from every query to the same few keys
(vertical stripes in the attention map); *structural* heads attend from each query to its spatial counterparts
in earlier scales (diagonals). One rule breaks one kind or the other, so each head keeps positions by its own
rule: a contextual head the keys with the most softmax attention summed over the observation-window queries
(SnapKV's score); a structural head the keys that matter most to *some* query — the maximum over all the scale's
queries — which keeps every query's own diagonal. Heads are classified by the calibration
(``nextscale calibrate-kv``) by the ratio of how concentrated (share on the top 10 % of keys) its attention mass
averaged over queries is to how concentrated each query's own attention is: the half of the heads with the higher
ratio is contextual; uncalibrated, every head is treated as contextual. Every layer gets the same budget (no
drafter layers): ``budget`` of the full cache.

Differences from the paper: HACK gives the two head classes different budgets; here all heads of a layer keep the
same number of positions (the cache is one [rows, heads, positions, dim] tensor per layer), and the classes differ
in which positions they keep. The code of the paper was not available to compare against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from nextscale.accel.base import register
from nextscale.accel.scalekv import KVRoles, ScaleKV, pool_scores, window_queries
from nextscale.engine.var.plan import KVSelector


@dataclass(frozen=True)
class HackSelect:
    contextual: tuple[tuple[bool, ...], ...]  # [layer][head]; empty: every head contextual
    window: int = 16
    kernel: int = 5

    def __call__(
        self, layer: int, si: int, pn: int, q_RHlc: torch.Tensor, k_RHnc: torch.Tensor, scale: float, keep: int
    ) -> torch.Tensor:
        H, l = q_RHlc.shape[1:3]
        N = k_RHnc.shape[2]
        p_RHlN = torch.softmax((q_RHlc.float() @ k_RHnc.float().transpose(-1, -2)) * scale, dim=-1)
        win = window_queries(l, pn, self.window).to(q_RHlc.device)
        context_RHN = p_RHlN[:, :, win].sum(2)
        score = context_RHN
        if self.contextual and not all(self.contextual[layer]):
            structural_H = ~torch.tensor(self.contextual[layer], device=q_RHlc.device)
            score = torch.where(structural_H.view(1, H, 1), p_RHlN.amax(2), context_RHN)
        score = pool_scores(score, self.kernel)
        return score.topk(min(keep, N), dim=-1).indices.sort(dim=-1).values


@register
@dataclass(frozen=True)
class HACK(ScaleKV):
    """``budget``: every layer's cache as a share of the full one; ``budgets``: the calibration file that classifies
    the heads (default: the model folder's ``kv_budgets.json``); ``window``, ``kernel``: as for ``scalekv``."""

    name = "hack"
    conflicts = ("scalekv", "code")

    def selector(self, roles: KVRoles) -> KVSelector:
        return HackSelect(roles.contextual, self.window, self.kernel)

    def drafters(self, roles: KVRoles) -> Mapping[int, Sequence[int]]:
        return {}


__all__ = ["HACK", "HackSelect"]
