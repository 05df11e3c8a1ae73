"""The Infinity transformer (Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution
Image Synthesis", 2024), weight-compatible with the official ``infinity_*.pth`` files (FoundationVision/Infinity
at 4c27bbb; line numbers below are of that commit).

Glossary: ``B`` images, ``R`` rows (2B with guidance: conditional rows first, then the unconditional ones),
``l`` tokens of this call, ``L`` tokens over all scales, ``C`` width (= ``D``, the condition width), ``H`` heads,
``c`` head dim, ``Ct5`` text-encoder width, ``d`` bits per token, ``V = 2d`` logits per token (two per bit).

The text enters three ways, all computed once per request (``condition``): the attention-pooled prompt is the
first token and the AdaLN condition, and each block cross-attends to the prompt's projected tokens.

Two entry points share every block, as in ``var.py``:
* ``forward(text, x_BLd_wo_prefix, schedule)`` — teacher forcing over the whole pyramid with the block-causal mask
  (official ``Infinity.forward`` with ``cond_drop_rate=0``);
* ``forward_tokens(x, cond, layout)`` — one call over the tokens ``layout`` describes, typically one scale of
  sampling against an explicit KV cache owned by the caller. The model holds no per-request state.

The official inference path is reproduced op for op in float32 (``fused_norm=True``: the fused AdaLN path, which
keeps the scale offset of RoPE), including its bfloat16 round trip in cross-attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.config import check_float, check_int
from nextscale.errors import ConfigError, InvalidInputError
from nextscale.models.attention import DenseRows, KVAttend
from nextscale.models.infinity_scales import InfinitySchedule, _check_head_dim, rope2d_rows
from nextscale.models.layers import FFN, AdaLNBeforeHead, drop_path
from nextscale.models.text_encoder import TextFeatures
from nextscale.models.var import SharedAdaLin

NUM_LEVELS = 15  # lvl_embed rows (infinity.py:225); a schedule has at most 13 scales
TEACHER_FORCING_PAD = 128  # load_infinity's pad_to_multiplier: Infinity.forward pads the sequence to it


@dataclass(frozen=True)
class InfinityConfig:
    """An Infinity transformer. Defaults are ``infinity_2b`` with the d32 tokenizer (``RELEASES`` has the rest).

    ``bits`` is ``d_vae`` as the transformer sees it: the tokenizer's bits per latent pixel, times 4 with spatial
    patchify (8B: 14 bits, 2x2 latent pixels per token -> 56)."""

    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    text_channels: int = 2048
    bits: int = 32
    block_chunks: int = 8
    text_maxlen: int = 512
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "text_channels", "bits", "block_chunks", "text_maxlen"):
            check_int(name, getattr(self, name))
        check_float("mlp_ratio", self.mlp_ratio, 0.0, lo_open=True)
        check_float("norm_eps", self.norm_eps, 0.0, lo_open=True)
        check_float("drop_path_rate", self.drop_path_rate, 0.0, 1.0, hi_open=True)
        C, H = self.embed_dim, self.num_heads
        if C % H:
            raise ConfigError(f"embed_dim {C} is not divisible by num_heads {H}")
        _check_head_dim(C // H)
        if self.mlp_hidden <= 0:
            raise ConfigError(
                f"the FFN width round(embed_dim*mlp_ratio/256)*256 is 0 for embed_dim={C}, mlp_ratio={self.mlp_ratio}"
            )
        if self.depth % self.block_chunks:
            raise ConfigError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        hd = self.pool_head_dim
        if self.text_channels % hd:
            raise ConfigError(
                f"text_channels must be a multiple of {hd} (the text pool's head dim for embed_dim={C}), "
                f"got {self.text_channels}"
            )
        if C % self.pool_heads:
            raise ConfigError(f"embed_dim {C} is not divisible by the text pool's {self.pool_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256  # basic.py:471

    @property
    def vocab_size(self) -> int:
        """Logits per token: two per bit."""
        return 2 * self.bits

    @property
    def pool_head_dim(self) -> int:
        return 64 if self.embed_dim > 4096 else 128  # TextAttentivePool (infinity.py:41-45)

    @property
    def pool_heads(self) -> int:
        return self.text_channels // self.pool_head_dim

    @classmethod
    def release(cls, name: str, **overrides: Any) -> InfinityConfig:
        """A released model type of ``tools/run_infinity.py:315-330`` (``infinity_2b``, ``infinity_8b``, ...)."""
        if name not in RELEASES:
            raise ConfigError(f"unknown Infinity model {name!r}; known: {', '.join(RELEASES)}")
        depth, C, H, chunks = RELEASES[name]
        return cls(**{"depth": depth, "embed_dim": C, "num_heads": H, "block_chunks": chunks, **overrides})

    def release_name(self) -> str | None:
        """The released model type with this shape, if any."""
        shape = (self.depth, self.embed_dim, self.num_heads, self.block_chunks)
        return next((k for k, v in RELEASES.items() if v == shape), None)


# model_type -> (depth, embed_dim, num_heads, block_chunks), tools/run_infinity.py:315-330
RELEASES: dict[str, tuple[int, int, int, int]] = {
    "infinity_2b": (32, 2048, 16, 8),
    "infinity_8b": (40, 3584, 28, 8),
    "infinity_layer12": (12, 768, 8, 4),
    "infinity_layer16": (16, 1152, 12, 4),
    "infinity_layer24": (24, 1536, 16, 4),
    "infinity_layer32": (32, 2080, 20, 4),
    "infinity_layer40": (40, 2688, 24, 4),
    "infinity_layer48": (48, 3360, 28, 4),
}


def official_uncond_rows(text_maxlen: int, text_channels: int) -> torch.Tensor:
    """The model's own ``cfg_uncond`` initialisation (infinity.py:187-191): also the rows ``load_state_dict`` appends
    to a checkpoint's shorter ``cfg_uncond``. ``a=-2, b=2`` are absolute bounds (about 1.7 std)."""
    rows = torch.empty(text_maxlen, text_channels, device="cpu")
    nn.init.trunc_normal_(rows, std=1.2, generator=torch.Generator(device="cpu").manual_seed(0))
    return rows / text_channels**0.5


# ---- cross-attention to the text ----------------------------------------------------------------------------------
# Layout of the text keys/values: varlen, one tensor per row, no padding. Each row's keys and values of every layer
# are projected once when the request is admitted (``Infinity.condition``) and kept as bfloat16 [depth, 2, len, H, c]
# (the official code re-projects them at every scale: same values). Why varlen rather than padded-with-mask:
# (1) the official kernel is ``flash_attn_varlen_kvpacked_func`` over bf16 inputs; computing each row's softmax over
# exactly its ``len`` keys in fp32 reproduces its reference definition (spec section 7) op for op, whereas a padded
# batch changes the reductions' lengths and blocking, and a one-ulp change before the bf16 rounding of the output
# flips that rounding (0.4% of one activation); (2) rows stay independent tensors, so ``Conditioning.select/cat``
# (continuous batching in a server) are list operations: no copy, no re-padding when a long prompt joins.
def text_attention(
    q_RlHc: torch.Tensor, k_rows: Sequence[torch.Tensor], v_rows: Sequence[torch.Tensor], scale: float
) -> torch.Tensor:
    """Varlen cross-attention as the official fp32 path runs it (basic.py:393-397): q and kv rounded to bf16, per
    row ``softmax((q @ k^T) * scale) @ v`` in fp32, output rounded to bf16, returned as float32 [R, l, H, c].
    ``k_rows[r]``/``v_rows[r]`` are row r's [len_r, H, c] (bf16)."""
    q_bf = q_RlHc.to(torch.bfloat16)
    out = torch.empty_like(q_bf)
    for r in range(q_bf.shape[0]):
        q_b = q_bf[r].float().transpose(0, 1)
        k_b = k_rows[r].float().transpose(0, 1)
        v_b = v_rows[r].float().transpose(0, 1)
        p = torch.softmax((q_b @ k_b.transpose(-1, -2)) * scale, dim=-1)
        out[r] = (p @ v_b).transpose(0, 1).to(torch.bfloat16)
    return out.float()


def text_attention_batched(
    q_RlHc: torch.Tensor, k_rows: Sequence[torch.Tensor], v_rows: Sequence[torch.Tensor], scale: float
) -> torch.Tensor:
    """The same attention over rows padded to the longest, with a key mask, in one SDPA call and the input's
    dtype: what training uses (the per-row loop of ``text_attention`` costs a Python call per row and layer, and
    its bf16 round trips only matter for matching the official numbers at inference)."""
    k = nn.utils.rnn.pad_sequence(list(k_rows), batch_first=True).to(q_RlHc.dtype)  # [R, T, H, c]
    v = nn.utils.rnn.pad_sequence(list(v_rows), batch_first=True).to(q_RlHc.dtype)
    lens = torch.tensor([len(r) for r in k_rows], device=q_RlHc.device)
    mask_R11T = (torch.arange(k.shape[1], device=q_RlHc.device) < lens[:, None]).view(len(k_rows), 1, 1, -1)
    o = F.scaled_dot_product_attention(
        q_RlHc.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask_R11T, scale=scale
    )
    return o.transpose(1, 2)


class FastRMSNorm(nn.Module):
    """``FastRMSNorm`` without flash-attn's fused kernel (basic.py:34-35, 119-135): ``x*rsqrt(mean(x²)+eps)*w``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return ((y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight).to(x.dtype)


class PoolAttention(nn.Module):
    """``CrossAttention(for_attn_pool=True)``: one learned query per head attends over a row's text tokens."""

    zero_k_bias: torch.Tensor

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
        if not self.mat_q.is_meta:
            nn.init.trunc_normal_(self.mat_q.data, mean=0, std=math.sqrt(1 / dim / 3))
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, kv_NC: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
        N, R, H, c = kv_NC.shape[0], len(lens), self.num_heads, self.head_dim
        kv = F.linear(kv_NC, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias))).view(N, 2, H, c)
        kv_bf = kv.contiguous().to(torch.bfloat16)
        q_R1Hc = self.mat_q.repeat(R, 1, 1).to(kv.dtype).unsqueeze(1)
        ends = torch.tensor(lens).cumsum(0).tolist()
        spans = list(zip([0, *ends[:-1]], ends))
        attend = text_attention_batched if self.training else text_attention
        if self.training:  # no bf16 round trip (see text_attention_batched)
            kv_bf = kv
        o = attend(q_R1Hc, [kv_bf[b:e, 0] for b, e in spans], [kv_bf[b:e, 1] for b, e in spans], self.scale)
        return self.proj(o.reshape(R, 1, -1)).squeeze(1)


class TextAttentivePool(nn.Module):
    """The prompt as one vector [R, D] (``text_proj_for_sos``)."""

    def __init__(self, text_channels: int, dim: int, head_dim: int):
        super().__init__()
        self.ca = PoolAttention(dim, text_channels, text_channels // head_dim)

    def forward(self, kv_NC: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
        return self.ca(kv_NC, lens)


class CrossAttention(nn.Module):
    """A block's attention from image tokens to text tokens; softmax scale c^-0.5 (no cosine attention)."""

    zero_k_bias: torch.Tensor

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, ca_kv_ND: torch.Tensor) -> torch.Tensor:
        """Keys and values of packed text tokens, [N, 2, H, c] in bfloat16 (what the kernel receives)."""
        N = ca_kv_ND.shape[0]
        kv = F.linear(ca_kv_ND, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        kv = kv.view(N, 2, self.num_heads, self.head_dim).contiguous()
        return kv if self.training else kv.to(torch.bfloat16)  # training: no round trip (text_attention_batched)

    def forward(self, x_RlC: torch.Tensor, kv_rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """``kv_rows[r]``: row r's [2, len_r, H, c] bf16 keys/values of this layer."""
        R, l, C = x_RlC.shape
        q = self.mat_q(x_RlC).view(R, l, self.num_heads, self.head_dim)
        attend = text_attention_batched if self.training else text_attention
        o = attend(q, [kv[0] for kv in kv_rows], [kv[1] for kv in kv_rows], self.scale)
        return self.proj(o.reshape(R, l, C))


# ---- self-attention with RoPE-2D ----------------------------------------------------------------------------------
def apply_rope2d(q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k [R, H, l, c]: pair (x[2i], x[2i+1]) by angle i (the first c/4 pairs by the row, the rest by the
    column angles). ``rope`` is [2, l, c/2] (cos, sin) shared by all rows, or [2, R, l, c/2] per row. Same op
    sequence as ``apply_rotary_emb`` (basic.py:96-116)."""
    cos, sin = (rope[0], rope[1]) if rope.ndim == 3 else (rope[0].unsqueeze(1), rope[1].unsqueeze(1))
    qk = torch.stack((q, k), dim=0)
    qk = qk.reshape(*qk.shape[:-1], -1, 2)
    qk = torch.stack([cos * qk[..., 0] - sin * qk[..., 1], sin * qk[..., 0] + cos * qk[..., 1]], dim=-1)
    qk = qk.reshape(*qk.shape[:-2], -1)
    q, k = qk.unbind(dim=0)
    return q, k


class InfinityLayout(Protocol):
    """Which tokens a call holds and what they attend to. Blocks get q/k/v as [R, H, l, c] (RoPE applied)."""

    rope: torch.Tensor  # [2, l, c/2] or [2, R, l, c/2]: cos/sin of this call's tokens

    def modulate(self, h: torch.Tensor, scale_RC: torch.Tensor, shift_RC: torch.Tensor) -> torch.Tensor: ...

    def gate(self, y: torch.Tensor, gamma_RC: torch.Tensor) -> torch.Tensor: ...

    def attend(
        self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor, scale: float
    ) -> torch.Tensor: ...


class TeacherForcing(DenseRows):
    """The whole (padded) pyramid in one call with the block-causal mask ``attn_bias_11LL``."""

    def __init__(self, attn_bias_11LL: torch.Tensor, rope: torch.Tensor):
        self.attn_bias, self.rope = attn_bias_11LL, rope

    def attend(
        self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_RHlc, k_RHlc, v_RHlc, attn_mask=self.attn_bias, scale=scale)


class CachedScale(DenseRows):
    """One scale of sampling: ``kv`` (owned by the caller, e.g. ``engine.kv_cache.ConcatKVCache``) stores this
    call's keys/values and attends over all cached scales plus this one; ``rope`` = this scale's rows
    (``infinity_scales.scale_rope``)."""

    def __init__(self, kv: KVAttend, rope: torch.Tensor):
        self.kv, self.rope = kv, rope

    def attend(
        self, layer: int, q_RHlc: torch.Tensor, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return self.kv.attend(layer, q_RHlc, k_RHlc, v_RHlc, scale)

    def kept(self, idx_Rk: torch.Tensor) -> CachedScale:
        """The scale for the tokens ``idx_Rk`` [R, k] of each row (token pruning): their RoPE rows, per row
        [2, R, k, c/2]; their keys alone go to the cache."""
        rope = self.rope if self.rope.ndim == 4 else self.rope.unsqueeze(1).expand(-1, idx_Rk.shape[0], -1, -1)
        idx = idx_Rk.view(1, *idx_Rk.shape, 1).expand(2, -1, -1, rope.shape[-1])
        return CachedScale(self.kv, rope.gather(2, idx))


class SelfAttention(nn.Module):
    """Cosine attention: q, k l2-normalised, q scaled per head by ``exp(min(scale_mul, ln 100))``, softmax scale 1,
    then RoPE-2D (basic.py:248-311)."""

    zero_k_bias: torch.Tensor

    def __init__(self, block_idx: int, dim: int, num_heads: int):
        super().__init__()
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = torch.log(torch.tensor(100, device="cpu")).item()  # ln 100 in float32, as official
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, h_RlC: torch.Tensor, layout: InfinityLayout) -> torch.Tensor:
        R, l, C = h_RlC.shape
        H, c = self.num_heads, self.head_dim
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(h_RlC, self.mat_qkv.weight, bias).view(R, l, 3, H, c)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # each [R, H, l, c]
        # Released files hold [1, H, 1, 1]; the customized-flash-attn layout is [1, 1, H, 1]: same values.
        scale_mul = self.scale_mul_1H11.view(1, H, 1, 1).clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul).contiguous()
        k = F.normalize(k, dim=-1, eps=1e-12).contiguous()
        q, k = apply_rope2d(q, k, layout.rope)
        o_RHlc = layout.attend(self.block_idx, q, k, v.contiguous(), 1.0)
        return self.proj(o_RHlc.transpose(1, 2).reshape(R, l, C))


class CrossAttnBlock(nn.Module):
    """x += g1*SA(AdaLN1(x)); x += CA(LN(x), text); x += g2*FFN(AdaLN2(x)) — basic.py:454-518, fused-norm path."""

    def __init__(self, block_idx: int, cfg: InfinityConfig, drop_path_p: float = 0.0):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.eps, self.drop_path_p = C, cfg.norm_eps, drop_path_p
        self.sa = SelfAttention(block_idx, C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ffn = FFN(C, cfg.mlp_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)

    def modulation(self, gss_R16C: torch.Tensor) -> torch.Tensor:
        """[R, 6, C] (gamma1, gamma2, scale1, scale2, shift1, shift2) from the shared AdaLN output."""
        return (self.ada_gss + gss_R16C).view(-1, 6, self.C)

    def _ln(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.C,), None, None, self.eps)

    def forward(
        self, x: torch.Tensor, mod_R6C: torch.Tensor, kv_rows: Sequence[torch.Tensor], layout: InfinityLayout
    ) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_R6C.unbind(1)
        h = layout.modulate(self._ln(x), scale1, shift1)
        x = x + drop_path(layout.gate(self.sa(h, layout), gamma1), self.drop_path_p, self.training)
        x = x + self.ca(self.ca_norm(x), kv_rows).float()  # ca_gamma = 1 (cross_attn_layer_scale = -1)
        h = layout.modulate(self._ln(x), scale2, shift2)
        return x + drop_path(layout.gate(self.ffn(h), gamma2), self.drop_path_p, self.training)


class _Chunk(nn.Module):
    """``MultipleLayers``: keys ``block_chunks.{k}.module.{j}``."""

    def __init__(self, blocks: Sequence[CrossAttnBlock]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


@dataclass
class Conditioning:
    """Everything the blocks need from the prompts of R rows, computed once per request.

    ``cond_RD`` [R, D] float32 is the pooled prompt (first token, AdaLN and head condition); ``block_mods``
    [depth, R, 6, C] the AdaLN vectors of every block; ``text_kv[r]`` row r's cross-attention keys/values of every
    layer, [depth, 2, len_r, H, c] bfloat16 (varlen: see ``text_attention``)."""

    cond_RD: torch.Tensor
    block_mods: torch.Tensor
    text_kv: tuple[torch.Tensor, ...]

    @property
    def rows(self) -> int:
        return self.cond_RD.shape[0]

    def layer_kv(self, layer: int) -> list[torch.Tensor]:
        return [kv[layer] for kv in self.text_kv]

    def select(self, rows: slice | Sequence[int] | torch.Tensor) -> Conditioning:
        idx = list(range(self.rows))[rows] if isinstance(rows, slice) else [int(r) for r in rows]
        index = torch.tensor(idx, dtype=torch.long, device=self.cond_RD.device)
        return Conditioning(self.cond_RD[index], self.block_mods[:, index], tuple(self.text_kv[r] for r in idx))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        if len(parts) == 1:
            return parts[0]
        return Conditioning(
            torch.cat([p.cond_RD for p in parts]),
            torch.cat([p.block_mods for p in parts], dim=1),
            tuple(kv for p in parts for kv in p.text_kv),
        )


BlockFn = Callable[
    [int, CrossAttnBlock, torch.Tensor, torch.Tensor, Sequence[torch.Tensor], InfinityLayout], torch.Tensor
]


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C, D, Ct5 = cfg.embed_dim, cfg.embed_dim, cfg.text_channels
        self.C, self.D, self.V, self.depth = C, D, cfg.vocab_size, cfg.depth
        init_std = math.sqrt(1 / C / 3)
        uncond = torch.empty(cfg.text_maxlen, Ct5)
        self.cfg_uncond = nn.Parameter(uncond if uncond.is_meta else official_uncond_rows(cfg.text_maxlen, Ct5))
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.text_norm = FastRMSNorm(Ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct5, D, cfg.pool_head_dim)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.lvl_embed = nn.Embedding(NUM_LEVELS, C)
        if not self.pos_start.is_meta:
            nn.init.trunc_normal_(self.pos_start.data, mean=0, std=init_std)
            nn.init.trunc_normal_(self.lvl_embed.weight.data, mean=0, std=init_std)
        self.word_embed = nn.Linear(cfg.bits, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(D, 6 * C))
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        blocks = [CrossAttnBlock(i, cfg, dpr[i]) for i in range(cfg.depth)]
        self.head_nm = AdaLNBeforeHead(C, D, cfg.norm_eps)
        self.head = nn.Linear(C, self.V)
        if cfg.block_chunks > 1:
            per = cfg.depth // cfg.block_chunks
            self.block_chunks = nn.ModuleList(
                [_Chunk(blocks[k * per : (k + 1) * per]) for k in range(cfg.block_chunks)]
            )
        else:
            self.blocks = nn.ModuleList(blocks)
        self.layers: tuple[CrossAttnBlock, ...] = tuple(blocks)  # global order (not registered twice)

    # ---- conditioning ---------------------------------------------------------------------------------------
    def guided_text(self, text: TextFeatures, negative: TextFeatures | None = None) -> TextFeatures:
        """Rows for classifier-free guidance (infinity.py:484-501): the B prompts, then B unconditional rows, the
        learned null text ``cfg_uncond[:len_i]`` of each prompt's length, or the negative prompt's features
        (one negative prompt serves every image)."""
        if negative is None:
            uncond = [self.cfg_uncond[:n].to(text.kv_compact) for n in text.lens]
            return TextFeatures(torch.cat([text.kv_compact, *uncond]), text.lens + text.lens)
        if negative.rows == 1 and text.rows > 1:
            negative = negative.select([0] * text.rows)
        if negative.rows != text.rows:
            raise InvalidInputError(
                f"need 1 or {text.rows} negative prompts for {text.rows} prompts, got {negative.rows}"
            )
        return TextFeatures.cat([text, negative])

    def condition(self, text: TextFeatures) -> Conditioning:
        """Per-row conditioning from raw text features (one row per sequence), as infinity.py:503-510 computes it
        over the packed tokens of all rows."""
        if text.channels != self.cfg.text_channels:
            raise InvalidInputError(
                f"text features have {text.channels} channels; this model takes {self.cfg.text_channels}"
            )
        longest = max(text.lens)
        if longest > self.cfg.text_maxlen:
            raise InvalidInputError(f"a prompt has {longest} tokens; this model takes at most {self.cfg.text_maxlen}")
        kv = self.text_norm(text.kv_compact.to(self.cfg_uncond.dtype))
        cond_RD = self.text_proj_for_sos(kv, text.lens).float().contiguous()
        ca_kv = self.text_proj_for_ca(kv)
        gss = self.shared_ada_lin(cond_RD.float()).float().contiguous()
        mods = torch.stack([b.modulation(gss) for b in self.layers])
        per_layer = [b.ca.text_kv(ca_kv) for b in self.layers]  # each [N, 2, H, c] bf16
        text_kv, begin = [], 0
        for n in text.lens:
            text_kv.append(torch.stack([kv[begin : begin + n] for kv in per_layer]).transpose(1, 2).contiguous())
            begin += n
        return Conditioning(cond_RD, mods, tuple(text_kv))

    # ---- tokens -----------------------------------------------------------------------------------------------
    def first_tokens(self, cond: Conditioning) -> torch.Tensor:
        """Input of scale 0, [R, 1, C]: pooled prompt + pos_start + level 0."""
        R = cond.rows
        sos = cond.cond_RD.unsqueeze(1).expand(R, 1, -1) + self.pos_start.expand(R, 1, -1)
        return sos + self.lvl_embed.weight[0]

    def next_tokens(self, si: int, next_Bld: torch.Tensor, branches: int = 1) -> torch.Tensor:
        """Input of scale ``si`` from the bits-space input [B, l, d] (``bsq.latent_to_tokens``): word embedding,
        repeated for the ``branches`` guidance halves, plus the level embedding -> [branches*B, l, C]."""
        x = self.word_embed(next_Bld.to(self.word_embed.weight.dtype))
        if branches > 1:
            x = x.repeat(branches, 1, 1)
        return x + self.lvl_embed.weight[si]

    # ---- transformer ----------------------------------------------------------------------------------------
    def run_blocks(
        self,
        x: torch.Tensor,
        cond: Conditioning,
        layout: InfinityLayout,
        begin: int = 0,
        end: int | None = None,
        block_fn: BlockFn | None = None,
    ) -> torch.Tensor:
        """Blocks ``begin:end`` on hidden states [R, l, C] (float32). Guidance on hidden states (official
        ``cfg_insertion_layer = -k``) runs ``0:depth-k+1``, mixes the halves, then the rest.
        ``block_fn(i, block, x, mod, kv_rows, layout)`` replaces ``block(x, mod, kv_rows, layout)`` where a plan
        changes what the blocks compute; the model itself stays stateless."""
        for i in range(begin, self.depth if end is None else end):
            block, mod, kv_rows = self.layers[i], cond.block_mods[i], cond.layer_kv(i)
            x = block(x, mod, kv_rows, layout) if block_fn is None else block_fn(i, block, x, mod, kv_rows, layout)
        return x

    def logits(self, x: torch.Tensor, cond_RD: torch.Tensor) -> torch.Tensor:
        """Head AdaLN + head on [R, l, C] -> float32 [R, l, V] (``get_logits``; the AdaLN vectors are computed per
        call from ``cond_RD`` as the official does)."""
        mod = self.head_nm.modulation(cond_RD.float())
        return self.head(self.head_nm(x.float(), mod, DenseRows())).float()

    def forward_tokens(
        self, x: torch.Tensor, cond: Conditioning, layout: InfinityLayout, block_fn: BlockFn | None = None
    ) -> torch.Tensor:
        """All blocks and the head on the tokens ``layout`` describes; logits [R, l, V] in float32."""
        return self.logits(self.run_blocks(x, cond, layout, block_fn=block_fn), cond.cond_RD)

    def forward(
        self,
        text: TextFeatures,
        x_BLd_wo_prefix: torch.Tensor,
        schedule: InfinitySchedule,
        pad_to: int = TEACHER_FORCING_PAD,
    ) -> torch.Tensor:
        """Teacher-forced logits [B, L, V] (official ``Infinity.forward`` without condition dropout: that is the
        trainer's job). ``x_BLd_wo_prefix`` [B, L-1, d] are the inputs of scales 1.. (``BSQVAE.bsc_inputs``).
        ``pad_to``: the sequence is padded to a multiple of it as the official forward pads it (1: no padding, the
        same logits up to float rounding; what training uses)."""
        B, L = x_BLd_wo_prefix.shape[0], schedule.seq_len
        if x_BLd_wo_prefix.shape[1:] != (L - 1, self.cfg.bits):
            raise InvalidInputError(
                f"x_BLd_wo_prefix must be [B, {L - 1}, {self.cfg.bits}] for this schedule, "
                f"got {tuple(x_BLd_wo_prefix.shape)}"
            )
        if text.rows != B:
            raise InvalidInputError(f"need one text row per image: {text.rows} rows for {B} images")
        cond = self.condition(text)
        sos = cond.cond_RD.unsqueeze(1).expand(B, 1, -1) + self.pos_start.expand(B, 1, -1)
        x = torch.cat((sos, self.word_embed(x_BLd_wo_prefix.float())), dim=1)
        # Pad to a multiple of 128 as the official forward does (infinity.py:389-416): padded queries see key 0
        # only, real queries never see padded keys; kept so that the attention kernel's blocking is the same.
        pad = -L % pad_to
        level = torch.cat([torch.full((n,), i) for i, n in enumerate(schedule.lengths)]).view(1, L, 1)
        bias = torch.where(level >= level.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L)
        if pad:
            bias = F.pad(bias, (0, pad, 0, pad), value=-torch.inf)
            bias[0, 0, L:, 0] = 0
            x = F.pad(x, (0, 0, 0, pad))
        lvl = torch.cat([self.lvl_embed.weight[i].expand(n, -1) for i, n in enumerate(schedule.lengths)])
        x = torch.cat((x[:, :L] + lvl, x[:, L:]), dim=1)
        layout = TeacherForcing(bias.type_as(x).to(x.device), rope2d_rows(self.cfg.head_dim, schedule, 0, L + pad))
        x = self.run_blocks(x, cond, layout)
        return self.logits(x[:, :L], cond.cond_RD)

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
        """A from-scratch initialisation as the official ``Infinity.init_weights`` (VAR's scheme): every Linear
        trunc-normal with std sqrt(1/3C), biases 0; the head scaled by ``init_head``; the AdaLN scales and shifts by
        ``init_adaln`` and the residual gammas by ``init_adaln_gamma``, so every block starts near the identity;
        the attention and MLP output projections divided by sqrt(2 depth)."""
        init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.bias is not None:
                    m.bias.data.zero_()
        self.head.weight.data.mul_(init_head)
        head_ada = self.head_nm.ada_lin[-1]
        assert isinstance(head_ada, nn.Linear)
        head_ada.weight.data.mul_(init_adaln)
        shared = self.shared_ada_lin[-1]
        assert isinstance(shared, nn.Linear)
        C = self.C
        shared.weight.data[2 * C :].mul_(init_adaln)  # (gamma1, gamma2, scale1, scale2, shift1, shift2) x C
        shared.weight.data[: 2 * C].mul_(init_adaln_gamma)
        for block in self.layers:
            block.ada_gss.data[:, :, 2:].mul_(init_adaln)
            block.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
            block.sa.proj.weight.data.div_((2 * self.depth) ** 0.5)
            block.ca.proj.weight.data.div_((2 * self.depth) ** 0.5)
            block.ffn.fc2.weight.data.div_((2 * self.depth) ** 0.5)

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def linear_roles(self) -> tuple[list[str], list[str]]:
        """Linear layers by module name and by how often they run: (per token: self-attention, the cross-attention's
        queries and output, the MLP; per request or scale: the text projections, the cross-attention's text
        keys/values, the AdaLN projections). Neither holds the ``head`` (its logits decide the bits) nor
        ``word_embed`` (``bits`` inputs wide). Weight quantization (``accel/int8.py``) reads this."""
        tokens: list[str] = []
        once: list[str] = []
        for name, m in self.named_modules():
            if not isinstance(m, nn.Linear) or name in ("head", "word_embed"):
                continue
            per_token = name.startswith("block_chunks.") and not name.endswith(".ca.mat_kv")
            (tokens if per_token else once).append(name)
        return tokens, once

    def kv_row_bytes(self, seq_len: int) -> int:
        """Bytes of one row of a full self-attention KV cache over ``seq_len`` tokens (a schedule's ``seq_len``):
        keys and values of every layer, in the model's dtype."""
        return 2 * self.depth * seq_len * self.C * self.head.weight.element_size()

    def text_kv_row_bytes(self, text_len: int) -> int:
        """Bytes of one row's cross-attention keys/values (``Conditioning.text_kv``, bfloat16)."""
        return 2 * self.depth * text_len * self.C * 2

    def derived_buffer_names(self) -> tuple[str, ...]:
        """Buffers recomputed from the config (zeros: k has no bias)."""
        names = ["text_proj_for_sos.ca.zero_k_bias"]
        for i in range(self.depth):
            prefix = self.block_prefix(i)
            names += [f"{prefix}sa.zero_k_bias", f"{prefix}ca.zero_k_bias"]
        return tuple(names)

    def block_prefix(self, i: int) -> str:
        """State-dict prefix of block ``i`` (``block_chunks.{k}.module.{j}.`` or ``blocks.{i}.``)."""
        if self.cfg.block_chunks > 1:
            per = self.depth // self.cfg.block_chunks
            return f"block_chunks.{i // per}.module.{i % per}."
        return f"blocks.{i}."
