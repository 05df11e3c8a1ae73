"""Building blocks of the VAR transformer: AdaLN self-attention block, FFN, AdaLN before the head.

Parameter names match the official checkpoints. The AdaLN vectors of a block depend only on the class
condition, so they are computed once per request (``modulation``) and passed into ``forward`` as a
[R, 6, C] tensor in the official chunk order (gamma1, gamma2, scale1, scale2, shift1, shift2) — not DiT's
(shift, scale, gate) order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.models.attention import Layout


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per row (timm's rule); identity at inference."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SelfAttention(nn.Module):
    """Multi-head attention with VAR's q/v-only bias and optional cosine attention (``attn_l2_norm``).

    With ``attn_l2_norm`` q and k are l2-normalised and q is scaled per head by
    ``exp(min(scale_mul, ln 100))`` (softmax scale 1); otherwise the softmax scale is 0.25/sqrt(c).
    """

    def __init__(
        self,
        block_idx: int,
        dim: int,
        num_heads: int,
        attn_l2_norm: bool,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ):
        super().__init__()
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            # The official clamp value is ln(100) evaluated in float32.
            self.max_scale_mul = torch.log(torch.tensor(100.0, device="cpu")).item()
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop  # kept for config fidelity; SDPA on the cached path runs without dropout

    def qkv_bias(self) -> torch.Tensor:
        return torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))

    def forward(self, h: torch.Tensor, layout: Layout) -> torch.Tensor:
        qkv = F.linear(h, self.mat_qkv.weight, self.qkv_bias())
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)  # each [..., H, c]
        if self.attn_l2_norm:
            scale_mul_H1 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp().view(self.num_heads, 1)
            q = F.normalize(q, dim=-1).mul(scale_mul_H1)
            k = F.normalize(k, dim=-1)
        o = layout.attend(self.block_idx, q, k, v, self.scale)  # [..., H, c]
        return self.proj_drop(self.proj(o.flatten(-2)))


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 * attn(LN(x)*(1+scale1)+shift1);  x += gamma2 * ffn(LN(x)*(1+scale2)+shift2)."""

    def __init__(
        self,
        block_idx: int,
        dim: int,
        cond_dim: int,
        num_heads: int,
        mlp_hidden: int,
        norm_eps: float,
        shared_aln: bool,
        attn_l2_norm: bool,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.C = dim
        self.drop_path_p = drop_path
        self.attn = SelfAttention(block_idx, dim, num_heads, attn_l2_norm, proj_drop=drop, attn_drop=attn_drop)
        self.ffn = FFN(dim, mlp_hidden, drop)
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """[R, 6, C]: from the class embedding [R, D], or from the shared AdaLN output [R, 1, 6, C]."""
        if self.shared_aln:
            return (self.ada_gss + cond).view(-1, 6, self.C)
        return self.ada_lin(cond).view(-1, 6, self.C)

    def forward(self, x: torch.Tensor, mod_R6C: torch.Tensor, layout: Layout) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_R6C.unbind(1)
        h = layout.modulate(self.ln_wo_grad(x), scale1, shift1)
        x = x + drop_path(layout.gate(self.attn(h, layout), gamma1), self.drop_path_p, self.training)
        h = layout.modulate(self.ln_wo_grad(x), scale2, shift2)
        return x + drop_path(layout.gate(self.ffn(h), gamma2), self.drop_path_p, self.training)


class AdaLNBeforeHead(nn.Module):
    """LN(x)*(1+scale)+shift from the raw class embedding (also in the shared-AdaLN model)."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float):
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * dim))

    def modulation(self, cond_RD: torch.Tensor) -> torch.Tensor:
        return self.ada_lin(cond_RD).view(-1, 2, self.C)  # [R, 2, C]: scale, shift

    def forward(self, x: torch.Tensor, mod_R2C: torch.Tensor, layout: Layout) -> torch.Tensor:
        scale, shift = mod_R2C.unbind(1)
        return layout.modulate(self.ln_wo_grad(x), scale, shift)
