"""``scalekv``: ScaleKV's scale-aware KV-cache compression (Li et al., NeurIPS 2025; github StargazerX0/ScaleKV).

Per scale, each transformer layer is a *drafter* (its queries spread attention over many earlier scales: it needs
its whole cache) or a *refiner* (attention concentrated on the current map: a small cache suffices). Drafters
keep everything; refiners keep ``m`` positions, with ``m`` solved so that the cache's peak size is ``budget`` of
the full one. After each scale a refiner layer keeps, per head, the positions with the highest pooled attention
logits from 16 "observation window" queries (the centres of a 4x4 grid over the map), plus the window itself —
ScaleKV's SnapKV-style rule (raw logits q.k/sqrt(d), no softmax; 1-D max-pool of width 5 so neighbours stay
together). The last scale's keys are never stored: nothing attends to them.

The roles come from an offline calibration (``nextscale calibrate-kv --model DIR -o kv_budgets.json``): exact
sampling on a few labels, recording per layer and scale the Attention Selectivity Index — here the mean of (i)
the share of attention the current map's queries give to the current map and (ii) the share of the history's
attention that lands on its top 10 % of keys. Layers with the lowest index at a scale are its drafters (ScaleKV
found 2-3 of Infinity's 32-40 blocks). A model folder's ``kv_budgets.json`` is used by default; without one, block
0 is the only drafter (ScaleKV's finding on every model it calibrated). The same file classifies heads for
``hack``. Lossy: measure it on your model (``benchmarks/bench_accel.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nextscale.accel.base import Accel, PlanContext, register
from nextscale.engine.kv_cache import KVCache
from nextscale.engine.sampling import Generators
from nextscale.engine.var.params import SamplingParams
from nextscale.engine.var.plan import REFINER, KVSelector, StepPlan
from nextscale.engine.var.state import Generation
from nextscale.errors import InvalidInputError
from nextscale.fileio import atomic_file
from nextscale.models.attention import CachedStep
from nextscale.models.tokenizers.msvq import MultiScaleQuantizer
from nextscale.models.var import VAR

FORMAT = "nextscale-kv-budgets/1"
FILE_NAME = "kv_budgets.json"  # in a model folder: the calibration ``scalekv`` and ``hack`` use by default


# ---- the calibration --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVRoles:
    """What the calibration found: per scale its drafter layers; per layer and head whether it is contextual
    (HACK: a few keys collect most attention from every query) rather than structural (each query its own keys)."""

    patch_nums: tuple[int, ...]
    depth: int
    num_heads: int
    drafters: dict[int, tuple[int, ...]]
    contextual: tuple[tuple[bool, ...], ...]
    asi: tuple[tuple[float | None, ...], ...] = ()  # [scale][layer], None at scale 0 (no history)
    head_ratio: tuple[tuple[float, ...], ...] = ()  # [layer][head]: column concentration / query concentration
    samples: int = 0

    @classmethod
    def default(cls, ctx: PlanContext) -> KVRoles:
        """Uncalibrated: block 0 drafts at every scale; every head contextual."""
        S = ctx.num_scales
        return cls(ctx.patch_nums, ctx.depth, ctx.num_heads, {si: (0,) for si in range(S)}, ())

    def check(self, ctx: PlanContext) -> KVRoles:
        if tuple(self.patch_nums) != tuple(ctx.patch_nums) or self.depth != ctx.depth:
            raise InvalidInputError(
                f"KV calibration is for patch_nums {list(self.patch_nums)}, depth {self.depth}; the model has "
                f"{list(ctx.patch_nums)}, depth {ctx.depth} (rerun nextscale calibrate-kv)"
            )
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "patch_nums": list(self.patch_nums),
            "depth": self.depth,
            "num_heads": self.num_heads,
            "samples": self.samples,
            "drafters": {str(si): list(v) for si, v in sorted(self.drafters.items())},
            "contextual_heads": [[int(h) for h in row] for row in self.contextual],
            "asi": [list(row) for row in self.asi],
            "head_ratio": [list(row) for row in self.head_ratio],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "KV calibration") -> KVRoles:
        if d.get("format") != FORMAT:
            raise InvalidInputError(f"{where}: format {d.get('format')!r} is not {FORMAT!r}")
        try:
            return cls(
                tuple(d["patch_nums"]),
                int(d["depth"]),
                int(d["num_heads"]),
                {int(k): tuple(int(x) for x in v) for k, v in d["drafters"].items()},
                tuple(tuple(bool(h) for h in row) for row in d.get("contextual_heads", [])),
                tuple(tuple(row) for row in d.get("asi", [])),
                tuple(tuple(row) for row in d.get("head_ratio", [])),
                int(d.get("samples", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInputError(f"{where}: malformed ({e!r})") from None

    def save(self, path: str | Path) -> None:
        text = json.dumps(self.to_json(), indent=1) + "\n"
        atomic_file(path, lambda f: f.write(text.encode()))  # type: ignore[attr-defined]

    @classmethod
    def load(cls, path: str | Path) -> KVRoles:
        p = Path(path)
        if not p.is_file():
            raise InvalidInputError(f"KV calibration file {str(p)!r} does not exist (nextscale calibrate-kv makes one)")
        try:
            return cls.from_json(json.loads(p.read_text()), str(p))
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{p}: not JSON ({e})") from None


class _Recorder:
    """A KV store that attends with explicit probabilities and accumulates the calibration statistics."""

    def __init__(self, kv: KVCache, depth: int, num_heads: int, num_scales: int):
        self.kv, self.si = kv, 0
        self.asi_sum = torch.zeros(num_scales, depth, dtype=torch.float64)
        self.asi_n = torch.zeros(num_scales, depth, dtype=torch.float64)
        self.col = torch.zeros(depth, num_heads, dtype=torch.float64)
        self.row = torch.zeros(depth, num_heads, dtype=torch.float64)

    def attend(
        self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor, scale: float
    ) -> torch.Tensor:
        k, v = self.kv.write(layer, k_RHlc, v_RHlc)
        p_RHlN = torch.softmax((q_RHlc.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
        N, l = p_RHlN.shape[-1], p_RHlN.shape[-2]
        n = N - l
        if n:  # scale 0 has no history
            cur = p_RHlN[..., n:].sum(-1).mean()
            hist = p_RHlN[..., :n]
            top = max(1, math.ceil(0.1 * n))
            conc = (hist.topk(top, dim=-1).values.sum(-1) / hist.sum(-1).clamp_min(1e-12)).mean()
            self.asi_sum[self.si, layer] += float(cur + conc) / 2
            self.asi_n[self.si, layer] += 1
            # HACK's two head classes: a contextual head's column mass (averaged over queries) is as concentrated
            # as each query's own attention; a structural (diagonal) head's is not.
            topn = max(1, math.ceil(0.1 * N))
            col = p_RHlN.mean(-2).topk(topn, dim=-1).values.sum(-1).mean(0)  # [H]
            row = p_RHlN.topk(topn, dim=-1).values.sum(-1).mean((0, 2))  # [H]
            self.col[layer] += (col * l).double()
            self.row[layer] += (row * l).double()
        return (p_RHlN.to(v.dtype) @ v).to(q_RHlc.dtype)


@torch.no_grad()
def calibrate_kv(
    var: VAR,
    quantizer: MultiScaleQuantizer,
    labels_B: torch.Tensor,
    params: SamplingParams,
    generators: Generators,
    drafters: int | None = None,
) -> KVRoles:
    """Sample ``labels_B`` exactly, recording attention; ``drafters`` layers per scale (default depth/8, >= 1)."""
    S, depth, H = var.scales.num_scales, var.depth, var.num_heads
    state = Generation(var, quantizer, labels_B, params, generators)
    assert isinstance(state.kv, KVCache)
    rec = _Recorder(state.kv, depth, H, S)
    try:
        while not state.done:
            rec.si = state.si
            state.advance(state.model.forward_tokens(state.x, state.cond, CachedStep(rec)))
    finally:
        state.release()
    asi = torch.where(rec.asi_n > 0, rec.asi_sum / rec.asi_n.clamp_min(1), float("nan"))
    k = drafters if drafters is not None else max(1, round(depth / 8))
    if not 0 <= k <= depth:
        raise InvalidInputError(f"drafters must be in 0..{depth}, got {k}")
    roles = {si: tuple(sorted(asi[si].argsort()[:k].tolist())) if si else tuple(range(depth)) for si in range(S)}
    ratio_LH = rec.col / rec.row.clamp_min(1e-12)
    # Which heads are contextual is relative: the more column-concentrated half (the ratio's spread differs between
    # models; HACK also splits by an empirical threshold).
    contextual = (ratio_LH >= ratio_LH.median()).tolist()
    ratio = ratio_LH.tolist()
    return KVRoles(
        tuple(var.scales.patch_nums),
        depth,
        H,
        roles,
        tuple(tuple(row) for row in contextual),
        tuple(tuple(None if math.isnan(a) else round(a, 4) for a in row) for row in asi.tolist()),
        tuple(tuple(round(r, 4) for r in row) for row in ratio),
        labels_B.numel(),
    )


# ---- budgets -----------------------------------------------------------------------------------------------------
def kv_keeps(
    steps: Sequence[StepPlan], ctx: PlanContext, budget: float, drafters: Mapping[int, Sequence[int]]
) -> list[tuple[int, ...] | None]:
    """Per run scale, per layer, the positions a cache keeps after it: drafter layers everything, the others ``m``
    solved so that the cache's peak is ``budget`` x the full one; 0 at the last run scale (never read)."""
    run = [si for si, p in enumerate(steps) if not p.skip]
    tokens = ctx.token_counts
    cum, total = {}, 0
    for si in run:
        total += tokens[si]
        cum[si] = total
    full = sum(tokens) * ctx.depth
    stored = run[:-1]  # scales whose keys are kept for later ones

    def caps(m: int) -> list[int]:
        return [
            max((cum[si] if layer in drafters.get(si, ()) else min(cum[si], m) for si in stored), default=0)
            for layer in range(ctx.depth)
        ]

    lo, hi = 1, max(cum.values())
    if sum(caps(lo)) > budget * full:
        raise InvalidInputError(
            f"scalekv: budget={budget} is below what the drafter layers alone keep "
            f"({sum(caps(lo)) / full:.3f} of the full cache); raise it or calibrate with fewer drafters"
        )
    while lo < hi:  # the largest m whose caches fit the budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(caps(mid)) <= budget * full else (lo, mid - 1)
    m = lo
    out: list[tuple[int, ...] | None] = [None] * len(steps)
    for si in stored:
        out[si] = tuple(cum[si] if layer in drafters.get(si, ()) else m for layer in range(ctx.depth))
    out[run[-1]] = (0,) * ctx.depth
    return out


def roles_for(path: str, ctx: PlanContext) -> KVRoles:
    """The calibration: a file named in the spec, else the model folder's, else the uncalibrated default."""
    if path:
        return KVRoles.load(path).check(ctx)
    if ctx.kv_roles is not None:
        return KVRoles.from_json(ctx.kv_roles, "the model's " + FILE_NAME).check(ctx)
    return KVRoles.default(ctx)


def window_queries(l: int, pn: int, window: int) -> torch.Tensor:
    """ScaleKV's observation window: the centre token of each cell of a g x g grid over the pn x pn map (g^2 =
    ``window``); for a call that is not a whole map (pruned tokens), evenly spaced queries."""
    g = math.isqrt(window)
    if l == pn * pn and pn >= g:
        centres = [int((a + 0.5) * pn / g) for a in range(g)]
        return torch.tensor([i * pn + j for i in centres for j in centres])
    return torch.linspace(0, l - 1, min(window, l)).round().long().unique()


def pool_scores(score_RHN: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D max-pool along the sequence (stride 1, same size), so kept positions come with their neighbours."""
    if kernel <= 1:
        return score_RHN
    R, H, N = score_RHN.shape
    return F.max_pool1d(score_RHN.reshape(R * H, 1, N), kernel, 1, kernel // 2).view(R, H, N)


@dataclass(frozen=True)
class ScaleKVSelect:
    window: int = 16
    kernel: int = 5

    def __call__(
        self, layer: int, si: int, pn: int, q_RHlc: torch.Tensor, k_RHnc: torch.Tensor, scale: float, keep: int
    ) -> torch.Tensor:
        l, N = q_RHlc.shape[2], k_RHnc.shape[2]
        win = window_queries(l, pn, self.window).to(q_RHlc.device)
        score = (q_RHlc[:, :, win].float() @ k_RHnc.float().transpose(-1, -2)).sum(2) * scale  # [R, H, N]
        score = pool_scores(score, self.kernel)
        score[..., N - l + win] = math.inf  # the window itself is always kept
        return score.topk(min(keep, N), dim=-1).indices.sort(dim=-1).values


@register
@dataclass(frozen=True)
class ScaleKV(Accel):
    """``budget``: the compressed cache's peak as a share of the full one; ``budgets``: a calibration file
    (default: the model folder's ``kv_budgets.json``); ``window``: observation queries; ``kernel``: pooling width."""

    name = "scalekv"
    stage = 70
    conflicts = ("hack", "code")
    budget: float = 0.25
    budgets: str = ""
    window: int = 16
    kernel: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise InvalidInputError(f"{self.name}: budget must be in (0, 1], got {self.budget}")
        if self.window < 1 or math.isqrt(self.window) ** 2 != self.window:
            raise InvalidInputError(f"{self.name}: window must be a square number >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise InvalidInputError(f"{self.name}: kernel must be odd and >= 1, got {self.kernel}")

    def selector(self, roles: KVRoles) -> KVSelector:
        return ScaleKVSelect(self.window, self.kernel)

    def drafters(self, roles: KVRoles) -> Mapping[int, Sequence[int]]:
        return roles.drafters

    def apply(self, steps: list[StepPlan], ctx: PlanContext) -> list[StepPlan]:
        if any(p.model == REFINER and not p.skip for p in steps):
            raise InvalidInputError(f"{self.name} compresses the main transformer's cache; it does not apply to code")
        roles = roles_for(self.budgets, ctx)
        select = self.selector(roles)
        keeps = kv_keeps(steps, ctx, self.budget, self.drafters(roles))
        return [
            p if keep is None else dataclasses.replace(p, kv_keep=keep, kv_select=select)
            for p, keep in zip(steps, keeps)
        ]
