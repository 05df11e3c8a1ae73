"""Load the official LlamaGen release files (``c2i_*_256.pt`` / ``c2i_*_384.pt``, ``vq_ds16_c2i.pt``) unchanged.

Files are read with ``torch.load(weights_only=True)`` (no arbitrary pickles). The weights are taken from the same
places as the official ``sample_c2i.py``: ``checkpoint["model"]`` (DDP training files), ``["module"]``
(DeepSpeed), ``["state_dict"]``, or the file itself (FSDP's ``consolidated.pth``, ``--from-fsdp``); other
top-level entries (``optimizer``, ``steps``, ``ema``) are ignored. The configuration is inferred from tensor
shapes, and loading is strict: every expected key present with its shape, no unexpected key (the official script
loads the GPT with ``strict=False``, which silently keeps random weights for a renamed key). The only keys
dropped are derived state some code versions leave in a state dict: ``freqs_cis``, ``causal_mask`` and KV-cache
buffers (``layers.*.attention.kv_cache.*``, present when a model is saved after ``generate()``).

What no tensor shape determines comes from arguments: ``n_head`` (default: the release's heads for that width,
head dim 64 otherwise) and ``image_size`` (default: a ``_256`` / ``_384`` / ``_512`` file-name suffix, else 256;
it fixes the 2-D RoPE grid).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nextscale.errors import CheckpointError, ConfigError
from nextscale.models.llamagen import GPT_SHAPES, LlamaGen, LlamaGenConfig
from nextscale.models.tokenizers.vq import USAGE_BUFFER_SIZE, VQConfig, VQModel
from nextscale.models.torch_files import key_indices, load_torch_file, missing_keys_error
from nextscale.models.weights import load_into

log = logging.getLogger(__name__)

# Where sample_c2i.py looks for the weights, in its order; a file with none of them is a bare state dict.
WEIGHT_ENTRIES = ("model", "module", "state_dict")
DEFAULT_IMAGE_SIZE = 256
# Heads of the release models by width (GPT_models); other widths default to head dim 64.
RELEASE_HEADS = {dim: n_head for _, n_head, dim in GPT_SHAPES.values()}

_GPT_KEYS = (
    "cls_embedding.embedding_table.weight",
    "tok_embeddings.weight",
    "layers.0.attention.wqkv.weight",
    "layers.0.feed_forward.w1.weight",
    "norm.weight",
    "output.weight",
)
_VQ_KEYS = (
    "encoder.conv_in.weight",
    "encoder.conv_out.weight",
    "decoder.conv_out.weight",
    "quantize.embedding.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
)
_DERIVED_GPT_KEYS = re.compile(r"^(freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.[kv]_cache)$")
_SIZE_SUFFIX = re.compile(r"_(256|384|512)(?![0-9])")


# ---- reading -------------------------------------------------------------------------------------------------
def read_llamagen_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weight dict of an official file in any layout ``sample_c2i.py`` accepts; refuse pickled objects."""
    path = Path(path)
    obj = load_torch_file(path, "a training checkpoint with its argparse 'args'? save only checkpoint['model']")
    return unwrap_weights(obj, str(path))


# Keys only a LlamaGen GPT (c2i or t2i) or a LlamaGen VQ tokenizer file holds.
LLAMAGEN_KEYS = ("tok_embeddings.weight", "encoder.conv_blocks.0.res.0.conv1.weight")


def is_llamagen_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k in sd for k in LLAMAGEN_KEYS)


def unwrap_weights(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """``obj["model"]`` / ``["module"]`` / ``["state_dict"]`` (first present) or ``obj`` itself; tensors only."""
    if isinstance(obj, Mapping):
        for entry in WEIGHT_ENTRIES:
            if entry in obj:
                obj = obj[entry]
                source = f"{source}[{entry!r}]"
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: not a plain state dict; non-tensor entries: {', '.join(bad[:5])}")
    return dict(obj)


def _require(sd: Mapping[str, torch.Tensor], keys: tuple[str, ...], kind: str, source: str) -> None:
    missing = [k for k in keys if k not in sd]
    if not missing:
        return
    if kind == "GPT" and all(k in sd for k in _VQ_KEYS):
        raise CheckpointError(f"{source}: this is a LlamaGen VQ tokenizer checkpoint, not the GPT")
    if kind == "VQ" and all(k in sd for k in _GPT_KEYS):
        raise CheckpointError(f"{source}: this is a LlamaGen GPT checkpoint, not the VQ tokenizer")
    if kind == "GPT" and "cls_embedding.cap_proj.fc1.weight" in sd:
        raise CheckpointError(
            f"{source}: a text-to-image (t2i) LlamaGen GPT; only class-conditional (c2i) is supported"
        )
    if "word_embed.weight" in sd or "quantize.quant_resi.qresi_ls.0.weight" in sd:
        raise CheckpointError(f"{source}: this is a VAR checkpoint, not a LlamaGen {kind}")
    raise missing_keys_error(sd, missing, f"LlamaGen {kind}", source)


# ---- GPT -----------------------------------------------------------------------------------------------------
def image_size_from_name(path: str | Path) -> int | None:
    """256 / 384 / 512 from a release-style name (``c2i_L_384.pt``), else None."""
    found = _SIZE_SUFFIX.findall(Path(path).stem)
    return int(found[-1]) if found else None


def default_n_head(dim: int) -> int:
    """The release's heads for this width (GPT-3B: 32 heads of 100), else head dim 64."""
    if dim in RELEASE_HEADS:
        return RELEASE_HEADS[dim]
    return max(1, dim // 64)


def infer_llamagen_config(
    sd: Mapping[str, torch.Tensor],
    n_head: int | None = None,
    image_size: int | None = None,
    source: str = "state dict",
) -> LlamaGenConfig:
    """The GPT's config from its tensor shapes; ``n_head`` and ``image_size`` as documented in the module."""
    _require(sd, _GPT_KEYS, "GPT", source)
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = len(key_indices(sd, r"layers\.(\d+)\."))
    heads = default_n_head(dim) if n_head is None else int(n_head)
    if heads < 1 or dim % heads:
        raise CheckpointError(f"{source}: width {dim} is not divisible by n_head={heads}; pass the right n_head")
    head_dim = dim // heads
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    kv_rows = qkv_rows - dim
    if kv_rows <= 0 or kv_rows % (2 * head_dim):
        raise CheckpointError(
            f"{source}: wqkv has {qkv_rows} rows, which n_head={heads} (head dim {head_dim}) cannot split into "
            f"q [{dim}] + k + v; pass the right n_head"
        )
    n_kv = kv_rows // (2 * head_dim)
    try:
        return LlamaGenConfig(
            dim=dim,
            n_layer=n_layer,
            n_head=heads,
            n_kv_head=None if n_kv == heads else n_kv,
            ffn_hidden=sd["layers.0.feed_forward.w1.weight"].shape[0],
            vocab_size=vocab,
            # The class table has a null-class row whenever the model was trained with class dropout (always).
            num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1,
            image_size=DEFAULT_IMAGE_SIZE if image_size is None else int(image_size),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: unsupported LlamaGen GPT shape: {e}") from e


def build_llamagen_gpt(cfg: LlamaGenConfig, sd: Mapping[str, torch.Tensor], source: str) -> LlamaGen:
    """A strictly loaded model: every key present with its shape, nothing unexpected (derived state dropped)."""
    derived = [k for k in sd if _DERIVED_GPT_KEYS.match(k)]
    if derived:
        log.info("%s: ignoring derived entries %s", source, ", ".join(derived[:4]))
        sd = {k: v for k, v in sd.items() if k not in derived}
    with torch.device("meta"):
        model = LlamaGen(cfg)
    load_into(model, sd, source)
    return model.eval()


def load_llamagen_gpt(
    path: str | Path, n_head: int | None = None, image_size: int | None = None
) -> tuple[LlamaGen, LlamaGenConfig]:
    """Load an official c2i GPT file; ``image_size`` defaults to the file name's ``_256``/``_384`` suffix."""
    sd = read_llamagen_state_dict(path)
    if image_size is None:
        image_size = image_size_from_name(path)
    cfg = infer_llamagen_config(sd, n_head, image_size, str(path))
    return build_llamagen_gpt(cfg, sd, str(path)), cfg


# ---- VQ tokenizer ------------------------------------------------------------------------------------------------
def infer_vq_config(
    sd: Mapping[str, torch.Tensor], codebook_l2_norm: bool = True, source: str = "state dict"
) -> VQConfig:
    """The tokenizer's config from its shapes. ``codebook_l2_norm`` is in no shape (True in every release)."""
    _require(sd, _VQ_KEYS, "VQ", source)
    ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    enc_levels = key_indices(sd, r"encoder\.conv_blocks\.(\d+)\.")
    dec_levels = key_indices(sd, r"decoder\.conv_blocks\.(\d+)\.")
    if not enc_levels or not dec_levels:
        raise CheckpointError(f"{source}: no encoder/decoder conv_blocks in a LlamaGen VQ checkpoint")
    try:
        ch_mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in enc_levels)
        # Decoder levels are stored coarsest first.
        dec_mult = tuple(sd[f"decoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in dec_levels)[::-1]
    except KeyError as e:
        raise CheckpointError(f"{source}: missing {e.args[0]}") from e
    n_res = len(key_indices(sd, r"encoder\.conv_blocks\.0\.res\.(\d+)\."))
    N, D = sd["quantize.embedding.weight"].shape
    used = sd.get("quantize.codebook_used")
    if used is not None and used.shape != (USAGE_BUFFER_SIZE,):
        raise CheckpointError(
            f"{source}: quantize.codebook_used has shape {tuple(used.shape)}, not ({USAGE_BUFFER_SIZE},)"
        )
    try:
        return VQConfig(
            codebook_size=N,
            codebook_embed_dim=D,
            codebook_l2_norm=codebook_l2_norm,
            codebook_show_usage=used is not None,
            ch=ch,
            ch_mult=ch_mult,
            decoder_ch_mult=dec_mult,
            z_channels=sd["encoder.conv_out.weight"].shape[0],
            num_res_blocks=n_res,
            in_channels=in_ch,
            out_channels=sd["decoder.conv_out.weight"].shape[0],
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: unsupported LlamaGen VQ shape: {e}") from e


def build_llamagen_vq(cfg: VQConfig, sd: Mapping[str, torch.Tensor], source: str) -> VQModel:
    with torch.device("meta"):
        model = VQModel(cfg)
    load_into(model, sd, source)
    return model.eval()


def load_llamagen_vq(path: str | Path, codebook_l2_norm: bool = True) -> tuple[VQModel, VQConfig]:
    """Load an official VQ tokenizer file (``vq_ds16_c2i.pt``), strictly."""
    sd = read_llamagen_state_dict(path)
    cfg = infer_vq_config(sd, codebook_l2_norm, str(path))
    return build_llamagen_vq(cfg, sd, str(path)), cfg


def check_llamagen_pair(gpt_cfg: LlamaGenConfig, vq_cfg: VQConfig, source: str = "") -> None:
    """A GPT only works with the tokenizer whose codes it predicts, at that tokenizer's downsampling."""
    where = f"{source}: " if source else ""
    if gpt_cfg.vocab_size != vq_cfg.codebook_size:
        raise CheckpointError(
            f"{where}the GPT predicts {gpt_cfg.vocab_size} codes, the VQ tokenizer has {vq_cfg.codebook_size}"
        )
    if gpt_cfg.downsample != vq_cfg.downsample:
        raise CheckpointError(
            f"{where}the GPT expects a downsample-{gpt_cfg.downsample} tokenizer, this one downsamples by "
            f"{vq_cfg.downsample}"
        )
