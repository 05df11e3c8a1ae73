"""Load the official Infinity release files unchanged: the transformer (``infinity_2b_reg.pth``: a pickled state
dict; the 8B: a folder of safetensors shards with ``model.safetensors.index.json``) and the BSQ tokenizer
(``infinity_vae_d32reg.pth``: ``{"vae": state_dict}``, conv/norm keys with or without the ``.conv.``/``.norm.``
wrapper level).

Configurations are inferred from tensor shapes; loading is strict (every expected tensor present with its shape,
nothing unexpected) after the official loaders' own adjustments: ``Infinity.load_state_dict`` drops VAR-era
buffers and extends or truncates ``cfg_uncond`` to 512 rows (infinity.py:648-663); ``scale_mul_1H11`` may be
stored as [1, 1, H, 1] (customized flash-attn layout). Every failure is a one-line ``CheckpointError``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from nextscale.errors import CheckpointError, ConfigError
from nextscale.models.infinity import Infinity, InfinityConfig, official_uncond_rows
from nextscale.models.tokenizers.bsq import BSQVAE, BSQVAEConfig
from nextscale.models.torch_files import error_detail, key_indices, load_torch_file, missing_keys_error
from nextscale.models.weights import load_into, plain_state_dict

log = logging.getLogger(__name__)

TEXT_MAXLEN = 512  # load_infinity builds every model with text_maxlen=512
# Infinity.load_state_dict pops these (buffers of the VAR code base Infinity grew from); none is a model tensor.
VAR_ERA_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
_TRANSFORMER_KEYS = (
    "word_embed.weight",
    "cfg_uncond",
    "text_norm.weight",
    "text_proj_for_sos.ca.mat_q",
    "shared_ada_lin.1.weight",
    "head.weight",
)
_VAE_KEYS = ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out")
_MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")
_SHARD_INDEX = "model.safetensors.index.json"


# ---- transformer -------------------------------------------------------------------------------------------------
def read_infinity_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A transformer's tensors from a ``.pth`` state dict, a ``.safetensors`` file or a folder of shards."""
    path = Path(path)
    if path.is_dir():
        return _read_shards(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = load_torch_file(path, "only plain state dicts are accepted (a training checkpoint? export its weights first)")
    if isinstance(obj, Mapping) and isinstance(obj.get("vae"), Mapping):
        raise CheckpointError(f"{path}: this is a BSQ tokenizer checkpoint, not an Infinity transformer")
    return plain_state_dict(obj, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types for truncated/garbage files
        raise CheckpointError(f"{path}: not a readable safetensors file: {error_detail(e)}") from e


def _read_shards(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / _SHARD_INDEX
    if not index.is_file():
        raise CheckpointError(f"{folder}: a sharded checkpoint folder needs {_SHARD_INDEX}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (no weight_map): {error_detail(e)}") from e
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        sd.update(_read_safetensors(folder / shard))
    missing = [k for k in weight_map if k not in sd]
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} tensors listed but in no shard (e.g. {', '.join(missing[:3])})")
    return sd


def looks_like_infinity(sd: Mapping[str, torch.Tensor]) -> bool:
    return "cfg_uncond" in sd and "text_proj_for_sos.ca.mat_q" in sd


def _block_layout(sd: Mapping[str, torch.Tensor], source: str) -> tuple[int, int, str]:
    """(depth, block_chunks, prefix of block 0)."""
    chunks = key_indices(sd, r"block_chunks\.(\d+)\.module\.")
    if chunks:
        per = key_indices(sd, r"block_chunks\.0\.module\.(\d+)\.")
        return len(chunks) * len(per), len(chunks), "block_chunks.0.module.0."
    blocks = key_indices(sd, r"blocks\.(\d+)\.")
    if blocks:
        return len(blocks), 1, "blocks.0."
    raise CheckpointError(f"{source}: no transformer blocks (block_chunks.K.module.J.* or blocks.I.*)")


def infer_infinity_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> InfinityConfig:
    missing = [k for k in _TRANSFORMER_KEYS if k not in sd]
    if missing:
        if any(k.startswith(_VAE_KEYS) for k in sd):
            raise CheckpointError(f"{source}: this is a BSQ tokenizer checkpoint, not an Infinity transformer")
        raise missing_keys_error(sd, missing, "Infinity transformer", source)
    C, bits = sd["word_embed.weight"].shape
    depth, chunks, b0 = _block_layout(sd, source)
    for key in ("sa.scale_mul_1H11", "ffn.fc1.weight"):
        if b0 + key not in sd:
            raise CheckpointError(f"{source}: block 0 has no {b0 + key}")
    heads = sd[b0 + "sa.scale_mul_1H11"].numel()
    hidden = sd[b0 + "ffn.fc1.weight"].shape[0]
    mlp_ratio = 4.0 if round(C * 4.0 / 256) * 256 == hidden else hidden / C
    try:
        cfg = InfinityConfig(
            depth=depth,
            embed_dim=C,
            num_heads=heads,
            text_channels=sd["text_norm.weight"].shape[0],
            bits=bits,
            block_chunks=chunks,
            text_maxlen=TEXT_MAXLEN,
            mlp_ratio=mlp_ratio,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: unsupported Infinity shape: {e}") from e
    pool = tuple(sd["text_proj_for_sos.ca.mat_q"].shape)
    if pool != (1, cfg.pool_heads, C // cfg.pool_heads):
        raise CheckpointError(
            f"{source}: text_proj_for_sos.ca.mat_q is {pool}, expected {(1, cfg.pool_heads, C // cfg.pool_heads)}"
        )
    if cfg.mlp_hidden != hidden:
        raise CheckpointError(f"{source}: FFN width {hidden} is not round({C}*mlp_ratio/256)*256 for any ratio")
    return cfg


def build_infinity(cfg: InfinityConfig, sd: Mapping[str, torch.Tensor], source: str) -> Infinity:
    """A float32 ``Infinity`` from a state dict, after the official loader's adjustments."""
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k not in VAR_ERA_BUFFERS}
    uncond = sd.get("cfg_uncond")
    if uncond is not None and uncond.ndim == 2 and uncond.shape[0] != cfg.text_maxlen:
        n = uncond.shape[0]
        log.info(
            "%s: cfg_uncond has %d rows; adapting to %d as Infinity.load_state_dict does", source, n, cfg.text_maxlen
        )
        if n < cfg.text_maxlen:
            extra = official_uncond_rows(cfg.text_maxlen, cfg.text_channels)[n:].to(uncond)
            sd["cfg_uncond"] = torch.cat((uncond, extra))
        else:
            sd["cfg_uncond"] = uncond[: cfg.text_maxlen]
    H = cfg.num_heads
    for k, v in list(sd.items()):
        if k.endswith("sa.scale_mul_1H11") and tuple(v.shape) == (1, 1, H, 1):
            sd[k] = v.reshape(1, H, 1, 1)
    with torch.device("meta"):
        model = Infinity(cfg)
    derived = {name: torch.zeros(cfg.embed_dim) for name in model.derived_buffer_names()}
    load_into(model, sd, source, derived)
    return model.eval()


def load_official_infinity(path: str | Path) -> Infinity:
    """An official transformer file or shard folder -> ``Infinity`` (float32, eval)."""
    sd = read_infinity_state_dict(path)
    return build_infinity(infer_infinity_config(sd, str(path)), sd, str(path))


# ---- tokenizer ---------------------------------------------------------------------------------------------------
def read_bsq_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``vae`` entry of an official tokenizer file (or a plain state dict of one)."""
    path = Path(path)
    obj = load_torch_file(path, "the official tokenizer files hold only tensors; re-save it with torch.save")
    if isinstance(obj, Mapping) and isinstance(obj.get("vae"), Mapping):
        obj = obj["vae"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected {{'vae': state_dict}} or a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]} (expected {{'vae': state_dict}})")
    return dict(obj)


def _wrapped(sd: Mapping[str, torch.Tensor], module: str, param: str = "weight") -> torch.Tensor | None:
    """``module.conv.param``/``module.norm.param`` or the unwrapped ``module.param``."""
    for key in (f"{module}.conv.{param}", f"{module}.norm.{param}", f"{module}.{param}"):
        if key in sd:
            return sd[key]
    return None


def infer_bsq_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> BSQVAEConfig:
    conv_in, conv_out = _wrapped(sd, "encoder.conv_in"), _wrapped(sd, "encoder.conv_out")
    if conv_in is None or conv_out is None:
        if looks_like_infinity(sd):
            raise CheckpointError(f"{source}: this is an Infinity transformer checkpoint, not a BSQ tokenizer")
        raise missing_keys_error(
            sd, ["encoder.conv_in.conv.weight", "encoder.conv_out.conv.weight"], "BSQ tokenizer", source
        )
    base_ch, in_ch = conv_in.shape[:2]
    levels = key_indices(sd, r"encoder\.down\.(\d+)\.")
    mult = []
    for i in levels:
        w = _wrapped(sd, f"encoder.down.{i}.block.0.conv1")
        if w is None:
            raise CheckpointError(f"{source}: encoder level {i} has no block.0.conv1")
        mult.append(w.shape[0] // base_ch)
    downs = sum(1 for i in levels if _wrapped(sd, f"encoder.down.{i}.downsample.conv") is not None)
    if downs not in (3, 4):
        raise CheckpointError(
            f"{source}: the encoder downsamples {downs} times; Infinity tokenizers use 4 (f16) or 3 (f8)"
        )
    try:
        return BSQVAEConfig(
            bits=conv_out.shape[0],
            base_ch=base_ch,
            ch_mult=tuple(mult),
            num_res_blocks=len(key_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
            patch_size=2**downs,
            in_channels=in_ch,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: unsupported tokenizer shape: {e}") from e


_PARAM = re.compile(r"^(.*)\.(weight|bias)$")


def build_bsq_vae(cfg: BSQVAEConfig, sd: Mapping[str, torch.Tensor], source: str) -> BSQVAE:
    """A float32 ``BSQVAE``; keys without the wrapper level are mapped as the official ``load_cnn`` does."""
    with torch.device("meta"):
        model = BSQVAE(cfg)
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in _MASK_KEYS:  # BSQ's bit weights 2**(d-1..0): derivable, checked for the bit count
            if v.shape != (cfg.bits,):
                raise CheckpointError(
                    f"{source}: {k} has shape {tuple(v.shape)}, expected ({cfg.bits},) for {cfg.bits} bits"
                )
            continue
        name = k
        m = _PARAM.match(k)
        if k not in expected and m:
            for wrapper in ("conv", "norm"):
                if f"{m.group(1)}.{wrapper}.{m.group(2)}" in expected:
                    name = f"{m.group(1)}.{wrapper}.{m.group(2)}"
        out[name] = v.float() if v.is_floating_point() else v
    load_into(model, out, source)
    return model.eval()


def load_official_bsq_vae(path: str | Path) -> BSQVAE:
    sd = read_bsq_state_dict(path)
    return build_bsq_vae(infer_bsq_config(sd, str(path)), sd, str(path))


def check_infinity_pair(model_cfg: InfinityConfig, vae_cfg: BSQVAEConfig, source: str = "") -> None:
    """The transformer predicts the tokenizer's bits (x4 with spatial patchify)."""
    if model_cfg.bits != vae_cfg.token_bits:
        where = f"{source}: " if source else ""
        raise CheckpointError(
            f"{where}the transformer predicts {model_cfg.bits} bits per token but the tokenizer gives "
            f"{vae_cfg.token_bits} ({vae_cfg.bits} bits, patch {vae_cfg.patch_size})"
        )


def load_official_infinity_pair(model_path: str | Path, vae_path: str | Path) -> tuple[Infinity, BSQVAE]:
    sd = read_infinity_state_dict(model_path)
    cfg = infer_infinity_config(sd, str(model_path))
    vae_sd = read_bsq_state_dict(vae_path)
    vae_cfg = infer_bsq_config(vae_sd, str(vae_path))
    check_infinity_pair(cfg, vae_cfg, f"{model_path} + {vae_path}")
    return build_infinity(cfg, sd, str(model_path)), build_bsq_vae(vae_cfg, vae_sd, str(vae_path))
