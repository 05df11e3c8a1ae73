"""The VAR transformer (Tian et al., "Visual Autoregressive Modeling", NeurIPS 2024), weight-compatible with
the official ``var_d*.pth`` files.

Glossary: ``B`` images, ``R`` rows (2B with classifier-free guidance: conditional rows first, then the
unconditional ones), ``L`` tokens over all scales, ``l`` tokens at the current scale, ``C`` width, ``D``
condition width (= C), ``V`` codebook size, ``Cv`` code dim, ``si`` scale index.

Two entry points share every block:
* ``forward(label_B, x_BLCv_wo_first_l)`` — teacher forcing over the whole pyramid with the block-causal mask
  (training, validation loss);
* ``forward_tokens(x, cond, layout)`` — one call over whatever tokens ``layout`` describes, typically one
  scale of sampling against an explicit KV cache owned by the caller. The model holds no per-request state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nextscale.config import VARConfig
from nextscale.errors import CheckpointError
from nextscale.models.attention import FullSequence, KVGeometry, Layout, check_class_labels
from nextscale.models.layers import AdaLNBeforeHead, AdaLNSelfAttn
from nextscale.models.scales import ScaleSchedule

BlockFn = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, Layout], torch.Tensor]


class SharedAdaLin(nn.Linear):
    """The 512 px model's AdaLN projection shared by all blocks; output viewed as [R, 1, 6, C]."""

    def forward(self, cond_RD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_RD).view(-1, 1, 6, C)


@dataclass
class Conditioning:
    """Everything the blocks need from the class labels of R rows, computed once per request.

    ``block_mods`` is [depth, R, 6, C] (AdaLN vectors of every block), ``head_mod`` [R, 2, C].
    """

    cond_RD: torch.Tensor
    block_mods: torch.Tensor
    head_mod: torch.Tensor

    @property
    def rows(self) -> int:
        return self.cond_RD.shape[0]

    def select(self, rows: slice | torch.Tensor) -> Conditioning:
        return Conditioning(self.cond_RD[rows], self.block_mods[:, rows], self.head_mod[rows])

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        if len(parts) == 1:
            return parts[0]
        return Conditioning(
            torch.cat([p.cond_RD for p in parts]),
            torch.cat([p.block_mods for p in parts], dim=1),
            torch.cat([p.head_mod for p in parts]),
        )


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, D = cfg.embed_dim, cfg.embed_dim
        self.C, self.D, self.Cvae, self.V = C, D, cfg.z_channels, cfg.vocab_size
        self.depth, self.num_heads = cfg.depth, cfg.num_heads
        self.num_classes = cfg.num_classes
        self.scales = ScaleSchedule(cfg.patch_nums)
        L, first_l = self.scales.seq_len, self.scales.first_l
        init_std = (1 / C / 3) ** 0.5

        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: the null class for CFG
        self.pos_start = nn.Parameter(torch.empty(1, first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t.data, mean=0, std=init_std)

        self.shared_ada_lin: nn.Module = (
            nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(D, 6 * C)) if cfg.shared_aln else nn.Identity()
        )
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            [
                AdaLNSelfAttn(
                    i,
                    C,
                    D,
                    cfg.num_heads,
                    cfg.mlp_hidden,
                    cfg.norm_eps,
                    cfg.shared_aln,
                    cfg.attn_l2_norm,
                    drop=cfg.drop_rate,
                    attn_drop=cfg.attn_drop_rate,
                    drop_path=dpr[i],
                )
                for i in range(cfg.depth)
            ]
        )
        # Persistent buffers, as in the official state dict (derivable from patch_nums).
        self.register_buffer("lvl_1L", self.scales.level_ids())
        self.register_buffer("attn_bias_for_masking", self.scales.block_causal_bias().contiguous())
        self.head_nm = AdaLNBeforeHead(C, D, cfg.norm_eps)
        self.head = nn.Linear(C, self.V)

    # ---- conditioning ---------------------------------------------------------------------------------------
    def check_labels(self, label_R: torch.Tensor) -> None:
        check_class_labels(label_R, self.num_classes)

    def condition(self, label_R: torch.Tensor) -> Conditioning:
        cond_RD = self.class_emb(label_R)
        shared = self.shared_ada_lin(cond_RD)
        mods = torch.stack([b.modulation(shared) for b in self.blocks])
        return Conditioning(cond_RD, mods, self.head_nm.modulation(cond_RD))

    def drop_labels(self, label_B: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Condition dropout for CFG training: replace labels by the null class with probability ``rate``."""
        if rate <= 0:
            return label_B
        u = torch.rand(label_B.shape, generator=generator, device=label_B.device)
        return torch.where(u < rate, self.num_classes, label_B)

    # ---- embeddings ---------------------------------------------------------------------------------------
    def level_pos(self) -> torch.Tensor:
        """lvl_embed(level of each position) + pos_1LC, [1, L, C]."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def first_tokens(self, cond: Conditioning, lvl_pos_1LC: torch.Tensor | None = None) -> torch.Tensor:
        """Input of scale 0, [R, first_l, C]: the class embedding acts as the start token."""
        lvl_pos = self.level_pos() if lvl_pos_1LC is None else lvl_pos_1LC
        first_l = self.scales.first_l
        R = cond.rows
        return (
            cond.cond_RD.unsqueeze(1).expand(R, first_l, -1)
            + self.pos_start.expand(R, first_l, -1)
            + lvl_pos[:, :first_l]
        )

    def next_tokens(self, si: int, next_BlCv: torch.Tensor, lvl_pos_1LC: torch.Tensor | None = None) -> torch.Tensor:
        """Input of scale ``si`` from the area-downsampled running latent [B, l, Cv] -> [B, l, C]."""
        lvl_pos = self.level_pos() if lvl_pos_1LC is None else lvl_pos_1LC
        b, e = self.scales.begin_ends[si]
        w = self.word_embed.weight
        return self.word_embed(next_BlCv.to(w.dtype)) + lvl_pos[:, b:e]

    # ---- transformer ----------------------------------------------------------------------------------------
    def forward_tokens(
        self, x: torch.Tensor, cond: Conditioning, layout: Layout, block_fn: BlockFn | None = None
    ) -> torch.Tensor:
        """Run all blocks and the head on the tokens ``layout`` describes; logits in float32.

        ``block_fn(i, block, x, mod, layout)`` replaces ``block(x, mod, layout)`` where a sampling plan changes
        what the blocks compute (e.g. token pruning); the model itself stays stateless."""
        for i, block in enumerate(self.blocks):
            mod = cond.block_mods[i]
            x = block(x, mod, layout) if block_fn is None else block_fn(i, block, x, mod, layout)
        return self.logits(x, cond, layout)

    def logits(self, x: torch.Tensor, cond: Conditioning, layout: Layout) -> torch.Tensor:
        h = self.head_nm(x.to(self.head.weight.dtype), cond.head_mod, layout)
        return self.head(h).float()

    def forward(
        self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, num_scales: int | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits [B, L', V] over the first ``num_scales`` scales (all by default).

        Unlike the official forward, this never drops labels by itself: condition dropout is the trainer's
        job (``drop_labels``), so eval-mode logits are deterministic.
        """
        S = num_scales or self.scales.num_scales
        L = self.scales.begin_ends[S - 1][1]
        B = label_B.shape[0]
        cond = self.condition(label_B)
        first_l = self.scales.first_l
        sos = cond.cond_RD.unsqueeze(1).expand(B, first_l, -1) + self.pos_start.expand(B, first_l, -1)
        w = self.word_embed.weight
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l[:, : L - first_l].to(w.dtype))), dim=1)
        x = x + self.lvl_embed(self.lvl_1L[:, :L].expand(B, -1)) + self.pos_1LC[:, :L]
        return self.forward_tokens(x, cond, FullSequence(self.causal_bias(L)))

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def causal_bias(self, num_tokens: int) -> torch.Tensor:
        """The block-causal mask of the first ``num_tokens`` positions, [1, 1, T, T]."""
        bias: torch.Tensor = self.attn_bias_for_masking
        return bias[:, :, :num_tokens, :num_tokens]

    def kv_geometry(self) -> KVGeometry:
        """One row of a full KV cache: every layer, every position of the token pyramid, in the model's dtype."""
        cfg, w = self.cfg, self.head.weight
        return KVGeometry(cfg.depth, cfg.num_heads, cfg.head_dim, cfg.seq_len, w.dtype, w.device)

    def kv_row_bytes(self) -> int:
        return self.kv_geometry().row_bytes

    def linear_roles(self) -> tuple[list[str], list[str]]:
        """Linear layers by module name and by how often they run: (per token: the blocks' attention and MLP; per
        request: the AdaLN projections of the class embedding). Neither holds the ``head`` (its logits decide the
        tokens) nor ``word_embed`` (32 inputs wide). Weight quantization (``accel/int8.py``) reads this."""
        tokens, once = [], []
        for name, m in self.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            if name.startswith("blocks.") and ".ada_lin." not in name:
                tokens.append(name)
            elif ".ada_lin." in name or name.startswith("shared_ada_lin."):
                once.append(name)
        return tokens, once

    def derived_buffer_names(self) -> tuple[str, ...]:
        """Buffers recomputed from the config (not stored in native checkpoints)."""
        return ("lvl_1L", "attn_bias_for_masking", *(f"blocks.{i}.attn.zero_k_bias" for i in range(self.depth)))

    def init_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1.0
    ) -> None:
        """The official initialisation (``VAR.init_weights``): blocks start near identity via tiny gammas."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
        self.head.weight.data.mul_(init_head)
        self.head.bias.data.zero_()
        lin = self.head_nm.ada_lin[-1]
        lin.weight.data.mul_(init_adaln)
        lin.bias.data.zero_()
        for block in self.blocks:
            block.attn.proj.weight.data.div_((2 * self.depth) ** 0.5)
            block.ffn.fc2.weight.data.div_((2 * self.depth) ** 0.5)
            if block.shared_aln:
                block.ada_gss.data[:, :, 2:].mul_(init_adaln)
                block.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
            else:
                ada = block.ada_lin[-1]
                ada.weight.data[2 * self.C :].mul_(init_adaln)
                ada.weight.data[: 2 * self.C].mul_(init_adaln_gamma)
                ada.bias.data.zero_()


def check_refiner(main: VAR, refiner: VAR) -> VAR:
    """A refiner (collaborative decoding) must speak the main transformer's tokens: same codebook, scales, classes."""
    a, b = main.cfg, refiner.cfg
    for key in ("vocab_size", "z_channels", "patch_nums", "num_classes"):
        if getattr(a, key) != getattr(b, key):
            raise CheckpointError(
                f"the refiner does not match the transformer: {key} {getattr(b, key)} != {getattr(a, key)}"
            )
    return refiner
