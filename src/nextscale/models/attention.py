"""How the tokens of one transformer call are laid out, and which keys each query sees.

The VAR blocks never own per-request state. Each call receives a *layout* object that knows
(1) how rows map to tokens, so per-row AdaLN vectors can be broadcast (``modulate``/``gate``), and
(2) how to attend: over the whole sequence with the block-causal mask (teacher forcing), or over an explicit
KV cache that the caller owns (sampling one scale at a time). The serving engine adds a ragged layout that
packs several requests at different scales into one call (see ``engine/var/runner.py``).

Shapes: ``R`` rows (images x CFG branches), ``l`` tokens per row in this call, ``H`` heads, ``c`` head dim,
``C = H*c``. Dense layouts carry tokens as [R, l, C] and q/k/v as [R, l, H, c].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from nextscale.errors import InvalidInputError


@dataclass(frozen=True)
class KVGeometry:
    """What one row of a model's full KV cache holds (one guidance branch of one image): keys and values of
    ``layers`` layers, ``heads`` key/value heads of ``head_dim``, ``max_len`` positions, in ``dtype`` on ``device``.
    Each model defines it once (``kv_geometry()``); caches, pools and batch sizing read it from there."""

    layers: int
    heads: int
    head_dim: int
    max_len: int
    dtype: torch.dtype
    device: torch.device

    @property
    def row_bytes(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim * self.max_len * self.dtype.itemsize


class Layout(Protocol):
    def modulate(self, h: torch.Tensor, scale_RC: torch.Tensor, shift_RC: torch.Tensor) -> torch.Tensor:
        """``h * (1 + scale) + shift`` with each row's vectors applied to that row's tokens."""
        ...

    def gate(self, y: torch.Tensor, gamma_RC: torch.Tensor) -> torch.Tensor:
        """``y * gamma`` row-wise (may work in place on ``y``)."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output for the queries, in the same token layout as ``q`` ([..., H, c])."""
        ...


class KVStore(Protocol):
    def write(self, layer: int, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys/values for ``layer``; return all keys/values visible to its queries."""
        ...


class KVAttend(Protocol):
    def attend(
        self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Store this call's keys/values as the cache's policy says and attend over what the queries may see
        (a compressed cache decides what it keeps after seeing the queries)."""
        ...


class DenseRows:
    """Rows of equal length: tokens [R, l, C]; per-row vectors broadcast over l."""

    def modulate(self, h: torch.Tensor, scale_RC: torch.Tensor, shift_RC: torch.Tensor) -> torch.Tensor:
        # Same op order as the official AdaLN (``ln(x).mul(scale.add(1)).add_(shift)``).
        return h.mul(scale_RC.unsqueeze(1).add(1)).add_(shift_RC.unsqueeze(1))

    def gate(self, y: torch.Tensor, gamma_RC: torch.Tensor) -> torch.Tensor:
        return y.mul_(gamma_RC.unsqueeze(1))

    def kept(self, idx_Rk: torch.Tensor) -> DenseRows:
        """This layout for the tokens ``idx_Rk`` [R, k] of each row (token pruning): the same object where the
        layout holds nothing per position (VAR adds its position embeddings to the input)."""
        return self


class FullSequence(DenseRows):
    """Teacher forcing: every row holds the whole (prefix of the) token pyramid; block-causal mask."""

    def __init__(self, attn_bias_11LL: torch.Tensor | None):
        self.attn_bias = attn_bias_11LL

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        bias = self.attn_bias
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        o_RHLc = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=scale
        )
        return o_RHLc.transpose(1, 2)


class CachedStep(DenseRows):
    """One scale of sampling: queries see the cached keys of all coarser scales plus their own scale.

    No mask is needed: within a scale attention is bidirectional, and the cache only holds coarser scales.
    """

    def __init__(self, kv: KVAttend):
        self.kv = kv

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return self.kv.attend(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale).transpose(1, 2)


class CachedPrefill(DenseRows):
    """Several scales in one call into an empty cache (a model taking over mid-generation recomputes the prefix,
    CoDe's refiner prefill): keys are written as in ``CachedStep``, queries see them through the block-causal mask
    ``bias_11TT`` of the positions they cover."""

    def __init__(self, kv: KVStore, bias_11TT: torch.Tensor):
        self.kv, self.bias = kv, bias_11TT

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_RHLc, v_RHLc = self.kv.write(layer, k.transpose(1, 2), v.transpose(1, 2))
        if k_RHLc.shape[2] != q.shape[1]:
            raise RuntimeError(f"prefill into a cache that already holds {k_RHLc.shape[2] - q.shape[1]} positions")
        bias = self.bias.to(q.dtype)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k_RHLc, v_RHLc, attn_mask=bias, scale=scale).transpose(
            1, 2
        )


def check_class_labels(label_R: torch.Tensor, num_classes: int) -> None:
    """Class-conditional models (VAR, LlamaGen c2i) embed labels 0..num_classes, the last one the null class of
    classifier-free guidance; anything else is one-line bad input, not an index error deep in an embedding."""
    bad = (label_R < 0) | (label_R > num_classes)
    if bool(bad.any()):
        raise InvalidInputError(
            f"class labels must be in [0, {num_classes}] ({num_classes} = null class), got {label_R[bad].tolist()}"
        )
