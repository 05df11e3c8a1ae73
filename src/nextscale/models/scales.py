"""VAR's scale geometry in one place: token ranges per scale, level ids, the block-causal mask, Phi choice.

Glossary (used across the package): ``si`` scale index, ``pn`` side of the scale's token map, ``l = pn*pn``
tokens at that scale, ``L`` tokens over all scales, ``S`` number of scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class ScaleSchedule:
    patch_nums: tuple[int, ...]

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @cached_property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return tuple(out)

    @property
    def seq_len(self) -> int:
        return self.begin_ends[-1][1]

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    def tokens(self, si: int) -> int:
        return self.patch_nums[si] ** 2

    def token_counts(self) -> tuple[int, ...]:
        return tuple(pn * pn for pn in self.patch_nums)

    def ratio(self, si: int) -> float:
        """Progress through the schedule, 0 at the first scale and 1 at the last (``si / (S-1)``)."""
        return si / max(self.num_scales - 1, 1)

    def level_ids(self) -> torch.Tensor:
        """``lvl_1L``: the scale index of every position, shape [1, L] (int64)."""
        return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(self.patch_nums)]).view(1, -1)

    def block_causal_bias(self) -> torch.Tensor:
        """[1, 1, L, L] additive mask: 0 where scale(key) <= scale(query), else -inf (VAR's training mask)."""
        d = self.level_ids().view(1, -1, 1)
        return torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, self.seq_len, self.seq_len)

    @staticmethod
    def from_level_ids(lvl_1L: torch.Tensor) -> ScaleSchedule | None:
        """Recover ``patch_nums`` from an ``lvl_1L`` buffer; None if it is not a valid level map."""
        ids = lvl_1L.reshape(-1).tolist()
        if not ids or ids[0] != 0:
            return None
        counts: list[int] = []
        for prev, cur in zip([-1, *ids], ids):
            if cur == prev:
                counts[-1] += 1
            elif cur == prev + 1:
                counts.append(1)
            else:
                return None
        pns = [round(c**0.5) for c in counts]
        if any(p * p != c for p, c in zip(pns, counts)) or len(pns) < 2:
            return None
        return ScaleSchedule(tuple(pns))


def phi_index_table(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """Which of ``num_phi`` partially shared Phi convs each scale uses.

    Replicates the official float64 computation exactly (``argmin |ticks - si/(S-1)|``, first minimum
    wins), including its tie-breaking: for S=10, K=4 scales 2 and 7 are exact ties in real arithmetic
    and rounding decides them ([0,0,1,1,1,2,2,3,3,3]).
    """
    K = num_phi
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    span = max(num_scales - 1, 1)  # a single scale (a plain VQ-VAE) sits at ratio 0
    return tuple(int(np.argmin(np.abs(ticks - si / span))) for si in range(num_scales))
