"""Load the official VAR release files (``var_d*.pth``, ``vae_ch160v4096z32.pth``) unchanged.

Files are read with ``torch.load(weights_only=True)`` (no arbitrary pickles), the model configuration is
inferred from tensor shapes, and loading is strict: every expected key present with the expected shape,
no unexpected keys. Persistent buffers that are derivable from the config (``lvl_1L``,
``attn_bias_for_masking``, ``zero_k_bias``) are checked against their recomputed values. Every failure is a
``CheckpointError`` naming the file and what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nextscale.config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig
from nextscale.errors import CheckpointError, ConfigError
from nextscale.models.scales import ScaleSchedule
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.torch_files import key_indices, load_torch_file, missing_keys_error
from nextscale.models.var import VAR

log = logging.getLogger(__name__)

# Schedules of the released models, keyed by (sequence length, number of scales).
KNOWN_SCHEDULES = {(680, 10): PATCH_NUMS_256, (2240, 10): PATCH_NUMS_512}
_VAR_KEYS = (
    "word_embed.weight",
    "class_emb.weight",
    "pos_1LC",
    "lvl_embed.weight",
    "head.weight",
    "head_nm.ada_lin.1.weight",
    "blocks.0.attn.mat_qkv.weight",
)
_VAE_KEYS = (
    "encoder.conv_in.weight",
    "decoder.conv_out.weight",
    "quantize.embedding.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
)
# Mixing ratio of the Phi convs: a constructor argument, not stored in the files (0.5 in every release).
OFFICIAL_PHI_RATIO = 0.5


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict saved with ``torch.save``; refuse pickled objects."""
    path = Path(path)
    obj = load_torch_file(path, "only plain state dicts are accepted (a training checkpoint? export its weights first)")
    return plain_state_dict(obj, path)


def plain_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A loaded checkpoint object as a state dict (one ``state_dict``/``model``/``module`` wrapper level removed),
    or a one-line ``CheckpointError`` naming ``path``."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and set(obj) == {wrapper}:
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a plain state dict; non-tensor entries: {bad[:5]}")
    return dict(obj)


def is_var_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """A VAR transformer's or a multi-scale VQ-VAE's tensors (complete or not: the loader names what is missing).
    A LlamaGen VQ tokenizer shares the VQ-VAE's outer names; its encoder is ``conv_blocks``, not ``down``."""
    if any(k.startswith("encoder.conv_blocks.") for k in sd):
        return False
    return any(k in sd for k in (*_VAR_KEYS, *_VAE_KEYS))


def _require(sd: Mapping[str, torch.Tensor], keys: Iterable[str], kind: str, source: str) -> None:
    missing = [k for k in keys if k not in sd]
    if not missing:
        return
    if kind == "VAR" and all(k in sd for k in _VAE_KEYS):
        raise CheckpointError(f"{source}: this is a VQ-VAE checkpoint, not a VAR transformer (pass it as the VAE)")
    if kind == "VQ-VAE" and all(k in sd for k in _VAR_KEYS):
        raise CheckpointError(f"{source}: this is a VAR transformer checkpoint, not a VQ-VAE (pass it as the VAR)")
    raise missing_keys_error(sd, missing, kind, source)


def infer_var_config(
    sd: Mapping[str, torch.Tensor], patch_nums: tuple[int, ...] | None = None, source: str = "state dict"
) -> VARConfig:
    _require(sd, _VAR_KEYS, "VAR", source)
    C, Cvae = sd["word_embed.weight"].shape
    depth = len(key_indices(sd, r"blocks\.(\d+)\."))
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in sd
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if attn_l2_norm else max(1, C // 64)
    L, S = sd["pos_1LC"].shape[1], sd["lvl_embed.weight"].shape[0]
    schedule = _infer_patch_nums(sd, L, S, patch_nums, source)
    return VARConfig(
        depth=depth,
        embed_dim=C,
        num_heads=heads,
        mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C,
        num_classes=sd["class_emb.weight"].shape[0] - 1,
        vocab_size=sd["head.weight"].shape[0],
        z_channels=Cvae,
        patch_nums=schedule,
        shared_aln="shared_ada_lin.1.weight" in sd,
        attn_l2_norm=attn_l2_norm,
        drop_path_rate=0.1 * depth / 24,
    )


def _infer_patch_nums(
    sd: Mapping[str, torch.Tensor], L: int, S: int, given: tuple[int, ...] | None, source: str
) -> tuple[int, ...]:
    from_buffer = ScaleSchedule.from_level_ids(sd["lvl_1L"]) if "lvl_1L" in sd else None
    if given is not None:
        given = tuple(int(p) for p in given)
        if sum(p * p for p in given) != L or len(given) != S:
            raise CheckpointError(
                f"{source}: patch_nums={given} gives {len(given)} scales / "
                f"{sum(p * p for p in given)} tokens, but the checkpoint has {S} scales / {L} tokens"
            )
        if from_buffer is not None and from_buffer.patch_nums != given:
            raise CheckpointError(
                f"{source}: patch_nums={given} disagrees with the checkpoint's lvl_1L buffer ({from_buffer.patch_nums})"
            )
        return given
    if from_buffer is not None:
        return from_buffer.patch_nums
    if (L, S) in KNOWN_SCHEDULES:
        return KNOWN_SCHEDULES[(L, S)]
    raise CheckpointError(f"{source}: cannot infer patch_nums for {S} scales / {L} tokens; pass patch_nums=")


def infer_vae_config(
    sd: Mapping[str, torch.Tensor], patch_nums: tuple[int, ...] | None = None, source: str = "state dict"
) -> VQVAEConfig:
    _require(sd, _VAE_KEYS, "VQ-VAE", source)
    ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    vocab, z = sd["quantize.embedding.weight"].shape
    levels = key_indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        what = "a LlamaGen VQ tokenizer" if any(k.startswith("encoder.conv_blocks.") for k in sd) else "another model"
        raise CheckpointError(
            f"{source}: not a VAR VQ-VAE (no encoder.down.N blocks; it looks like {what}): pass VAR's vae_*.pth"
        )
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    n_res = len(key_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    shared_k = key_indices(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.weight")
    own_k = key_indices(sd, r"quantize\.quant_resi\.(\d+)\.weight")
    share, counts, ratio = 4, 0, OFFICIAL_PHI_RATIO
    if shared_k:
        share = len(shared_k)
    elif "quantize.quant_resi.qresi.weight" in sd:
        share = 1
    elif own_k:
        share, counts = 0, len(own_k)
    else:
        ratio = 0.0  # no Phi convs at all: identity refiners
    S_file = sd["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in sd else None
    if patch_nums is None:
        patch_nums = PATCH_NUMS_256 if S_file in (None, 10) else None
        if patch_nums is None:
            raise CheckpointError(f"{source}: VQ-VAE trained with {S_file} scales; pass patch_nums=")
    if share == 0 and counts == len(patch_nums):
        counts = 0
    using_sa = any(k.startswith(f"encoder.down.{levels[-1]}.attn.") for k in sd)
    try:
        return VQVAEConfig(
            vocab_size=vocab,
            z_channels=z,
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=n_res,
            in_channels=in_ch,
            using_sa=using_sa,
            using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
            quant_resi=ratio,
            share_quant_resi=share,
            default_qresi_counts=counts,
            quant_conv_ks=sd["quant_conv.weight"].shape[-1],
            patch_nums=tuple(patch_nums),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: unsupported VQ-VAE shape: {e}") from e


def check_pair(var_cfg: VARConfig, vae_cfg: VQVAEConfig, source: str = "") -> None:
    """A VAR only works with the VQ-VAE whose codebook it was trained on."""
    where = f"{source}: " if source else ""
    if (var_cfg.vocab_size, var_cfg.z_channels) != (vae_cfg.vocab_size, vae_cfg.z_channels):
        raise CheckpointError(
            f"{where}VAR and VQ-VAE are from different families: the VAR predicts {var_cfg.vocab_size} codes of "
            f"dim {var_cfg.z_channels}, the VQ-VAE has {vae_cfg.vocab_size} codes of dim {vae_cfg.z_channels}"
        )
    if var_cfg.patch_nums != vae_cfg.patch_nums:
        raise CheckpointError(f"{where}VAR patch_nums {var_cfg.patch_nums} != VQ-VAE patch_nums {vae_cfg.patch_nums}")


def load_into(
    model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, derived: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Strictly load ``sd`` into a (meta-device) ``model``; ``derived`` supplies recomputable buffers.

    Derived buffers present in ``sd`` must equal their recomputed value (they encode the config).
    """
    expected = model.state_dict()
    full = dict(sd)
    for name, value in (derived or {}).items():
        if name in full and not torch.equal(full[name].to(value.dtype), value):
            raise CheckpointError(f"{source}: buffer {name} does not match the inferred configuration")
        full[name] = value
    missing = [k for k in expected if k not in full]
    unexpected = [k for k in full if k not in expected]
    shapes = [
        f"{k} {tuple(full[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in full and full[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    if problems:
        raise CheckpointError(f"{source}: does not match the inferred model: " + "; ".join(problems))
    for k, v in expected.items():
        if full[k].dtype != v.dtype and not (full[k].is_floating_point() and v.is_floating_point()):
            raise CheckpointError(f"{source}: {k} has dtype {full[k].dtype}, expected {v.dtype}")
    model.load_state_dict(full, strict=True, assign=True)


def var_derived_buffers(cfg: VARConfig) -> dict[str, torch.Tensor]:
    sched = ScaleSchedule(cfg.patch_nums)
    out = {"lvl_1L": sched.level_ids(), "attn_bias_for_masking": sched.block_causal_bias()}
    out.update({f"blocks.{i}.attn.zero_k_bias": torch.zeros(cfg.embed_dim) for i in range(cfg.depth)})
    return out


def build_var(cfg: VARConfig, sd: Mapping[str, torch.Tensor], source: str) -> VAR:
    with torch.device("meta"):
        model = VAR(cfg)
    derived = var_derived_buffers(cfg)
    zero_bias = {k: v for k, v in sd.items() if k.endswith("attn.zero_k_bias")}
    if any(bool(v.any()) for v in zero_bias.values()):
        raise CheckpointError(f"{source}: a zero_k_bias buffer is not zero (k has no bias in VAR)")
    load_into(model, sd, source, derived)
    return model.eval()


def build_vae(cfg: VQVAEConfig, sd: Mapping[str, torch.Tensor], source: str) -> VQVAE:
    with torch.device("meta"):
        model = VQVAE(cfg)
    sd = dict(sd)
    key = "quantize.ema_vocab_hit_SV"
    S = len(cfg.patch_nums)
    if key not in sd or sd[key].shape != (S, cfg.vocab_size):
        if key in sd:
            # The official VQVAE.load_state_dict does the same: usage statistics are per scale, and one VAE file
            # serves both the 256 px and 512 px schedules.
            log.info(
                "%s: %s has shape %s, not (%d, %d); using fresh usage statistics",
                source,
                key,
                tuple(sd[key].shape),
                S,
                cfg.vocab_size,
            )
        sd[key] = torch.zeros(S, cfg.vocab_size)
    load_into(model, sd, source)
    return model.eval()


def load_official_var(path: str | Path, patch_nums: tuple[int, ...] | None = None) -> VAR:
    sd = read_state_dict(path)
    return build_var(infer_var_config(sd, patch_nums, str(path)), sd, str(path))


def load_official_vae(path: str | Path, patch_nums: tuple[int, ...] | None = None) -> VQVAE:
    sd = read_state_dict(path)
    return build_vae(infer_vae_config(sd, patch_nums, str(path)), sd, str(path))


def load_official_pair(
    var_path: str | Path, vae_path: str | Path, patch_nums: tuple[int, ...] | None = None
) -> tuple[VAR, VQVAE]:
    """Load a VAR and its VQ-VAE, checking they belong together."""
    var_sd = read_state_dict(var_path)
    var_cfg = infer_var_config(var_sd, patch_nums, str(var_path))
    vae_sd = read_state_dict(vae_path)
    vae_cfg = infer_vae_config(vae_sd, var_cfg.patch_nums, str(vae_path))
    check_pair(var_cfg, vae_cfg, f"{var_path} + {vae_path}")
    return build_var(var_cfg, var_sd, str(var_path)), build_vae(vae_cfg, vae_sd, str(vae_path))
