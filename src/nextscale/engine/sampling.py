"""Pure sampling functions: guidance mix, top-k / top-p masking, multinomial and gumbel draws.

Every random draw takes explicit generators — either ONE generator for the whole batch (the official
stream: ``torch.multinomial`` over all B*l rows at once) or one generator PER IMAGE, so that image i is the
same whatever batch it is generated in. Semantics follow the official ``sample_with_top_k_top_p_`` exactly:
masking is in place on the guided logits, top-k keeps ties at the threshold, top-p drops the ascending
cumulative mass ``<= 1 - top_p`` and always keeps the largest logit, and logits are never tempered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator]

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image ``index`` of a request with ``seed`` (splitmix64 of both).

    Unlike ``seed + index`` it does not make (seed=0, image 1) collide with (seed=1, image 0).
    """
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    for _ in range(2):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def image_generators(
    seed: int, count: int, device: torch.device | str = "cpu", start: int = 0, indices: Sequence[int] | None = None
) -> list[torch.Generator]:
    """One generator per image: images ``start .. start+count-1`` of a request seeded with ``seed``, or the
    images ``indices`` (a shard of a larger job) when given."""
    ids = range(start, start + count) if indices is None else indices
    return [torch.Generator(device=device).manual_seed(derive_seed(seed, int(i))) for i in ids]


def request_generators(
    seed: int,
    rng: str,
    count: int,
    device: torch.device | str = "cpu",
    start: int = 0,
    indices: Sequence[int] | None = None,
) -> Generators:
    """The generators of one request (the single place both the pipeline and the engine build them):
    ``rng="official"`` is one stream for the whole batch, as ``autoregressive_infer_cfg(g_seed=seed)``;
    otherwise one generator per image (``image_generators``)."""
    if rng == "official":
        return torch.Generator(device=device).manual_seed(seed)
    return image_generators(seed, count, device, start, indices)


# ---- classifier-free guidance rows -------------------------------------------------------------------------
# With guidance every image runs as two rows through the transformer: its conditional row, and an unconditional
# row (the null class). All conditional rows come first, then the unconditional ones, as in the official code.
CFG_BRANCHES = 2


def cfg_rows(num_images: int) -> int:
    """Transformer rows (and KV-cache rows) for ``num_images`` guided images."""
    return CFG_BRANCHES * num_images


def cfg_labels(labels_B: torch.Tensor, null_class: int) -> torch.Tensor:
    """Class labels of the rows: [B] -> [2B], the conditional labels, then the null class for every image."""
    return torch.cat((labels_B, torch.full_like(labels_B, null_class)))


def cfg_double(x_BlC: torch.Tensor) -> torch.Tensor:
    """The same input feeds both branches of every image: [B, l, C] -> [2B, l, C]."""
    return x_BlC.repeat(CFG_BRANCHES, 1, 1)


def cfg_weight(cfg: float, si: int, num_scales: int) -> float:
    """VAR's guidance ramp: ``t = cfg * si / (S-1)``, 0 at the first scale and ``cfg`` at the last."""
    return cfg * si / (num_scales - 1)


def cfg_mix(logits_RlV: torch.Tensor, t: float) -> torch.Tensor:
    """Rows [0:B] conditional, [B:2B] unconditional -> ``(1+t)*cond - t*uncond`` on logits, [B, l, V]."""
    B = logits_RlV.shape[0] // CFG_BRANCHES
    return (1 + t) * logits_RlV[:B] - t * logits_RlV[B:]


def mask_top_k_(logits_BlV: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k > 0:
        kth = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    return logits_BlV


def mask_top_p_(logits_BlV: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits_BlV.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return logits_BlV


def _per_image(generators: Sequence[torch.Generator], B: int) -> list[torch.Generator]:
    gens = list(generators)
    if len(gens) != B:
        raise ValueError(f"need one generator per image: got {len(gens)} for {B} images")
    return gens


def sample_tokens(logits_BlV: torch.Tensor, top_k: int, top_p: float, generators: Generators) -> torch.Tensor:
    """Mask ``logits_BlV`` in place (top-k, then top-p) and draw one token per position -> [B, l]."""
    B, l, V = logits_BlV.shape
    mask_top_p_(mask_top_k_(logits_BlV, top_k), top_p)
    probs = logits_BlV.softmax(dim=-1)
    if isinstance(generators, torch.Generator):
        return torch.multinomial(probs.view(-1, V), 1, replacement=True, generator=generators).view(B, l)
    gens = _per_image(generators, B)
    return torch.stack(
        [torch.multinomial(probs[i], 1, replacement=True, generator=g).view(l) for i, g in enumerate(gens)]
    )


def gumbel_soft_codes(
    logits_BlV: torch.Tensor, ratio: float, embedding_VC: torch.Tensor, generators: Generators
) -> torch.Tensor:
    """VAR's ``more_smooth`` mode: a gumbel-softmax mixture of codes instead of one code per position.

    Temperature ``max(0.27*(1 - 0.95*ratio), 0.005)`` on logits sharpened by ``1+ratio`` (MaskGIT-style);
    noise is ``-log(Exp(1))`` drawn after the multinomial. Returns [B, l, Cv].
    """
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    logits = logits_BlV.mul(1 + ratio)
    B = logits.shape[0]
    noise = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format)
    if isinstance(generators, torch.Generator):
        noise.exponential_(generator=generators)
    else:
        for i, g in enumerate(_per_image(generators, B)):
            noise[i].exponential_(generator=g)
    y_soft = ((logits - noise.log()) / tau).softmax(-1)
    return y_soft @ embedding_VC.unsqueeze(0)


def sample_inverse_cdf(weights_MV: torch.Tensor, u_M: torch.Tensor) -> torch.Tensor:
    """One draw per row from unnormalised weights, by the inverse CDF at uniform ``u`` (float64 sums, so one
    uniform per draw suffices and the draw never lands on a zero-weight code)."""
    cdf_MV = weights_MV.double().cumsum(dim=-1)
    x_M1 = (u_M.double() * cdf_MV[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf_MV, x_M1, right=True).squeeze(1).clamp_(max=weights_MV.shape[-1] - 1)
