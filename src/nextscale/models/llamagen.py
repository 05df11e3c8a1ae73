"""The LlamaGen class-conditional GPT (Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable
Image Generation", 2024), weight-compatible with the official ``c2i_*.pt`` release files.

A Llama decoder over a raster-order grid of VQ tokens: position 0 holds the class embedding, image token k
(row ``k // grid``, column ``k % grid``) sits at position ``k + 1`` and the output at position p predicts image
token p. Pre-norm blocks (RMSNorm, 2-D RoPE attention, SwiGLU), no biases, no absolute position embedding.

Glossary: ``B`` images, ``R`` rows (2B with classifier-free guidance: conditional rows first, then the null-class
rows), ``L`` image tokens (grid²), ``l`` positions in this call, ``C`` width (dim), ``H`` query heads, ``Hkv``
key/value heads (GQA), ``c`` head dim, ``V`` codebook size, ``P`` positions of the RoPE table (1 + L).

The model holds no per-request state. Two entry points share every block:
* ``forward(idx_BL, label_B)`` — teacher forcing, one causal pass over [class token, image tokens] (the official
  ``model(idx, labels)`` call in eval mode, returning all 1 + L rows);
* ``forward_tokens(x_RlC, layout)`` — one call over ``l >= 1`` consecutive positions of every row. With
  ``CachedCausal(kv, start)`` the new keys/values go into a KV store the caller owns and the queries see every
  cached position plus the new ones causally (one token per step for sampling, ``l > 1`` to verify a window of
  guessed tokens or to prefill).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.errors import ConfigError
from nextscale.models.attention import KVGeometry, KVStore, check_class_labels


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is >= ``n`` (official ``find_multiple``)."""
    return n if n % k == 0 else n + k - (n % k)


def official_ffn_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU width of the official ``FeedForward``: ``find_multiple(int(2 * 4 * dim / 3) [* mult], multiple_of)``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


# (n_layer, n_head, dim) of the official ``GPT_models`` (autoregressive/models/gpt.py). The c2i releases are
# B, L, XL, XXL and 3B; note GPT-3B's head dim is 100, not 64.
GPT_SHAPES: dict[str, tuple[int, int, int]] = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-3B": (24, 32, 3200),
}


@dataclass(frozen=True)
class LlamaGenConfig:
    """The c2i GPT. Defaults are GPT-B at 256 px (VQ-16: a 16x16 grid of tokens from a 16384-code book).

    ``ffn_hidden=None`` means the official SwiGLU width (``official_ffn_hidden``); a loader sets it from the
    file. ``image_size // downsample`` is the token grid side; the 2-D RoPE table depends on it, and nothing in
    a checkpoint does, so it must come from outside (file name, argument).
    """

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    ffn_hidden: int | None = None
    vocab_size: int = 16384
    num_classes: int = 1000
    image_size: int = 256
    downsample: int = 16
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", official_ffn_hidden(self.dim))
        if min(self.dim, self.n_layer, self.n_head, self.vocab_size, self.num_classes) < 1:
            raise ConfigError(f"dim, n_layer, n_head, vocab_size and num_classes must be >= 1, got {self}")
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            # 2-D RoPE gives a quarter of the head dims to rows, a quarter to columns, each as (cos, sin) pairs.
            raise ConfigError(f"the head dim (dim / n_head = {self.head_dim}) must be a multiple of 4 for 2-D RoPE")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise ConfigError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.image_size % self.downsample or self.image_size < self.downsample:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of the downsample {self.downsample}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def seq_len(self) -> int:
        """Image tokens per sample (grid²)."""
        return self.grid_size**2

    @property
    def num_positions(self) -> int:
        """Sequence positions: the class token, then every image token."""
        return 1 + self.seq_len

    @property
    def null_class(self) -> int:
        """Row of the class table used by the unconditional branch of classifier-free guidance."""
        return self.num_classes

    @classmethod
    def official(cls, name: str, image_size: int = 256, **overrides: Any) -> LlamaGenConfig:
        """The shape ``GPT_models[name]`` builds in ``sample_c2i.py`` (e.g. ``"GPT-L"``, 256 or 384 px)."""
        if name not in GPT_SHAPES:
            raise ConfigError(f"unknown LlamaGen model {name!r}; known: {', '.join(GPT_SHAPES)}")
        n_layer, n_head, dim = GPT_SHAPES[name]
        return cls(**{"dim": dim, "n_layer": n_layer, "n_head": n_head, "image_size": image_size, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- 2-D rotary position embedding ------------------------------------------------------------------------------
def rope_table_2d(grid: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(cos, sin) per position and rotation pair, [1 + grid², head_dim // 2, 2], float32, on the CPU.

    As the official ``precompute_freqs_cis_2d``: ``head_dim / 4`` frequencies ``base^(-4m / head_dim)``; pair j
    of image token (r, c) turns by ``r * f_j`` for the first half of the pairs and by ``c * f_(j - d/4)`` for the
    second. Row 0 (the class token) is cos = sin = 0, which ZEROES the class token's q and k (it is not an
    identity rotation): its score against every query is 0 and only its value contributes.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half))
    ang = torch.outer(torch.arange(grid, device="cpu"), freqs)  # [grid, d/4], float32 products like the official
    ang_grid = torch.cat((ang[:, None, :].expand(-1, grid, -1), ang[None, :, :].expand(grid, -1, -1)), dim=-1)
    cs = torch.stack((torch.cos(ang_grid), torch.sin(ang_grid)), dim=-1).flatten(0, 1)
    return torch.cat((torch.zeros(1, half, 2), cs))


def apply_rope(x_RlHc: torch.Tensor, cs_lc2: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (elements 2j, 2j+1; not rotate-half) in float32, back in x's dtype."""
    xs = x_RlHc.float().reshape(*x_RlHc.shape[:-1], -1, 2)
    cs = cs_lc2.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        (xs[..., 0] * cs[..., 0] - xs[..., 1] * cs[..., 1], xs[..., 1] * cs[..., 0] + xs[..., 0] * cs[..., 1]), dim=-1
    )
    return out.flatten(3).type_as(x_RlHc)


def rotate_pairs(x_RHlc: torch.Tensor, cs_Rlc2: torch.Tensor) -> torch.Tensor:
    """Turn the interleaved pairs of q or k [R, H, l, c] by each row's own (cos, sin) [R, l, c/2, 2], in float32:
    ``apply_rope`` with a table per row (callers that place the rows of one call at different positions)."""
    R, H, l, c = x_RHlc.shape
    xs = x_RHlc.float().reshape(R, H, l, c // 2, 2)
    cos, sin = cs_Rlc2[:, None, :, :, 0], cs_Rlc2[:, None, :, :, 1]
    out = torch.stack((xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin), dim=-1)
    return out.flatten(3).type_as(x_RHlc)


# ---- how a call's tokens attend -------------------------------------------------------------------------------
class RasterLayout(Protocol):
    """Which positions a ``forward_tokens`` call covers and which keys each query sees.

    ``start`` is the sequence position of the call's first token (0 = the class token); the call covers
    ``start .. start + l - 1`` of every row. ``None``: the layout places every query itself (it turns q and k in
    ``attend``), and the model's own rotation is the identity."""

    @property
    def start(self) -> int | None: ...

    def attend(self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor) -> torch.Tensor:
        """Attention output [R, H, l, c]; ``k``/``v`` may have fewer heads (GQA)."""
        ...


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor:
    """The model's attention over q [R, H, l, c] and k/v [R, Hkv, T, c]: GQA expansion, then scaled dot-product
    attention with its default scale. Layouts that store keys their own way call it too, to attend as the model
    does."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA: key/value head j serves query heads j*groups .. (the official repeat_interleave)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # Default scale 1/sqrt(c), as the official call (passing it explicitly could round differently).
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class FullCausal:
    """Teacher forcing: every row holds positions 0 .. l-1; plain causal attention, nothing cached."""

    start = 0

    def attend(self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor) -> torch.Tensor:
        return sdpa(q_RHlc, k_RHlc, v_RHlc, causal=True)


class CachedCausal:
    """``l >= 1`` new positions per row, starting at ``start``, against a KV store the caller owns.

    The new keys/values are appended to ``kv`` (which must hold exactly ``start`` positions); query i sees the
    cached positions and new positions 0..i. ``l = 1`` is one sampling step (no mask needed); ``l > 1`` verifies
    a window of guessed tokens in one call (speculative decoding) or prefills the class token with known tokens.
    The official code instead attends over its whole static cache (264 slots) with a boolean mask; the visible
    keys and the result are the same.
    """

    def __init__(self, kv: KVStore, start: int):
        self.kv, self.start = kv, start
        self._mask: torch.Tensor | None = None

    def attend(self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor) -> torch.Tensor:
        k_RHTc, v_RHTc = self.kv.write(layer, k_RHlc, v_RHlc)
        l, T = q_RHlc.shape[2], k_RHTc.shape[2]
        if self.start + l != T:
            raise RuntimeError(f"the KV cache held {T - l} positions in layer {layer}, expected {self.start}")
        if l == 1:
            return sdpa(q_RHlc, k_RHTc, v_RHTc)
        if self.start == 0:
            return sdpa(q_RHlc, k_RHTc, v_RHTc, causal=True)
        if self._mask is None:
            key_pos = torch.arange(T, device=q_RHlc.device)
            self._mask = key_pos[None, :] <= (self.start + torch.arange(l, device=q_RHlc.device))[:, None]
        return sdpa(q_RHlc, k_RHTc, v_RHTc, mask=self._mask)


# ---- modules (names as in the official state dict) -----------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Official order: normalise in float32, cast back, then scale by the weight in the model's dtype.
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """Fused ``wqkv`` (rows [q | k | v], heads as contiguous chunks), RoPE on q and k, output ``wo``."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.dim, self.n_head, self.n_kv_head, self.head_dim = cfg.dim, cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_RlC: torch.Tensor, cs_lc2: torch.Tensor, layer: int, layout: RasterLayout) -> torch.Tensor:
        R, l, _ = x_RlC.shape
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x_RlC).split([self.dim, kv_size, kv_size], dim=-1)
        q_RlHc = apply_rope(q.view(R, l, self.n_head, self.head_dim), cs_lc2)
        k_RlHc = apply_rope(k.view(R, l, self.n_kv_head, self.head_dim), cs_lc2)
        v_RlHc = v.view(R, l, self.n_kv_head, self.head_dim)
        o_RHlc = layout.attend(layer, q_RlHc.transpose(1, 2), k_RlHc.transpose(1, 2), v_RlHc.transpose(1, 2))
        return self.wo(o_RHlc.transpose(1, 2).contiguous().view(R, l, self.dim))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden or official_ffn_hidden(cfg.dim))
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x_RlC: torch.Tensor, cs_lc2: torch.Tensor, layer: int, layout: RasterLayout) -> torch.Tensor:
        h = x_RlC + self.attention(self.attention_norm(x_RlC), cs_lc2, layer, layout)
        return h + self.feed_forward(self.ffn_norm(h))


class ClassEmbedding(nn.Module):
    """The official ``LabelEmbedder``: num_classes + 1 rows, the last one being the null class.

    Unlike the official module it never drops labels by itself (the official one does in train mode, from the
    global RNG): condition dropout is the trainer's job, so forward passes are deterministic."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, label_R: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(label_R).unsqueeze(1)  # [R, 1, C]: one class token per row


class LlamaGen(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes, self.vocab_size, self.n_layer = cfg.num_classes, cfg.vocab_size, cfg.n_layer
        self.cls_embedding = ClassEmbedding(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # The RoPE table is derived from the config, kept in float32 whatever the model's dtype (the official
        # keeps it as a plain float32 attribute too), one copy per device. Not a buffer: not in the state dict,
        # and ``model.to(bfloat16)`` must not round it.
        self._rope: dict[torch.device, torch.Tensor] = {}

    # ---- embeddings ---------------------------------------------------------------------------------------
    def check_labels(self, label_R: torch.Tensor) -> None:
        check_class_labels(label_R, self.num_classes)

    def embed_classes(self, label_R: torch.Tensor) -> torch.Tensor:
        """The class token of each row, [R, 1, C] (input at position 0)."""
        return self.cls_embedding(label_R)

    def embed_tokens(self, idx_Rl: torch.Tensor) -> torch.Tensor:
        """Image tokens -> inputs [R, l, C] (image token k is the input at position k + 1)."""
        return self.tok_embeddings(idx_Rl)

    def rope(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """(cos, sin) of positions ``start .. start+length-1``, [length, c/2, 2] float32."""
        if start < 0 or start + length > self.cfg.num_positions:
            raise ValueError(
                f"positions {start}..{start + length - 1} outside the {self.cfg.num_positions} positions of a "
                f"{self.cfg.grid_size}x{self.cfg.grid_size} grid"
            )
        table = self._rope.get(device)
        if table is None:
            # Always computed on the CPU, then moved: the same table on every device.
            cfg = self.cfg
            table = rope_table_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base).to(device)
            self._rope[device] = table
        return table[start : start + length]

    def kv_geometry(self) -> KVGeometry:
        """One row of a full KV cache: every layer, every position (the class token and L - 1 fed-back tokens: L),
        key/value heads only (GQA-sized), in the model's dtype."""
        cfg, w = self.cfg, self.output.weight
        return KVGeometry(cfg.n_layer, cfg.kv_heads, cfg.head_dim, cfg.seq_len, w.dtype, w.device)

    def kv_row_bytes(self) -> int:
        return self.kv_geometry().row_bytes

    # ---- transformer --------------------------------------------------------------------------------------
    def forward_tokens(self, x_RlC: torch.Tensor, layout: RasterLayout) -> torch.Tensor:
        """All blocks, the final norm and the head over the positions ``layout`` covers; logits [R, l, V] float32."""
        l = x_RlC.shape[1]
        if layout.start is None:  # cos 1, sin 0: x * 1 - y * 0 == x, exactly
            cs_lc2 = torch.stack((torch.ones(l, self.cfg.head_dim // 2), torch.zeros(l, self.cfg.head_dim // 2)), -1)
            cs_lc2 = cs_lc2.to(x_RlC.device)
        else:
            cs_lc2 = self.rope(layout.start, l, x_RlC.device)
        for i, layer in enumerate(self.layers):
            x_RlC = layer(x_RlC, cs_lc2, i, layout)
        return self.output(self.norm(x_RlC)).float()

    def forward(self, idx_BL: torch.Tensor, label_B: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits [B, 1 + L', V] for [class token, L' image tokens] in one causal pass.

        Row j predicts image token j; the last row predicts nothing (returned because the official eval call
        returns it; its train-mode call drops the last input token instead). ``L'`` may be shorter than the grid.
        """
        x_BlC = torch.cat((self.embed_classes(label_B), self.embed_tokens(idx_BL)), dim=1)
        return self.forward_tokens(x_BlC, FullCausal())
