"""Speculative decoding for raster (LlamaGen) models as plug-ins: SJD, GSD and LANTERN as acceptance rules of the
one loop in ``nextscale.engine.raster.speculative``.

    parse_speculative("sjd")                              # window 16, random first guesses
    parse_speculative("sjd:window=8,init=repeat")         # guesses copied from the left neighbour
    parse_speculative("mcsjd")                            # lossless: coupled redraws (= "sjd:coupled=1")
    parse_speculative("gsd:size=7,pdiff=0.15,dist=0.5")   # lossy: group acceptance
    parse_speculative("lantern:delta=0.1,k=1000")         # lossy: relaxed acceptance over latent neighbours
    parse_speculative("zipar:window=4+sjd")               # ZipAR's order: a row starts 4 tokens after the one above
    parse_speculative("fast")                             # a preset (PRESETS; a model folder may tune its own)
    cfg.rule(model) -> AcceptRule;  sample_speculative(model, labels, params, cfg.rule(model), cfg.window)

Every method shares ``window`` (guesses verified per forward pass; 1 = plain sampling) and ``init`` (how slots
without a computed distribution are guessed: ``random`` codes as SJD's paper, or ``repeat`` the left neighbour in
the grid as SJD's LlamaGen script ``repeat_horizon``; the rule object carries it to the loop).

* ``sjd`` — Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative
  Jacobi Decoding" (ICLR 2025): keep guess x with probability ``min(1, p(x)/q(x))``, at a refusal draw from
  ``norm(max(0, p - q))``. Lossless: the kept tokens follow the guided, filtered target exactly (tested against
  the enumerated joint distribution of a tiny model).
* ``mcsjd`` — MC-SJD (arXiv 2510.24211, GSD's authors): SJD whose Jacobi update redraws each guess after a refusal by
  maximal coupling with its previous guess (keep it with ``min(1, p(d)/q(d))``, else draw from ``norm(max(0, p-q))``)
  instead of independently from p. The guess still follows p, so the test stays lossless (tested as SJD's is), and
  it changes only where the target moved: guesses settle and get kept. ``coupled=1`` turns the same redraw on for
  any method (``gsd:coupled=1``).
* ``sjd-pac`` — Kang et al., "SJD-PAC: Accelerating Speculative Jacobi Decoding via Proactive Drafting and Adaptive
  Continuation" (CVPR 2026, arXiv 2603.18599): MC-SJD plus a tree of ``tree`` guesses per parent at the window's
  first ``depth`` slots (``nextscale.engine.raster.tree``), each parent's children tested in order by recursive
  rejection sampling without replacement. Lossless (tested as SJD's is). ``tree=K`` turns it on for any method.
* ``gsd`` — So et al., "Grouped Speculative Decoding for Autoregressive Image Generation" (ICCV 2025), as its code
  (junhyukso/GSD) does it: the candidate group is the ``2·size`` codes around x's rank in the target (ranks
  ``r-size .. r+size-1`` ascending, x included), kept where ``|p(y) - p(x)| < pdiff`` and the squared distance of
  input embeddings ``|e_x - e_y|² < dist``; keep x with ``min(1, Σ_G p / Σ_G q)``; the refusal path is SJD's.
  Embeddings: the LlamaGen model's ``tok_embeddings.weight`` (GSD uses the model's input embedding rows too) or a
  ``codebook`` given to ``rule``. Lossy by design. Differences: the official code falls back to SJD's ratio when the
  rank window runs off the vocabulary; here the window is clipped. The official ``dist=0.5`` is in the units of
  Lumina-mGPT's embeddings: on another codebook most codes may have no neighbour that close, and GSD then draws
  SJD's tokens exactly (it did on the raster demo: benchmarks/RESULTS.md). The default here is scale-free instead:
  ``group_radius`` (the median distance² from a code to its ``2·size``-th nearest code), so the distance test has
  about as many codes to choose from as the rank window. A number given as ``dist`` is used as it is.
* ``lantern`` — Jang et al., "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative Decoding"
  (ICLR 2025), relaxed acceptance as its code (jadohu/LANTERN) computes it: walk x's ``k`` nearest codes in latent
  space (nearest first) and absorb the longest prefix whose summed target probability is <= ``delta`` (the total
  variation budget; ``delta > 1`` means ``(delta - 1)·p(x)``, as the code); keep x with ``min(1, p̃(x)/q(x))``,
  ``p̃(x) = p(x) + absorbed``. Latent space: the VQ codebook when given (LANTERN's table comes from the tokenizer's
  ``quantize.embedding``; pass the l2-normalised rows for LlamaGen's VQ), else ``tok_embeddings.weight`` as the
  proxy. The neighbour table is computed once per model and source tensor (cached; recomputed if the weights
  change in place). Differences: LANTERN drafts with a trained EAGLE head — here the drafts are SJD's
  (training-free); at a refusal we draw from ``max(0, p̃ - q)`` with the absorbed neighbours' mass moved onto x
  (speculative sampling against the relaxed target, so a one-hot guess yields exactly p̃, within ``delta`` of p in
  total variation), where the official code zeroes q on x's k+1 nearest codes instead. Lossy by design; ``delta=0``
  is SJD.

* ``zipar`` — a decoding order, not a rule (He et al., "ZipAR: Accelerating Auto-regressive Image Generation through
  Spatial Locality", arXiv 2412.04062): ``zipar:window=N`` starts grid row r once row r-1 has fixed N tokens, then
  advances every started row in the same passes; ``zipar:window=N+sjd`` gives each row SJD's window (any method
  composes). Lossy by design: a token is conditioned on the tokens fixed before its pass, not on its whole raster
  prefix. The loop: ``nextscale.engine.raster.speculative`` (lanes).

Caution for both lossy rules, as in their official code: a guess the target's top-k / top-p removed (p(x) = 0) can
still be kept — GSD through its group's mass, LANTERN with probability up to ``delta`` through its neighbours' mass.
The official drafters rarely propose such codes; SJD's random first guesses often do, so with a tight top-k the
lossy rules gain passes largely by keeping them (each position stays within ``delta`` of the target in total
variation for one-hot guesses).

What is verified here: SJD's lossless property (enumerated joint distribution, chi-square), batch independence of
every rule, and each rule's formula on hand-made distributions. Not verified: any paper's speed-up or FID (no
real checkpoint in this environment).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from nextscale.accel.base import BUILT_IN, DEFAULT, GIVEN, TUNED, Resolved, parse_options, spec_string
from nextscale.engine.raster.params import RasterParams
from nextscale.engine.raster.sampler import RasterResult, StepCallback
from nextscale.engine.raster.speculative import DRAFT_INITS, AcceptRule, sample_speculative
from nextscale.engine.sampling import Generators
from nextscale.errors import InvalidInputError
from nextscale.models.llamagen import LlamaGen


# ---- the rules -----------------------------------------------------------------------------------------------------
def _at(x_MV: torch.Tensor, idx_M: torch.Tensor) -> torch.Tensor:
    return x_MV.gather(-1, idx_M[:, None]).squeeze(1)


def _ratio(num_M: torch.Tensor, den_M: torch.Tensor) -> torch.Tensor:
    """``min(1, num/den)``; ``den`` is the guess's own probability under q, > 0 by construction."""
    return torch.where(num_M >= den_M, torch.ones_like(num_M), num_M / den_M.clamp_min(torch.finfo(den_M.dtype).tiny))


@dataclass(frozen=True)
class ExactRule:
    """SJD's test — the standard speculative-sampling one. Lossless for any guess drawn independently of its coin.
    ``coupled``: redraw guesses by maximal coupling with the previous ones (MC-SJD; any rule may)."""

    draft_init: str = "random"
    coupled: bool = field(default=False, kw_only=True)
    tree: int = field(default=1, kw_only=True)  # SJD-PAC's proactive drafting: guesses per parent (1: a chain)
    depth: int = field(default=2, kw_only=True)  # ... at the window's first `depth` slots
    lossless: ClassVar[bool] = True

    def accept_prob(self, p_MV: torch.Tensor, q_MV: torch.Tensor, draft_M: torch.Tensor) -> torch.Tensor:
        return _ratio(_at(p_MV, draft_M), _at(q_MV, draft_M))

    def residual(self, p_MV: torch.Tensor, q_MV: torch.Tensor, draft_M: torch.Tensor) -> torch.Tensor:
        return (p_MV - q_MV).clamp_min(0)


@dataclass(frozen=True, eq=False)
class GroupRule(ExactRule):
    """GSD's group test; the residual is SJD's."""

    embed_VC: torch.Tensor | None = None
    size: int = 7
    pdiff: float = 0.15
    dist: float = 0.5
    lossless: ClassVar[bool] = False

    def accept_prob(self, p_MV: torch.Tensor, q_MV: torch.Tensor, draft_M: torch.Tensor) -> torch.Tensor:
        assert self.embed_VC is not None
        M, V = p_MV.shape
        order_MV = torch.sort(p_MV, dim=-1, stable=True).indices  # ascending; ties (filtered codes) by index
        rank_MV = torch.empty_like(order_MV).scatter_(-1, order_MV, torch.arange(V, device=p_MV.device).expand(M, V))
        offsets = torch.arange(-self.size, self.size, device=p_MV.device)
        pos_MG = rank_MV.gather(-1, draft_M[:, None]) + offsets
        inside_MG = (pos_MG >= 0) & (pos_MG < V)
        group_MG = order_MV.gather(-1, pos_MG.clamp(0, V - 1))
        p_MG, q_MG = p_MV.gather(-1, group_MG), q_MV.gather(-1, group_MG)
        e_x = self.embed_VC[draft_M].float()
        d2_MG = (self.embed_VC[group_MG].float() - e_x[:, None]).square().sum(dim=-1)
        keep_MG = inside_MG & ((p_MG - _at(p_MV, draft_M)[:, None]).abs() < self.pdiff) & (d2_MG < self.dist)
        keep_MG |= offsets == 0  # the guess itself is always in its group
        return _ratio((p_MG * keep_MG).sum(-1), (q_MG * keep_MG).sum(-1))


@dataclass(frozen=True, eq=False)
class RelaxedRule(ExactRule):
    """LANTERN's relaxed test against ``p̃`` (x's absorbed latent neighbours' mass moved onto x)."""

    neighbours_Vk: torch.Tensor | None = None
    delta: float = 0.1
    lossless: ClassVar[bool] = False

    def _absorbed(self, p_MV: torch.Tensor, draft_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x's neighbours [M, k], which of them are absorbed (a prefix), and the absorbed mass [M]."""
        assert self.neighbours_Vk is not None
        nb_Mk = self.neighbours_Vk[draft_M].long()
        p_Mk = p_MV.gather(-1, nb_Mk)
        budget = self.delta if self.delta <= 1 else (self.delta - 1) * _at(p_MV, draft_M)[:, None]
        absorbed_Mk = p_Mk.cumsum(dim=-1) <= budget  # p >= 0: the cumulative sum rises, so this is a prefix
        return nb_Mk, absorbed_Mk, (p_Mk * absorbed_Mk).sum(dim=-1)

    def accept_prob(self, p_MV: torch.Tensor, q_MV: torch.Tensor, draft_M: torch.Tensor) -> torch.Tensor:
        _, _, mass_M = self._absorbed(p_MV, draft_M)
        return _ratio(_at(p_MV, draft_M) + mass_M, _at(q_MV, draft_M))

    def residual(self, p_MV: torch.Tensor, q_MV: torch.Tensor, draft_M: torch.Tensor) -> torch.Tensor:
        nb_Mk, absorbed_Mk, mass_M = self._absorbed(p_MV, draft_M)
        relaxed_MV = p_MV.scatter(-1, nb_Mk, p_MV.gather(-1, nb_Mk).masked_fill(absorbed_Mk, 0.0))
        relaxed_MV.scatter_add_(-1, draft_M[:, None], mass_M[:, None])
        return (relaxed_MV - q_MV).clamp_min(0)


# ---- latent neighbours (LANTERN), cached per model ---------------------------------------------------------------
_NEIGHBOURS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int, str], tuple[torch.Tensor, int, torch.Tensor]]]
_NEIGHBOURS = weakref.WeakKeyDictionary()


def nearest_codes(points_VD: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Each code's ``k`` nearest other codes by Euclidean distance, nearest first: [V, k] int32. Computed in row
    chunks (``|a|² + |b|² - 2ab``), never as a full V x V matrix (16384² floats would be 1 GiB)."""
    x = points_VD.detach().float()
    V = x.shape[0]
    k = min(k, V - 1)
    sq = x.square().sum(dim=-1)
    out = []
    for s in range(0, V, chunk):
        e = min(V, s + chunk)
        d2 = sq[s:e, None] + sq[None] - 2 * x[s:e] @ x.T
        d2[torch.arange(e - s, device=x.device), torch.arange(s, e, device=x.device)] = torch.inf  # not itself
        out.append(d2.topk(k, dim=-1, largest=False).indices.int())
    return torch.cat(out)


def latent_neighbours(model: nn.Module, source_VD: torch.Tensor, k: int) -> torch.Tensor:
    """``nearest_codes(source, k)``, computed once per (model, source tensor, k) and reused while the tensor is not
    modified in place (its version counter)."""
    per_model = _NEIGHBOURS.setdefault(model, {})
    key = (id(source_VD), k, str(source_VD.device))
    hit = per_model.get(key)
    if hit is not None and hit[0] is source_VD and hit[1] == source_VD._version:
        return hit[2]
    table = nearest_codes(source_VD, k)
    per_model[key] = (source_VD, source_VD._version, table)
    return table


# ---- configs, registry, spec strings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeculativeConfig:
    """A speculative-decoding method: registry ``name``, ``window`` (guesses per pass), ``init`` (first guesses)."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    window: int = 16
    init: str = "random"
    coupled: bool = False  # MC-SJD's coupled redraws (``mcsjd`` is ``sjd`` with this on)
    # SJD-PAC's proactive drafting: `tree` guesses per parent at the window's first `depth` slots (1: a chain).
    tree: int = 1
    depth: int = 2
    # ZipAR's decoding order (``zipar:window=N+...``): a grid row starts once the row above has fixed N tokens.
    zipar: int = 0

    def __post_init__(self) -> None:
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise InvalidInputError(f"{self.name}: window must be an int >= 1 (guesses per pass), got {w!r}")
        if self.init not in DRAFT_INITS:
            raise InvalidInputError(f"{self.name}: init must be one of {', '.join(DRAFT_INITS)}, got {self.init!r}")
        t, d = self.tree, self.depth
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 8 or not isinstance(d, int) or d < 1:
            raise InvalidInputError(f"{self.name}: tree must be an int in 1..8 and depth >= 1, got {self.spec()}")
        if t**d > 512:
            raise InvalidInputError(
                f"{self.name}: a tree of {t}^{d} leaves is too big (at most 512), got {self.spec()}"
            )
        z = self.zipar
        if isinstance(z, bool) or not isinstance(z, int) or z < 0:
            raise InvalidInputError(
                f"zipar: window must be an int >= 1 (tokens of a row before the next starts), got {z!r}"
            )

    def rule(self, model: LlamaGen, codebook_VD: torch.Tensor | None = None) -> AcceptRule:
        """The acceptance rule for ``model`` (``codebook_VD``: latent vectors of the codes, where the rule uses
        any; default the model's token embeddings)."""
        raise NotImplementedError

    def sample(
        self,
        model: LlamaGen,
        labels_B: torch.Tensor,
        params: RasterParams,
        generators: Generators | None = None,
        on_step: StepCallback | None = None,
        codebook_VD: torch.Tensor | None = None,
    ) -> RasterResult:
        """``sample_speculative`` with this method's rule and window."""
        return sample_speculative(
            model, labels_B, params, self.rule(model, codebook_VD), self.window, generators, on_step, self.zipar
        )

    def spec(self) -> str:
        """The spec string that rebuilds this config (defaults left out); ZipAR's order as its own part:
        ``zipar:window=4+sjd``, or ``zipar:window=4`` alone for plain sampling in that order."""
        if not self.zipar:
            return spec_string(self.name, self)
        rest = dataclasses.replace(self, zipar=0)
        order = spec_string(ZIPAR, ZipAR(window=self.zipar))
        return order if rest == ZIPAR_PLAIN else f"{order}+{rest.spec()}"


ZIPAR = "zipar"


@dataclass(frozen=True)
class ZipAR:
    """ZipAR's decoding order as a spec part (He et al., "ZipAR: Accelerating Auto-regressive Image Generation
    through Spatial Locality", arXiv 2412.04062; code ThisisBillhe/ZipAR): ``window`` tokens of a grid row must be
    fixed before the row below starts; then every started row advances in the same forward passes, each as its
    own lane with the acceptance rule's window. Not a method of its own: ``zipar:window=N`` alone is plain
    sampling in that order (a one-guess window, kept or redrawn from the target: sampling in distribution), and
    ``zipar:window=N+sjd`` gives each row SJD's window. The official default is 8 on LlamaGen's 24x24 grid."""

    window: int = 8


SPECULATIVE: dict[str, type[SpeculativeConfig]] = {}


def register(cls: type[SpeculativeConfig]) -> type[SpeculativeConfig]:
    assert cls.name and cls.name not in SPECULATIVE, f"bad or duplicate method name {cls.name!r}"
    SPECULATIVE[cls.name] = cls
    return cls


def _embeddings(model: LlamaGen, codebook_VD: torch.Tensor | None) -> torch.Tensor:
    """The codes' vectors: ``codebook_VD`` if given, else the token embedding (the tensor itself, not a detached
    view: the neighbour cache recognises it by identity)."""
    src = model.tok_embeddings.weight if codebook_VD is None else codebook_VD
    if src.ndim != 2 or src.shape[0] != model.vocab_size:
        raise InvalidInputError(f"codebook must be [{model.vocab_size}, D] (one row per code), got {tuple(src.shape)}")
    return src


@register
@dataclass(frozen=True)
class SJD(SpeculativeConfig):
    """Speculative Jacobi decoding: lossless."""

    name: ClassVar[str] = "sjd"
    lossless: ClassVar[bool] = True

    def rule(self, model: LlamaGen, codebook_VD: torch.Tensor | None = None) -> AcceptRule:
        return ExactRule(draft_init=self.init, coupled=self.coupled, tree=self.tree, depth=self.depth)


# ``zipar:window=N`` alone: one guess per pass and lane, tested against its target — sampling in distribution.
ZIPAR_PLAIN = SJD(window=1)


@register
@dataclass(frozen=True)
class MCSJD(SJD):
    """SJD with coupled redraws (MC-SJD, arXiv 2510.24211): after a refusal, each later guess is redrawn from its new
    target by maximal coupling with its previous guess, so guesses settle instead of being redrawn at random.
    Lossless, as SJD."""

    name: ClassVar[str] = "mcsjd"
    coupled: bool = True


@register
@dataclass(frozen=True)
class SJDPAC(SJD):
    """SJD-PAC (arXiv 2603.18599): MC-SJD's coupled redraws (the paper's adaptive continuation) plus proactive
    drafting — ``tree`` guesses per parent at the window's first ``depth`` slots, verified by recursive rejection
    sampling. The paper's K = 4 and depth 3 counting the root (2 slots here). Lossless, as SJD."""

    name: ClassVar[str] = "sjd-pac"
    coupled: bool = True
    tree: int = 4


def group_radius(points_VD: torch.Tensor, k: int, sample: int = 512) -> float:
    """The median squared distance from a code to its ``k``-th nearest other code: within it a typical code has
    ``k`` neighbours, whatever the table's scale or dimension. Estimated on at most ``sample`` codes (every n-th, so
    deterministic) against all of them."""
    x = points_VD.detach().float()
    V = x.shape[0]
    k = max(1, min(k, V - 1))
    rows = torch.arange(0, V, max(1, -(-V // sample)), device=x.device)
    d2 = x[rows].square().sum(-1, keepdim=True) + x.square().sum(-1) - 2 * x[rows] @ x.T
    d2[torch.arange(len(rows), device=x.device), rows] = torch.inf  # not itself
    return float(d2.kthvalue(k, dim=-1).values.clamp_min(0).median())


@register
@dataclass(frozen=True)
class GSD(SpeculativeConfig):
    """Grouped speculative decoding: ``size`` (rank half-width), ``pdiff``, ``dist`` (squared embedding distance;
    default: ``group_radius`` of the embeddings with ``k = 2·size``, so that the distance test has as many codes
    to choose from as the rank window)."""

    name: ClassVar[str] = "gsd"
    size: int = 7
    pdiff: float = 0.15
    dist: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size < 1 or not self.pdiff > 0 or not (self.dist is None or self.dist > 0):
            raise InvalidInputError(f"gsd: size must be >= 1 and pdiff, dist > 0, got {self.spec()}")

    def rule(self, model: LlamaGen, codebook_VD: torch.Tensor | None = None) -> AcceptRule:
        emb = _embeddings(model, codebook_VD).detach().to(model.output.weight.device)
        dist = group_radius(emb, 2 * self.size) if self.dist is None else float(self.dist)
        return GroupRule(
            self.init, emb, self.size, float(self.pdiff), dist, coupled=self.coupled, tree=self.tree, depth=self.depth
        )


@register
@dataclass(frozen=True)
class Lantern(SpeculativeConfig):
    """LANTERN's relaxed acceptance: ``delta`` (total-variation budget), ``k`` (latent neighbours considered)."""

    name: ClassVar[str] = "lantern"
    delta: float = 0.1
    k: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1 or not self.delta >= 0:
            raise InvalidInputError(f"lantern: k must be >= 1 and delta >= 0, got {self.spec()}")

    def rule(self, model: LlamaGen, codebook_VD: torch.Tensor | None = None) -> AcceptRule:
        table = latent_neighbours(model, _embeddings(model, codebook_VD), self.k)
        return RelaxedRule(
            self.init,
            table.to(model.output.weight.device),
            float(self.delta),
            coupled=self.coupled,
            tree=self.tree,
            depth=self.depth,
        )


# Named settings, as the VAR presets: what a server's ``quality=medium`` / ``low`` runs on a raster model. The
# choice and its measured fidelity on the bundled raster demo: benchmarks/RESULTS.md (bench_spec, "SJD-PAC and
# ZipAR"). balanced: MC-SJD with a 32-guess window, lossless, the fastest wall clock measured on a CPU (4.8x fewer
# passes than exact, 2.1-2.4x the images/s at batch 1). fast: SJD-PAC at the same window, also lossless and the
# fewest passes measured (5.2x); no lossy rule measured beat either (GSD 3.4x; ZipAR lost 17+ points).
PRESETS: dict[str, str] = {"balanced": "mcsjd:window=32", "fast": "sjd-pac:window=32"}


def parse_speculative(spec: str | SpeculativeConfig) -> SpeculativeConfig:
    """``"lantern:delta=0.1,k=100"`` -> ``Lantern(delta=0.1, k=100)``; a preset name (``PRESETS``) -> its method;
    a config passes through. One-line errors naming the bad method or option and the allowed ones."""
    if isinstance(spec, SpeculativeConfig):
        return spec
    if not isinstance(spec, str):
        raise InvalidInputError(f"speculative must be a spec string or a SpeculativeConfig, got {type(spec).__name__}")
    parts = [p.strip() for p in spec.split("+")]
    order = [p for p in parts if p.partition(":")[0].strip().lower() == ZIPAR]
    if order:
        if len(order) > 1 or len(parts) > 2:
            raise InvalidInputError(
                f"bad speculative spec {spec!r}: at most one zipar part and one method, as zipar:window=4+sjd"
            )
        z = ZipAR(**parse_options(ZIPAR, ZipAR, order[0].partition(":")[2]))
        if isinstance(z.window, bool) or z.window < 1:
            raise InvalidInputError(
                f"zipar: window must be an int >= 1 (tokens of a row before the next starts), got {z.window!r}"
            )
        rest_parts = [p for p in parts if p is not order[0]]
        base = parse_speculative(rest_parts[0]) if rest_parts else ZIPAR_PLAIN
        if base.zipar:
            raise InvalidInputError(f"bad speculative spec {spec!r}: zipar is given twice")
        return dataclasses.replace(base, zipar=z.window)
    if len(parts) > 1:
        raise InvalidInputError(
            f"bad speculative spec {spec!r}: one method, optionally with a zipar order (zipar:window=4+sjd)"
        )
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name in PRESETS and not rest.strip():
        return parse_speculative(PRESETS[name])
    cls = SPECULATIVE.get(name)
    if cls is None:
        raise InvalidInputError(
            f"unknown speculative method {name!r}; available: {', '.join(sorted(SPECULATIVE))} "
            f"(presets: {', '.join(PRESETS)})"
        )
    return cls(**parse_options(name, cls, rest))


def describe(spec: str | SpeculativeConfig | None, presets: Mapping[str, str] | None = None) -> Resolved:
    """What a speculative setting runs (``nextscale.accel.describe``'s raster counterpart): the spec string, and for
    a preset name whether it is the model's tuned one (``presets``, its ``speculative_presets``) or the built-in one.
    ``None`` and ``"exact"`` are plain decoding."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "exact"):
        return Resolved("exact", (), DEFAULT if spec is None else BUILT_IN)
    if isinstance(spec, str):
        key = spec.strip().lower()
        if presets and key in presets:
            return Resolved(key, (parse_speculative(presets[key]).spec(),), TUNED)
        if key in PRESETS:
            return Resolved(key, (parse_speculative(PRESETS[key]).spec(),), BUILT_IN)
    cfg = parse_speculative(spec)
    return Resolved(spec.strip() if isinstance(spec, str) else cfg.spec(), (cfg.spec(),), GIVEN)


__all__ = [
    "GSD",
    "PRESETS",
    "SJD",
    "SJDPAC",
    "SPECULATIVE",
    "ExactRule",
    "GroupRule",
    "Lantern",
    "RelaxedRule",
    "SpeculativeConfig",
    "describe",
    "group_radius",
    "latent_neighbours",
    "nearest_codes",
    "parse_speculative",
]
