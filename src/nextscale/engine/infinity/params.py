"""What an Infinity request carries into sampling: guidance and temperature (one value or one per scale), the bit
filters, where guidance mixes, an early stop, and the seed (``SeededParams``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from nextscale.config import MAX_CFG
from nextscale.engine.params import SeededParams
from nextscale.errors import InvalidInputError


def _per_scale(name: str, value: float | Sequence[float], lo: float, hi: float, lo_open: bool) -> tuple[float, ...]:
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    for v in values:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or not (v > lo if lo_open else v >= lo) or v > hi:
            raise InvalidInputError(
                f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}] or a list of them, got {value!r}"
            )
    if not values:
        raise InvalidInputError(f"{name} must be a number or a non-empty list, got {value!r}")
    return values


@dataclass(frozen=True)
class InfinityParams(SeededParams):
    """How bits are drawn at every scale, with the official meanings.

    ``cfg``/``tau``: one value, or one per scale (a list at least as long as the schedule). Guided logits are
    ``cfg*cond + (1-cfg)*uncond`` of logits already divided by ``tau`` (``cfg=1``: unguided). ``cfg_insertion_layer``
    0 guides the logits; ``-k`` mixes the hidden states after block ``depth-k`` instead. ``top_k`` only matters
    as 1 (greedy: two logits per bit); ``top_p`` drops the less likely value of a bit when its probability is at
    most ``1-top_p``. ``trunk_scale``: stop after that many scales (the image decodes from the codes so far).
    Defaults are ``gen_one_img``'s (top_k 900, top_p 0.97) with the README's cfg 3, tau 0.5."""

    cfg: float | tuple[float, ...] = 3.0
    tau: float | tuple[float, ...] = 0.5
    top_k: int = 900
    top_p: float = 0.97
    cfg_insertion_layer: int = 0
    trunk_scale: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfg", _norm(_per_scale("cfg", self.cfg, 0.0, MAX_CFG, False)))
        object.__setattr__(self, "tau", _norm(_per_scale("tau", self.tau, 0.0, 1e4, True)))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 <= self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in [0, 1] (0 = off), got {self.top_p!r}")
        k = self.cfg_insertion_layer
        if isinstance(k, bool) or not isinstance(k, int) or k > 0:
            raise InvalidInputError(
                f"cfg_insertion_layer must be 0 (guide the logits) or -k (mix hidden states after block depth-k), "
                f"got {k!r}"
            )
        t = self.trunk_scale
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise InvalidInputError(f"trunk_scale must be an int >= 1 or None, got {t!r}")
        super().__post_init__()

    def cfg_list(self, num_scales: int) -> tuple[float, ...]:
        return _expand("cfg", self.cfg, num_scales)

    def tau_list(self, num_scales: int) -> tuple[float, ...]:
        return _expand("tau", self.tau, num_scales)

    def guided(self, num_scales: int) -> bool:
        """Whether unconditional rows run at all: any cfg != 1 in the list (infinity.py:484, whole list)."""
        values = self.cfg if isinstance(self.cfg, tuple) else self.cfg_list(num_scales)
        return any(c != 1 for c in values)


def _norm(values: tuple[float, ...]) -> float | tuple[float, ...]:
    return float(values[0]) if len(values) == 1 else tuple(float(v) for v in values)


def _expand(name: str, value: float | tuple[float, ...], n: int) -> tuple[float, ...]:
    if isinstance(value, tuple):
        if len(value) < n:
            raise InvalidInputError(f"{name} has {len(value)} values for a schedule of {n} scales")
        return value
    return (value,) * n
