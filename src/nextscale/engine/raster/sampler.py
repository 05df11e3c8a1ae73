"""Sampling raster-order (next-token) models: LlamaGen c2i, one image token per step.

Two loops over the same model and the same pure sampling functions:

* ``reference_sample_raster`` — the official ``generate()`` (autoregressive/models/generate.py) written for clarity:
  prefill the class token, then one token per step, a KV cache grown by concatenation, the null-class half
  computed at every step like the official code (also after ``cfg_interval``), draws by ``torch.multinomial``.
  It is the oracle the fast loop is tested against.
* ``sample_raster`` — the default loop: a preallocated KV cache (``engine.kv_cache.KVCache``), a preallocated
  token buffer, the null-class rows dropped once guidance has ended (they are never read again), and draws as
  ``argmax(probs / q)`` with exponential noise ``q`` — what ``torch.multinomial(probs, 1)`` computes (see
  ``draw_exponential_``), batched over the images and without its per-call validity checks (a device sync in older
  torch). In float32 it produces the reference's tokens exactly (tested), in both RNG modes.

Every step calls ``model.forward_tokens(x_RlC, CachedCausal(kv, start))``, which accepts ``l >= 1`` new tokens
per row with a causal mask among them (a window of known tokens, or a prefill, in one call).

Conventions that differ from VAR's (``engine/sampling.py``) and are therefore written here: guidance is
``uncond + (cond - uncond) * cfg_scale`` (official op order; VAR mixes ``(1+t)*cond - t*uncond`` with a ramp),
logits are divided by the temperature before filtering, ``top_k`` is clamped to the vocabulary, and top-p is
the HF filter the official code uses (see ``mask_top_p_raster_``). Shapes: ``B`` images, ``R`` rows (2B with
guidance, conditional rows first), ``L`` image tokens, ``V`` codebook size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nextscale.engine.kv_cache import ConcatKVCache, KVCache
from nextscale.engine.raster.params import RasterParams
from nextscale.engine.sampling import CFG_BRANCHES, Generators, cfg_labels, mask_top_k_, sample_tokens
from nextscale.errors import InvalidInputError
from nextscale.models.llamagen import CachedCausal, LlamaGen

# The official sampler never divides by less (``logits / max(temperature, 1e-5)``).
MIN_TEMPERATURE = 1e-5


@dataclass
class RasterStep:
    """What one step saw (for tests, previews and debugging): the raw logits of all rows, the logits handed to
    the sampler (guided or conditional, before temperature and filtering) and the tokens drawn."""

    t: int
    logits_RV: torch.Tensor
    logits_BV: torch.Tensor
    guided: bool
    idx_B: torch.Tensor


StepCallback = Callable[[RasterStep], None]


@dataclass
class RasterResult:
    """Tokens [B, L] in raster order (row, column) and counters: ``forward_passes`` (transformer calls per
    image), ``row_tokens`` (row-positions computed per image: 2 per guided step), ``guided_steps``."""

    tokens_BL: torch.Tensor
    stats: dict = field(default_factory=dict)


# ---- pure functions --------------------------------------------------------------------------------------------
def cfg_guide(logits_RV: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Rows [0:B] conditional, [B:2B] null class -> ``uncond + (cond - uncond) * cfg_scale`` [B, V].

    Not ``engine.sampling.cfg_mix``: VAR's ``(1+t)*cond - t*uncond`` is the same number only up to rounding, and
    the official LlamaGen order is this one."""
    cond, uncond = logits_RV.chunk(CFG_BRANCHES)
    return uncond + (cond - uncond) * cfg_scale


def mask_top_p_raster_(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """The official (HF ``top_k_top_p_filtering``) nucleus filter, in place: sort descending, drop every entry
    whose cumulative probability exceeds ``top_p`` except the first one that crosses it; the best always stays.

    Not ``engine.sampling.mask_top_p_``: VAR's filter drops the ascending mass ``<= 1 - top_p``, which differs at
    the boundary and in rounding, and is on at ``top_p > 0`` (here 1.0 means off)."""
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits_BV, dim=-1, descending=True)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits_BV.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    return logits_BV


def filter_logits_(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The official ``sample()`` up to the softmax, in place on ``logits_BV``: temperature, top-k, then top-p on
    the top-k result. Top-k keeps every logit >= the k-th largest (ties kept), k clamped to [1, V]."""
    logits_BV.div_(max(temperature, MIN_TEMPERATURE))
    if top_k > 0 or top_p < 1.0:
        if top_k > 0:
            mask_top_k_(logits_BV, min(top_k, logits_BV.shape[-1]))
        mask_top_p_raster_(logits_BV, top_p)
    return logits_BV


def draw_multinomial(filtered_BV: torch.Tensor, generators: Generators) -> torch.Tensor:
    """Softmax, then one ``torch.multinomial`` draw per image — the official draw — from one generator for the
    batch (one call over [B, V], the official stream) or one per image, [B]. (``sample_tokens`` with its own
    filters off does exactly this.)"""
    return sample_tokens(filtered_BV.unsqueeze(1), 0, 0.0, generators).view(-1)


def draw_exponential_(q_BV: torch.Tensor, generators: Generators) -> torch.Tensor:
    """Fill ``q_BV`` with Exp(1) noise as ``torch.multinomial(probs, 1)`` draws it: for one sample its
    device-generic fast path (ATen ``multinomial_out``) is ``argmax(probs / empty_like(probs).exponential_())``, so
    ``argmax(probs / q)`` is the same token from the same generator state. With one generator per image each row
    is drawn from its own generator (a row is contiguous: the same draws as a [1, V] tensor)."""
    if isinstance(generators, torch.Generator):
        return q_BV.exponential_(generator=generators)
    gens = list(generators)
    if len(gens) != q_BV.shape[0]:
        raise ValueError(f"need one generator per image: got {len(gens)} for {q_BV.shape[0]} images")
    for i, g in enumerate(gens):  # one call per image: each image's stream must advance by its own draws only
        q_BV[i].exponential_(generator=g)
    return q_BV


def check_request(model: LlamaGen, labels_B: torch.Tensor) -> None:
    """The labels of a request: a non-empty 1-D tensor of the model's classes (or its null class)."""
    if labels_B.ndim != 1 or labels_B.numel() == 0:
        raise InvalidInputError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels_B.shape)}")
    model.check_labels(labels_B)


def _generators(params: RasterParams, B: int, device: torch.device, generators: Generators | None) -> Generators:
    return params.generators(B, device) if generators is None else generators


# ---- the reference loop ------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_sample_raster(
    model: LlamaGen,
    labels_B: torch.Tensor,
    params: RasterParams,
    generators: Generators | None = None,
    on_step: StepCallback | None = None,
) -> RasterResult:
    """The official ``generate()``: one token per step, LlamaGen CFG incl. ``cfg_interval``, official sampling."""
    check_request(model, labels_B)
    B, L, device = labels_B.shape[0], model.cfg.seq_len, labels_B.device
    gens = _generators(params, B, device, generators)
    guided = params.guided
    rows_R = cfg_labels(labels_B, model.cfg.null_class) if guided else labels_B
    kv = ConcatKVCache(model.n_layer)
    x_RlC = model.embed_classes(rows_R)  # prefill: the class token alone at position 0
    tokens: list[torch.Tensor] = []
    for t in range(L):
        logits_RV = model.forward_tokens(x_RlC, CachedCausal(kv, start=t))[:, -1]
        use_cfg = params.guided_at(t)
        if guided:
            logits_BV = cfg_guide(logits_RV, params.cfg_scale) if use_cfg else logits_RV[:B]
        else:
            logits_BV = logits_RV
        filtered = filter_logits_(logits_BV.clone(), params.temperature, params.top_k, params.top_p)
        idx_B = draw_multinomial(filtered, gens)
        if on_step is not None:
            on_step(RasterStep(t, logits_RV, logits_BV, use_cfg, idx_B))
        tokens.append(idx_B)
        # Token t is fed back at position t + 1, the same token to both rows of its image.
        x_RlC = model.embed_tokens(torch.cat([idx_B] * (rows_R.shape[0] // B)).unsqueeze(1))
    rows = rows_R.shape[0] // B
    stats = {"forward_passes": L, "row_tokens": rows * L, "guided_steps": sum(params.guided_at(t) for t in range(L))}
    return RasterResult(torch.stack(tokens, dim=1), stats)


# ---- the fast loop ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_raster(
    model: LlamaGen,
    labels_B: torch.Tensor,
    params: RasterParams,
    generators: Generators | None = None,
    on_step: StepCallback | None = None,
) -> RasterResult:
    """Sample ``labels_B`` as the reference does, batched: tokens [B, L] and stats."""
    check_request(model, labels_B)
    B, L, V, device = labels_B.shape[0], model.cfg.seq_len, model.vocab_size, labels_B.device
    gens = _generators(params, B, device, generators)
    rows_R = cfg_labels(labels_B, model.cfg.null_class) if params.guided else labels_B
    R = rows_R.shape[0]
    kv = KVCache.for_model(model, R)
    tokens_BL = torch.empty(B, L, dtype=torch.long, device=device)
    q_BV = torch.empty(B, V, dtype=torch.float32, device=device)
    x_RlC = model.embed_classes(rows_R)
    row_tokens = 0
    try:
        for t in range(L):
            use_cfg = params.guided_at(t)
            logits_RV = model.forward_tokens(x_RlC, CachedCausal(kv, start=t))[:, -1]
            row_tokens += x_RlC.shape[0]
            logits_BV = cfg_guide(logits_RV, params.cfg_scale) if use_cfg else logits_RV[:B]
            # Filtered in place (nothing reads these logits again) unless a callback is to see them.
            work_BV = logits_BV.clone() if on_step is not None else logits_BV
            probs_BV = filter_logits_(work_BV, params.temperature, params.top_k, params.top_p).softmax(dim=-1)
            idx_B = torch.argmax(probs_BV.div_(draw_exponential_(q_BV, gens)), dim=-1)
            tokens_BL[:, t] = idx_B
            if on_step is not None:
                on_step(RasterStep(t, logits_RV, logits_BV, use_cfg, idx_B))
            if t + 1 < L:
                # Once guidance has ended the null rows are never read again: feed (and cache) the
                # conditional rows only. The cache's first B rows are the conditional ones.
                rows = R if params.guided_at(t + 1) else B
                x_RlC = model.embed_tokens(idx_B.repeat(rows // B).unsqueeze(1))
    finally:
        kv.free()
    stats = {
        "forward_passes": L,
        "row_tokens": row_tokens // B,
        "guided_steps": sum(params.guided_at(t) for t in range(L)),
    }
    return RasterResult(tokens_BL, stats)
