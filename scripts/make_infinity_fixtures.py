"""Generate an ``infinity-official`` fixture set from the official FoundationVision/Infinity code.

Builds tiny checkpoints in the release layouts (transformer ``torch.save(OrderedDict)``, BSQ-VAE ``{"vae": ...}``,
a T5 encoder + tokenizer folder), loads them back through the official loaders and records what the official
code computes for them on CPU in float32. The official checkout is imported from ``--official`` after a small set
of stand-ins (no flash-attn, timm, torchvision, imageio, cv2, pandas or CUDA here); the README written next to the
arrays lists that patch set verbatim. Every output is byte-reproducible: run it twice and compare sha256sums.

    python scripts/make_infinity_fixtures.py --official /tmp/infinity-official --out tests/fixtures/infinity-official
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import math
import os
import platform
import shlex
import shutil
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OFFICIAL_FILES = (
    "infinity/models/__init__.py",
    "infinity/models/infinity.py",
    "infinity/models/basic.py",
    "infinity/models/fused_op.py",
    "infinity/models/flex_attn.py",
    "infinity/models/bitwise_self_correction.py",
    "infinity/models/bsq_vae/vae.py",
    "infinity/models/bsq_vae/flux_vqgan.py",
    "infinity/models/bsq_vae/multiscale_bsq.py",
    "infinity/models/bsq_vae/conv.py",
    "infinity/models/bsq_vae/dynamic_resolution.py",
    "infinity/utils/dynamic_resolution.py",
    "infinity/utils/dist.py",
    "tools/run_infinity.py",
)
PN_CHOICES = ("0.06M", "0.25M", "0.60M", "1M")

# Plain English words (plus a letter fallback) so that ordinary prompts map to real ids, not <unk>.
WORDS = (  # noqa: SIM905 - a word list reads best as text
    "a an the of in on at by with and to from under near next behind above is are "
    "sitting standing running flying swimming sleeping walking "
    "red orange yellow green blue white black brown gray golden dark bright "
    "old small big tall tiny quiet wooden stone glass "
    "blurry ugly low high quality detailed painting photo picture portrait "
    "fox dog cat bird horse fish bear lion rabbit owl man woman boy girl child "
    "house tree trees flower lake river sea mountain hill forest field garden "
    "city street road bridge car boat window door table "
    "sky cloud sun moon star snow rain water fire light night sunset "
    "winter summer day beach sand grass rock "
    "very beautiful"
).split()


# ---------------------------------------------------------------------------------------------------------------
# CPU patch set. These definitions are copied verbatim into the README (inspect.getsource), so keep them plain.


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    raise RuntimeError("flash_attn_func is not available in the CPU stand-in (the official inference never calls it)")


def flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        q_b = q[qs:qe].float().transpose(0, 1)  # [H, Lq, c]
        k_b = kv[ks:ke, 0].float().transpose(0, 1)  # [H, Lk, c]
        v_b = kv[ks:ke, 1].float().transpose(0, 1)
        p = torch.softmax((q_b @ k_b.transpose(-1, -2)) * softmax_scale, dim=-1)
        out[qs:qe] = (p @ v_b).transpose(0, 1).to(q.dtype)
    return out


class DropPath(torch.nn.Module):
    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


def drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):
    return x


def register_model(fn):
    return fn


class SoftTargetCrossEntropy(torch.nn.Module):
    pass


def to_tensor(pic):
    raise RuntimeError("torchvision stand-in: to_tensor is only used by the official image-editing helpers")


def identity_compile(model=None, **kwargs):
    if model is None:
        return lambda fn: fn
    return model


def identity_cuda(self, *args, **kwargs):
    return self


def install_cpu_patches() -> None:
    torch.compile = identity_compile
    torch.Tensor.cuda = identity_cuda
    torch.nn.Module.cuda = identity_cuda

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    module(
        "flash_attn", flash_attn_func=flash_attn_func, flash_attn_varlen_kvpacked_func=flash_attn_varlen_kvpacked_func
    )
    layers = module("timm.models.layers", DropPath=DropPath, drop_path=drop_path)
    models = module("timm.models", register_model=register_model, layers=layers)
    loss = module("timm.loss", SoftTargetCrossEntropy=SoftTargetCrossEntropy)
    module("timm", models=models, loss=loss)
    module("imageio")
    functional = module("torchvision.transforms.functional", to_tensor=to_tensor)
    transforms = module("torchvision.transforms", functional=functional)
    module("torchvision", transforms=transforms)
    module("cv2")
    module("pandas")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _pos_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _pos_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--official", required=True, type=Path, help="export of FoundationVision/Infinity (commit 4c27bbb)")
    p.add_argument("--official-rev", default="4c27bbb", help="label recorded in the manifest (default 4c27bbb)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; existing files are replaced)")
    p.add_argument("--name", default=None, help="fixture set name in README/manifest (default: the folder name)")
    p.add_argument("--depth", type=_pos_int, default=2)
    p.add_argument("--width", type=_pos_int, default=64, help="transformer width C (= cond width D)")
    p.add_argument("--heads", type=_pos_int, default=4)
    p.add_argument("--block-chunks", type=_pos_int, default=2, help="must divide depth and be > 1")
    p.add_argument("--text-width", type=_pos_int, default=256, help="T5 d_model = Ct5 (a multiple of 128)")
    p.add_argument("--pn", default="0.06M", choices=PN_CHOICES)
    p.add_argument("--h-div-w", type=_pos_float, default=1.0, help="aspect ratio; the nearest template is used")
    p.add_argument("--vae-bits", type=_pos_int, default=16, help="BSQ codebook dim (bits per latent pixel)")
    p.add_argument("--patchify", type=int, default=0, choices=(0, 1), help="1 = the 8B's f8 VAE + 2x2 patchify")
    p.add_argument("--vae-base-ch", type=_pos_int, default=24, help="replaces the hard-coded base_ch=128")
    p.add_argument("--vae-ch-mult", type=_int_list, default=None, help="default 1,1,1,1,1 (1,1,1,1 with --patchify)")
    p.add_argument("--vae-key-style", choices=("wrapped", "unwrapped"), default="wrapped")
    p.add_argument(
        "--text-encoder-from", type=Path, default=None, help="reuse DIR/tokenizer and DIR/text_encoder (not copied)"
    )
    p.add_argument("--t5-layers", type=_pos_int, default=2)
    p.add_argument("--t5-heads", type=_pos_int, default=2)
    p.add_argument("--t5-d-kv", type=_pos_int, default=8)
    p.add_argument("--t5-d-ff", type=_pos_int, default=16)
    p.add_argument("--head-gain", type=_pos_float, default=1.0, help="std of head.weight is gain/sqrt(C)")
    p.add_argument(
        "--uncond-rows", type=_pos_int, default=512, help="cfg_uncond rows stored in infinity.pth (< 512: a short file)"
    )
    p.add_argument("--vae-seed-candidates", type=_pos_int, default=16, help="VAE redraws tried (largest bit margin)")
    p.add_argument("--full-image", type=int, default=1, choices=(0, 1), help="store run a's uint8 image 0 in full")
    p.add_argument("--seed", type=int, default=0, help="base seed of every generator")
    p.add_argument("--threads", type=_pos_int, default=1, help="torch threads (the committed sets use 1)")
    p.add_argument("--readme-note", default="", help="paragraph added to the README introduction")
    p.add_argument("--runs", default="all", help="comma-separated subset of a,b,c,d,e,f,g (default all)")
    p.add_argument("--prompt", action="append", default=None, help="prompt (give twice; defaults are built in)")
    p.add_argument("--negative-prompt", default="blurry, dark, low quality picture")
    args = p.parse_args(argv)

    def fail(msg):
        p.error(msg)

    if not (args.official / "infinity" / "models" / "infinity.py").is_file():
        fail(f"--official {args.official} does not contain infinity/models/infinity.py")
    if args.block_chunks < 2 or args.depth % args.block_chunks:
        fail(f"--block-chunks {args.block_chunks} must be > 1 and divide --depth {args.depth}")
    if args.width % args.heads or (args.width // args.heads) % 4:
        fail(f"--width {args.width} / --heads {args.heads} must give a head dim divisible by 4 (2-D RoPE)")
    if round(args.width * 4 / 256) * 256 == 0:
        fail(f"--width {args.width} gives an empty FFN (hidden = round(4C/256)*256); use C >= 64")
    if args.text_width % 128:
        fail(f"--text-width {args.text_width} must be a multiple of 128 (attentive pool heads = Ct5 // 128)")
    if args.text_encoder_from is not None and not (args.text_encoder_from / "text_encoder" / "config.json").is_file():
        fail(f"--text-encoder-from {args.text_encoder_from} has no text_encoder/config.json")
    if args.vae_ch_mult is None:
        args.vae_ch_mult = [1, 1, 1, 1] if args.patchify else [1, 1, 1, 1, 1]
    if len(args.vae_ch_mult) != (4 if args.patchify else 5):
        fail(f"--vae-ch-mult needs {4 if args.patchify else 5} levels for patch size {8 if args.patchify else 16}")
    for m in args.vae_ch_mult:
        ch = args.vae_base_ch * m
        if ch % 32 and ch % 24:
            fail(f"VAE channels {ch} (= base {args.vae_base_ch} x {m}) must be a multiple of 32 or 24 (GroupNorm)")
    if args.vae_base_ch % 32 and args.vae_base_ch % 24:
        fail(f"--vae-base-ch {args.vae_base_ch} must be a multiple of 32 or 24 (GroupNorm)")
    runs = sorted(set(args.runs.split(","))) if args.runs != "all" else list("abcdefg")
    if any(r not in "abcdefg" or len(r) != 1 for r in runs):
        fail(f"--runs {args.runs!r}: use letters a..g")
    if args.uncond_rows > 512:
        fail(f"--uncond-rows {args.uncond_rows} must be at most 512 (text_maxlen)")
    args.runs = runs
    if args.prompt is None:
        args.prompt = [
            "a red fox sitting in the snow",
            "a photo of an old wooden house next to a quiet lake at sunset, with tall green trees and a small "
            "white boat on the water",
        ]
    if len(args.prompt) != 2:
        fail("--prompt must be given exactly twice (or not at all)")
    args.name = args.name or args.out.name
    return args


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_np(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().cpu()
    if t.dtype in (torch.bool, torch.uint8):
        return t.numpy().astype(np.uint8)
    if t.dtype in (torch.int32, torch.int64, torch.float32, torch.float64):
        return t.numpy()
    if t.dtype in (torch.int8, torch.int16):
        return t.numpy().astype(np.int64)
    return t.float().numpy()


class NpzWriter:
    """Collects arrays per file, writes compressed .npz files (zip entries carry a fixed 1980 timestamp)."""

    def __init__(self, out: Path):
        self.out = out
        self.files: dict[str, dict[str, np.ndarray]] = OrderedDict()
        self.docs: dict[str, dict[str, str]] = OrderedDict()

    def add(self, file: str, name: str, value, doc: str) -> np.ndarray:
        arr = np.ascontiguousarray(to_np(value) if not np.isscalar(value) else np.asarray(value))
        if arr.dtype == np.float64 and not name.endswith(("_sum", "_sumsq")):
            arr = arr.astype(np.float32)
        self.files.setdefault(file, OrderedDict())[name] = arr
        self.docs.setdefault(file, OrderedDict())[name] = doc
        return arr

    def write(self) -> None:
        for file, arrays in self.files.items():
            np.savez_compressed(self.out / file, **arrays)


def image_inputs(height: int, width: int) -> np.ndarray:
    """Two deterministic RGB test images [2, 3, H, W] uint8 (identical to var-official/images.npz at 256x256)."""
    y, x = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    img = np.zeros((2, 3, height, width), dtype=np.float64)
    img[0, 0] = 255 * x / (width - 1)
    img[0, 1] = 255 * y / (height - 1)
    disc = ((x - 0.5 * width) / (0.3 * width)) ** 2 + ((y - 0.4 * height) / (0.3 * height)) ** 2 < 1
    img[0, 2] = np.where(disc, 230.0, 25.0)
    img[1, 0] = 127.5 + 127.5 * np.sin(2 * np.pi * (3 * x / width + 2 * y / height))
    img[1, 1] = 127.5 + 127.5 * np.cos(2 * np.pi * (5 * x / width - y / height))
    img[1, 2] = np.where((np.floor(8 * x / width) + np.floor(8 * y / height)) % 2 == 1, 255.0, 0.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Parameter redraw. Each function overwrites every parameter and returns {name: rule} for the README.


def _normal(gen, shape, std, mean=0.0):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def redraw_transformer(model, gen, Ct5: int, head_gain: float) -> dict[str, str]:
    rules: dict[str, str] = OrderedDict()
    for name, p in model.named_parameters():
        fan_in = p.shape[1] if p.ndim == 2 else None
        if name == "cfg_uncond":
            rule, val = "N(0,1)/sqrt(Ct5)", _normal(gen, p.shape, 1 / math.sqrt(Ct5))
        elif name in ("pos_start", "lvl_embed.weight"):
            rule, val = "N(0,0.5^2)", _normal(gen, p.shape, 0.5)
        elif name.endswith("text_norm.weight") or name.endswith("ca_norm.weight"):
            rule, val = "1+N(0,0.1^2)", _normal(gen, p.shape, 0.1, 1.0)
        elif name.endswith("ca_norm.bias"):
            rule, val = "N(0,0.05^2)", _normal(gen, p.shape, 0.05)
        elif name.endswith("mat_q") and p.ndim == 3:
            rule, val = "N(0,1)", _normal(gen, p.shape, 1.0)
        elif name.endswith(("q_bias", "v_bias")):
            rule, val = "N(0,0.1^2)", _normal(gen, p.shape, 0.1)
        elif name.endswith("scale_mul_1H11"):
            val = _normal(gen, p.shape, 0.5, math.log(4.0))
            if name.startswith("block_chunks.0.module.0."):
                val.view(-1)[0] = 5.0  # > ln(100) = 4.605: the official clamp_max must bite
            rule = "ln(4)+N(0,0.5^2); block 0 head 0 set to 5.0 (> ln 100, clamped)"
        elif name.endswith("ada_gss"):
            rule, val = "N(0,0.2^2)", _normal(gen, p.shape, 0.2)
        elif name == "head.weight":
            rule, val = f"N(0,{head_gain:g}^2/C)", _normal(gen, p.shape, head_gain / math.sqrt(fan_in))
        elif name.endswith(("shared_ada_lin.1.weight", "head_nm.ada_lin.1.weight")):
            rule, val = "N(0,0.25/fan_in)", _normal(gen, p.shape, 0.5 / math.sqrt(fan_in))
        elif p.ndim == 2:
            rule, val = "N(0,1/fan_in)", _normal(gen, p.shape, 1 / math.sqrt(fan_in))
        elif name.endswith(".bias"):
            rule, val = "N(0,0.05^2)", _normal(gen, p.shape, 0.05)
        else:
            raise RuntimeError(f"no redraw rule for transformer parameter {name} {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(val)
        rules[name] = rule
    return rules


def redraw_vae(vae, gen) -> dict[str, str]:
    rules: dict[str, str] = OrderedDict()
    for name, p in vae.named_parameters():
        if p.ndim == 4:
            fan_in = p.shape[1] * p.shape[2] * p.shape[3]
            gain = 0.5 if name.startswith("decoder.conv_out.") else 1.0
            rule = "N(0,0.25/fan_in)" if gain != 1.0 else "N(0,1/fan_in)"
            val = _normal(gen, p.shape, gain / math.sqrt(fan_in))
        elif ".norm." in name and name.endswith(".weight"):
            rule, val = "1+N(0,0.1^2)", _normal(gen, p.shape, 0.1, 1.0)
        elif name.endswith(".bias"):
            rule, val = "N(0,0.05^2)", _normal(gen, p.shape, 0.05)
        else:
            raise RuntimeError(f"no redraw rule for VAE parameter {name} {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(val)
        rules[name] = rule
    return rules


def redraw_t5(model, gen) -> dict[str, str]:
    rules: dict[str, str] = OrderedDict()
    d_kv = model.config.d_kv
    for name, p in model.named_parameters():
        if name == "shared.weight":
            rule, val = "N(0,1)", _normal(gen, p.shape, 1.0)
        elif name.endswith("relative_attention_bias.weight"):
            rule, val = "N(0,0.5^2)", _normal(gen, p.shape, 0.5)
        elif "layer_norm" in name:
            rule, val = "1+N(0,0.1^2)", _normal(gen, p.shape, 0.1, 1.0)
        elif name.endswith(".q.weight"):
            rule, val = "N(0,1/(fan_in*d_kv))", _normal(gen, p.shape, 1 / math.sqrt(p.shape[1] * d_kv))
        elif p.ndim == 2:
            rule, val = "N(0,1/fan_in)", _normal(gen, p.shape, 1 / math.sqrt(p.shape[1]))
        else:
            raise RuntimeError(f"no redraw rule for T5 parameter {name} {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(val)
        rules[name] = rule
    return rules


def unwrap_vae_keys(sd: dict) -> OrderedDict:
    """The other key style load_cnn accepts: plain nn.Conv2d/nn.GroupNorm keys without the .conv/.norm wrapper."""
    out = OrderedDict()
    for k, v in sd.items():
        for wrapper in (".conv.", ".norm."):
            head, sep, tail = k.rpartition(wrapper)
            if sep and tail in ("weight", "bias"):
                k = f"{head}.{tail}"
                break
        out[k] = v
    return out


def save_torch(obj, path: Path) -> None:
    # torch.save's zip writer stores no timestamps; the record names derive from the file stem, so the same
    # object saved under the same name gives the same bytes.
    torch.save(obj, path)


# ---------------------------------------------------------------------------------------------------------------
# The generator


class Recorder:
    """Captures what autoregressive_infer_cfg computes: the module-level sampler, lfq.indices_to_codes, a
    word_embed forward hook and vae.decode are wrapped for the duration of one call."""

    def __init__(self, IM, model, vae):
        self.IM, self.model, self.vae = IM, model, vae
        self.sampler = IM.sample_with_top_k_top_p_also_inplace_modifying_logits_
        self.lfq_itc = vae.quantizer.lfq.indices_to_codes
        self.decode = vae.decode
        self.clear()

    def clear(self):
        self.logits, self.bits, self.vae_bits, self.nxt = [], [], [], []
        self.decode_in, self.decode_out = None, None
        self.text = {}

    @contextlib.contextmanager
    def active(self, capture_text=False):
        self.clear()
        rec = self

        def sampler(logits_BlV, top_k=0, top_p=0.0, rng=None, num_samples=1):
            rec.logits.append(logits_BlV.detach().clone())
            idx = rec.sampler(logits_BlV, top_k=top_k, top_p=top_p, rng=rng, num_samples=num_samples)
            rec.bits.append(idx[:, :, 0].clone())
            return idx

        def itc(indices, label_type="int_label", project_out=True):
            rec.vae_bits.append(indices.detach().clone())
            return rec.lfq_itc(indices, label_type=label_type, project_out=project_out)

        def decode(z):
            rec.decode_in = z.detach().clone()
            out = rec.decode(z)
            rec.decode_out = out.detach().clone()
            return out

        handles = [self.model.word_embed.register_forward_hook(lambda m, i, o: rec.nxt.append(i[0].detach().clone()))]
        if capture_text:
            m = self.model

            def keep(key):
                def hook(mod, inp, out):
                    rec.text[key] = out.detach().clone()

                return hook

            handles += [
                m.text_norm.register_forward_hook(keep("text_norm")),
                m.text_proj_for_sos.register_forward_hook(keep("pool")),
                m.text_proj_for_ca.register_forward_hook(keep("text_proj_for_ca")),
                m.shared_ada_lin.register_forward_hook(keep("shared_ada_lin")),
            ]
        self.IM.sample_with_top_k_top_p_also_inplace_modifying_logits_ = sampler
        self.vae.quantizer.lfq.indices_to_codes = itc
        self.vae.decode = decode
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.IM.sample_with_top_k_top_p_also_inplace_modifying_logits_ = self.sampler
            del self.vae.quantizer.lfq.indices_to_codes
            del self.vae.decode


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    for mod in ("einops", "pytz"):
        try:
            __import__(mod)
        except ImportError:
            sys.exit(f"error: the official code needs the '{mod}' package (pip install {mod})")

    # transformers probes for torchvision at import time: import it before the stand-ins exist.
    import transformers
    from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    install_cpu_patches()
    sys.path.insert(0, str(args.official.resolve()))
    with contextlib.redirect_stdout(io.StringIO()):
        import infinity.models.bsq_vae.vae as official_vae
        import infinity.models.infinity as IM
        import tools.run_infinity as RI
        from infinity.models.bitwise_self_correction import BitwiseSelfCorrection
        from infinity.utils.dynamic_resolution import dynamic_resolution_h_w, h_div_w_templates

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for child in out.iterdir():  # other sub-folders are separate fixture sets (e.g. patchify/): keep them
        if child.is_file():
            child.unlink()
        elif child.name in ("text_encoder", "tokenizer"):
            shutil.rmtree(child)
    npz = NpzWriter(out)
    observed: dict = OrderedDict()
    quiet = contextlib.redirect_stdout(io.StringIO())

    # ---- schedule -------------------------------------------------------------------------------------------
    template = float(h_div_w_templates[np.argmin(np.abs(h_div_w_templates - args.h_div_w))])
    scale_schedule = [(1, h, w) for (_, h, w) in dynamic_resolution_h_w[template][args.pn]["scales"]]
    f = 2 if args.patchify else 1
    vae_scale_schedule = [(1, f * h, f * w) for (_, h, w) in scale_schedule]
    n_scales = len(scale_schedule)
    patch_size = 8 if args.patchify else 16
    img_h, img_w = vae_scale_schedule[-1][1] * patch_size, vae_scale_schedule[-1][2] * patch_size
    tokens_per_scale = [h * w for (_, h, w) in scale_schedule]
    L = sum(tokens_per_scale)
    d_vae = args.vae_bits
    d_tok = d_vae * (4 if args.patchify else 1)
    npz.add("schedule.npz", "scale_schedule", np.array(scale_schedule, dtype=np.int64), "(t,h,w) token grid per scale")
    npz.add(
        "schedule.npz",
        "vae_scale_schedule",
        np.array(vae_scale_schedule, dtype=np.int64),
        "(t,h,w) latent grid per scale (2x the token grid with --patchify 1)",
    )

    # ---- text encoder + tokenizer ---------------------------------------------------------------------------
    t5_rules: dict[str, str] = {}
    if args.text_encoder_from is None:
        tok_dir, enc_dir = out / "tokenizer", out / "text_encoder"
        t5_rules = build_text_encoder(args, tok_dir, enc_dir, T5Config, T5EncoderModel, T5TokenizerFast)
    else:
        tok_dir, enc_dir = args.text_encoder_from / "tokenizer", args.text_encoder_from / "text_encoder"
    # What the official load_tokenizer does, minus fp16 and .to('cuda') (T5 in fp32 on the CPU).
    text_tokenizer = AutoTokenizer.from_pretrained(tok_dir, revision=None, legacy=True)
    text_tokenizer.model_max_length = 512
    text_encoder = T5EncoderModel.from_pretrained(enc_dir, dtype=torch.float32).eval()
    text_encoder.requires_grad_(False)
    if text_encoder.config.d_model != args.text_width:
        sys.exit(f"error: --text-width {args.text_width} but {enc_dir} has d_model {text_encoder.config.d_model}")
    observed["t5_attn_implementation"] = text_encoder.config._attn_implementation
    t5_eager = T5EncoderModel.from_pretrained(enc_dir, dtype=torch.float32, attn_implementation="eager").eval()

    prompts = {"p0": args.prompt[0], "p1": args.prompt[1], "neg": args.negative_prompt}
    text = {}
    eager_diff = 0.0
    for key, prompt in prompts.items():
        with quiet:
            kv, lens, cu, lmax = RI.encode_prompt(text_tokenizer, text_encoder, prompt)
            eager_diff = max(
                eager_diff, (RI.encode_prompt(text_tokenizer, t5_eager, prompt)[0] - kv).abs().max().item()
            )
        toks = text_tokenizer(text=[prompt], max_length=512, padding="max_length", truncation=True, return_tensors="pt")
        text[key] = (kv, lens, cu, lmax)
        npz.add("text.npz", f"{key}_input_ids", toks.input_ids[0], f"{key}: tokenizer ids, padded to 512 (pad 0)")
        npz.add("text.npz", f"{key}_attention_mask", toks.attention_mask[0], f"{key}: attention mask [512]")
        npz.add(
            "text.npz", f"{key}_kv_compact", kv, f"{key}: encode_prompt kv_compact [len, Ct5] (T5 last_hidden_state)"
        )
        npz.add("text.npz", f"{key}_lens", np.array(lens, dtype=np.int64), f"{key}: lens = mask.sum [1]")
        npz.add("text.npz", f"{key}_cu_seqlens", cu, f"{key}: cu_seqlens_k int32 [2]")
        if max(lens) >= 512:
            raise RuntimeError(f"prompt {key} is truncated; use a shorter prompt")
    observed["t5_sdpa_vs_eager_max_abs_diff"] = float(f"{eager_diff:.3g}")
    del t5_eager

    def batch(keys):
        kvs = [text[k][0] for k in keys]
        lens = [ln for k in keys for ln in text[k][1]]
        cu = F.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return torch.cat(kvs, 0), lens, cu, max(lens)

    pair = batch(["p0", "p1"])
    npz.add("text.npz", "pair_lens", np.array(pair[1], dtype=np.int64), "[len0, len1]")
    npz.add("text.npz", "pair_cu_seqlens", pair[2], "int32 [0, len0, len0+len1]")

    # ---- VAE ------------------------------------------------------------------------------------------------
    base_ch = args.vae_base_ch
    real_autoencoder = official_vae.AutoEncoder

    def small_autoencoder(vae_args):
        vae_args.base_ch = base_ch  # vae_model hard-codes base_ch=128
        return real_autoencoder(vae_args)

    official_vae.AutoEncoder = small_autoencoder
    vae_kw = dict(
        schedule_mode="dynamic",
        codebook_dim=d_vae,
        codebook_size=2**d_vae,
        patch_size=patch_size,
        encoder_ch_mult=list(args.vae_ch_mult),
        decoder_ch_mult=list(args.vae_ch_mult),
        test_mode=True,
    )
    images_u8 = image_inputs(img_h, img_w)
    npz.add("images.npz", "images_u8", images_u8, "[2,3,H,W] RGB test images (formula in README)")
    inp = torch.from_numpy(images_u8).float() / 128 - 1
    vae_build = official_vae.vae_model(None, **vae_kw)
    # Random weights put some encoder bits close to a tie; keep the redraw whose smallest margin is largest.
    candidates = []
    for i in range(args.vae_seed_candidates):
        redraw_vae(vae_build, torch.Generator().manual_seed(args.seed + 1000 + i))
        with torch.no_grad():
            raw = vae_build.encode_for_raw_features(inp, scale_schedule=vae_scale_schedule)[0]
            candidates.append((min(vae_bit_margins(vae_build, raw, vae_scale_schedule)), i))
    vae_seed = args.seed + 1000 + max(candidates)[1]
    observed["vae_seed_candidates_min_margin"] = [float(f"{m:.3g}") for m, _ in candidates]
    observed["vae_param_seed"] = vae_seed
    vae_rules = redraw_vae(vae_build, torch.Generator().manual_seed(vae_seed))
    vae_sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in vae_build.state_dict().items())
    vae_file = "vae.pth"
    saved_vae_sd = vae_sd if args.vae_key_style == "wrapped" else unwrap_vae_keys(vae_sd)
    save_torch({"vae": saved_vae_sd}, out / vae_file)
    vae = official_vae.vae_model(str(out / vae_file), **vae_kw)
    for k, v in vae.state_dict().items():
        if not torch.equal(v, vae_sd[k]):
            raise RuntimeError(f"official vae_model did not load {k} from {vae_file}")

    # ---- transformer ----------------------------------------------------------------------------------------
    model_kwargs = dict(
        depth=args.depth,
        embed_dim=args.width,
        num_heads=args.heads,
        drop_path_rate=0.1,
        mlp_ratio=4,
        block_chunks=args.block_chunks,
    )
    load_kw = dict(
        rope2d_each_sa_layer=1,
        rope2d_normalized_by_hw=2,
        use_scale_schedule_embedding=0,
        pn=args.pn,
        use_bit_label=1,
        add_lvl_embeding_only_first_block=1,
        scale_schedule=None,
        vae=vae,
        device="cpu",
        model_kwargs=model_kwargs,
        text_channels=args.text_width,
        apply_spatial_patchify=args.patchify,
        use_flex_attn=False,
        bf16=False,
        checkpoint_type="torch",
    )
    # The constructor call of load_infinity (tools/run_infinity.py) without the weight loading.
    with quiet:
        build = IM.Infinity(
            vae_local=vae,
            text_channels=args.text_width,
            text_maxlen=512,
            shared_aln=True,
            raw_scale_schedule=None,
            checkpointing="full-block",
            customized_flash_attn=False,
            fused_norm=True,
            pad_to_multiplier=128,
            use_flex_attn=False,
            add_lvl_embeding_only_first_block=1,
            use_bit_label=1,
            rope2d_each_sa_layer=1,
            rope2d_normalized_by_hw=2,
            pn=args.pn,
            apply_spatial_patchify=args.patchify,
            inference_mode=True,
            train_h_div_w_list=[1.0],
            **model_kwargs,
        )
    model_rules = redraw_transformer(
        build, torch.Generator().manual_seed(args.seed + 1), args.text_width, args.head_gain
    )
    model_sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in build.state_dict().items())
    del build
    model_file = "infinity.pth"
    rows = args.uncond_rows
    saved_sd = OrderedDict((k, v[:rows].clone() if k == "cfg_uncond" else v) for k, v in model_sd.items())
    save_torch(saved_sd, out / model_file)
    with quiet:
        model = RI.load_infinity(model_path=str(out / model_file), **load_kw)
    # A short cfg_uncond is extended by Infinity.load_state_dict with the model's own init rows:
    # trunc_normal_(std=1.2, a=-2, b=2) on a CPU generator seeded 0, then divided by sqrt(Ct5).
    official_init = torch.empty(512, args.text_width)
    torch.nn.init.trunc_normal_(official_init, std=1.2, generator=torch.Generator(device="cpu").manual_seed(0))
    official_init /= args.text_width**0.5
    expected = OrderedDict(model_sd)
    expected["cfg_uncond"] = torch.cat([model_sd["cfg_uncond"][:rows], official_init[rows:]])
    for k, v in model.state_dict().items():
        if not torch.equal(v, expected[k]):
            raise RuntimeError(f"official load_infinity did not load {k} from {model_file} as expected")
    if rows < 512:
        longest = max(max(t[1]) for t in text.values())
        npz.add(
            "schedule.npz",
            "cfg_uncond_loaded",
            model.cfg_uncond[:longest],
            f"cfg_uncond rows 0..{longest - 1} after the official load (rows >= {rows} are the official init)",
        )

    # The table under this schedule's key is the one built for the template's 1M schedule (all pn share it);
    # a schedule only ever reads its first L rows, padded to a multiple of 128 by Infinity.forward.
    rope = model.rope2d_freqs_grid[str(tuple(scale_schedule))]
    L_pad = -(-L // 128) * 128
    observed["rope_table_rows"] = int(rope.shape[-2])
    npz.add(
        "schedule.npz",
        "rope2d_freqs_grid",
        rope.reshape(2, rope.shape[-2], rope.shape[-1])[:, :L_pad],
        f"rope2d_freqs_grid[str(schedule)] squeezed, rows 0..{L_pad - 1}: [cos|sin, rows, head_dim/2]",
    )

    # ---- VAE encode / decode ---------------------------------------------------------------------------------
    with torch.no_grad():
        h_enc, z, _, all_bits, _, _ = vae.encode(inp, scale_schedule=vae_scale_schedule)
        raw, _, _ = vae.encode_for_raw_features(inp, scale_schedule=vae_scale_schedule)
        bsc = BitwiseSelfCorrection(
            vae,
            argparse.Namespace(
                noise_apply_layers=0,
                noise_apply_requant=0,
                noise_apply_strength=0.0,
                apply_spatial_patchify=args.patchify,
                debug_bsc=0,
            ),
        )
        x_BLC_wo_prefix, gt_ms_idx_Bl = bsc.flip_requant(vae_scale_schedule, inp, raw, "cpu")
        recon = vae.decode(z)
    if not torch.equal(raw, h_enc):
        raise RuntimeError("encode_for_raw_features differs from encode's h")
    vae_bits = torch.cat([b.reshape(2, -1, d_vae) for b in all_bits], 1)
    tok_bits = torch.cat(gt_ms_idx_Bl, 1)
    margins = vae_bit_margins(vae, raw, vae_scale_schedule)
    observed["vae_encode_min_bit_margin_per_scale"] = [float(f"{m:.3g}") for m in margins]
    npz.add("vae_encode.npz", "h", h_enc, "encoder output (raw features) [2, d_vae, Hv, Wv]")
    npz.add(
        "vae_encode.npz",
        "bits_vae",
        vae_bits.to(torch.uint8),
        "vae.encode bit labels, scales concatenated [2, sum hv*wv, d_vae]",
    )
    npz.add(
        "vae_encode.npz",
        "bits_tokens",
        tok_bits.to(torch.uint8),
        "BSC gt_ms_idx_Bl concatenated [2, L, d_tok] (token layout)",
    )
    npz.add("vae_encode.npz", "x_BLC_wo_prefix", x_BLC_wo_prefix, "BSC next-scale inputs [2, L - 1, d_tok]")
    npz.add("vae_encode.npz", "z", z, "vae.encode quantized_out = sum of upsampled per-scale codes [2, d_vae, Hv, Wv]")
    npz.add("vae_encode.npz", "min_bit_margin", np.array(margins), "per scale: min |normalised residual component|")
    add_image_summaries(npz, "vae_encode.npz", "recon", recon, "vae.decode(z) (clamped to [-1,1])")

    # ---- text conditioning + teacher forcing -----------------------------------------------------------------
    model.cond_drop_rate = 0.0  # forward() applies cond-drop through Python's random even in eval mode
    with torch.no_grad():
        tf_logits = model.forward(label_B_or_BLT=pair, x_BLC_wo_prefix=x_BLC_wo_prefix, scale_schedule=scale_schedule)
    npz.add(
        "teacher_forcing.npz", "logits", tf_logits, "Infinity.forward(pair text, BSC inputs) logits [2, L, 2*d_tok]"
    )
    tf_margin = tf_logits.reshape(2, L, d_tok, 2).diff(dim=-1).abs().amin().item()
    observed["teacher_forcing_min_bit_margin"] = float(f"{tf_margin:.3g}")

    # ---- sampling runs ---------------------------------------------------------------------------------------
    rec = Recorder(IM, model, vae)
    runs_doc: dict[str, dict] = OrderedDict()

    def run(name, m, *, label, B, cfg, tau, top_k, top_p, cfg_insertion_layer=(0,), negative=None, trunk=1000, doc=""):
        cfg_list = cfg if isinstance(cfg, list) else [cfg] * n_scales
        tau_list = tau if isinstance(tau, list) else [tau] * n_scales
        with torch.no_grad(), rec.active(capture_text=(name == "a")), quiet:
            _, _, img = m.autoregressive_infer_cfg(
                vae=vae,
                scale_schedule=scale_schedule,
                label_B_or_BLT=label,
                g_seed=0,
                B=B,
                negative_label_B_or_BLT=negative,
                force_gt_Bhw=None,
                cfg_sc=3,
                cfg_list=cfg_list,
                tau_list=tau_list,
                top_k=top_k,
                top_p=top_p,
                returns_vemb=1,
                ratio_Bl1=None,
                gumbel=0,
                norm_cfg=False,
                cfg_exp_k=0.0,
                cfg_insertion_layer=list(cfg_insertion_layer),
                vae_type=d_vae,
                softmax_merge_topk=-1,
                ret_img=True,
                trunk_scale=trunk,
                gt_leak=0,
                gt_ls_Bl=None,
                inference_mode=True,
                sampling_per_bits=1,
            )
        file = f"sample_{name}.npz"
        n = len(rec.logits)
        logits = torch.cat([lg.reshape(B, -1, 2 * d_tok) for lg in rec.logits], 1)
        bits = torch.cat([b.reshape(B, -1, d_tok) for b in rec.bits], 1)
        vbits = torch.cat([b.reshape(B, -1, d_vae) for b in rec.vae_bits], 1)
        nxt = torch.cat(rec.nxt, 1) if rec.nxt else torch.zeros(B, 0, d_tok)
        npz.add(file, "cfg_list", np.array(cfg_list[:n_scales], dtype=np.float64).astype(np.float32), "per scale cfg")
        npz.add(file, "tau_list", np.array(tau_list[:n_scales], dtype=np.float32), "per scale tau")
        npz.add(file, "logits", logits, f"mixed logits / tau handed to the sampler, [B, {logits.shape[1]}, 2*d_tok]")
        npz.add(file, "bits", bits.to(torch.uint8), "sampled bits (sampler output) [B, tokens, d_tok]")
        npz.add(
            file,
            "bits_vae",
            vbits.to(torch.uint8),
            "bits handed to lfq.indices_to_codes (after unpatchify) [B, sum hv*wv, d_vae]",
        )
        npz.add(file, "next_inputs", nxt, "word_embed inputs for scales 1.. [B, tokens - 1, d_tok]")
        npz.add(file, "summed_codes", rec.decode_in, "input of vae.decode (summed codes) [B, d_vae, Hv, Wv]")
        if name == "a" and args.full_image:
            npz.add(file, "image_u8_bgr", img[:1], "returned uint8 image of prompt 0 [1,H,W,3], BGR")
        else:  # the decoder is checked by run a and vae_encode; crops and sums keep the set small
            npz.add(file, "image_u8_bgr_crop_tl", img[:, :16, :16], "returned uint8 BGR image: top-left 16x16")
            npz.add(file, "image_u8_bgr_crop_br", img[:, -16:, -16:], "returned uint8 BGR image: bottom-right 16x16")
            npz.add(file, "image_u8_bgr_sum", img.double().sum(dim=(1, 2)), "returned uint8 BGR image: per channel sum")
        add_image_summaries(npz, file, "image", rec.decode_out, "vae.decode output (clamped to [-1,1])", stride=False)
        pairs = logits.reshape(B, -1, d_tok, 2)
        margin = (pairs[..., 0] - pairs[..., 1]).abs()
        per_scale, start = [], 0
        for t in tokens_per_scale[:n]:
            per_scale.append(margin[:, start : start + t].amin().item())
            start += t
        npz.add(file, "min_bit_margin", np.array(per_scale), "per scale: min |l0 - l1| over the batch")
        prob1 = torch.softmax(pairs, -1)[..., 1]
        greedy = (pairs[..., 1] > pairs[..., 0]).to(bits.dtype)
        stats = OrderedDict(
            B=B,
            scales_sampled=n,
            min_bit_margin=float(f"{min(per_scale):.3g}"),
            frac_bits_p_gt_0_97=round(float(((prob1 > 0.97) | (prob1 < 0.03)).float().mean()), 4),
            frac_bits_p_in_0_1_0_9=round(float(((prob1 > 0.1) & (prob1 < 0.9)).float().mean()), 4),
            frac_bits_not_argmax=round(float((bits != greedy).float().mean()), 4),
        )
        runs_doc[name] = OrderedDict(
            doc=doc,
            B=B,
            cfg_list=[float(c) for c in cfg_list[:n_scales]],
            tau_list=[float(t) for t in tau_list[:n_scales]],
            top_k=top_k,
            top_p=top_p,
            g_seed=0,
            cfg_insertion_layer=list(cfg_insertion_layer),
            trunk_scale=trunk,
            stats=stats,
        )
        return rec

    greedy = dict(top_k=1, top_p=0.0)
    if "a" in args.runs:
        r = run("a", model, label=pair, B=2, cfg=3.0, tau=0.5, **greedy, doc="greedy, cfg 3 on logits, tau 0.5, p0+p1")
        for key, name, doc in (
            ("text_norm", "text_norm_out", "text_norm(cond rows p0, p1, then uncond rows cfg_uncond[:len_i]) [N, Ct5]"),
            ("pool", "cond_BD", "text_proj_for_sos output = sos = cond_BD [2B, D]"),
            ("text_proj_for_ca", "ca_kv", "text_proj_for_ca output [N, D]"),
            ("shared_ada_lin", "cond_BD_or_gss", "shared_ada_lin(cond_BD) [2B, 1, 6, C]"),
        ):
            npz.add("text_conditioning.npz", name, r.text[key], doc)
        cu = torch.cat((pair[2], pair[2][1:] + pair[2][-1]))
        npz.add("text_conditioning.npz", "cu_seqlens_cfg", cu, "cu_seqlens_k of the cond+uncond batch, int32")
    if "b" in args.runs:
        run(
            "b",
            model,
            label=pair,
            B=2,
            cfg=3.0,
            tau=0.5,
            top_k=900,
            top_p=0.97,
            doc="official defaults top_k 900 / top_p 0.97, torch CPU RNG seeded 0 (g_seed)",
        )
    if "c" in args.runs:
        cfgs = [1.0, 3.0, 3.0, 2.0, 2.0, 1.0] + [1.0] * (n_scales - 6)
        taus = [1.0, 0.5, 0.5, 0.7, 0.7, 1.0] + [1.0] * (n_scales - 6)
        run("c", model, label=text["p1"], B=1, cfg=cfgs, tau=taus, **greedy, doc="per-scale cfg/tau lists, p1")
    if "d" in args.runs:
        run(
            "d",
            model,
            label=text["p0"],
            B=1,
            cfg=3.0,
            tau=0.5,
            cfg_insertion_layer=(-1,),
            **greedy,
            doc="cfg_insertion_layer=[-1]: hidden states mixed after the last block, p0",
        )
    if "e" in args.runs:
        run(
            "e",
            model,
            label=text["p0"],
            B=1,
            cfg=3.0,
            tau=0.5,
            negative=text["neg"],
            **greedy,
            doc="negative prompt as the uncond branch, p0",
        )
    if "f" in args.runs:
        run(
            "f",
            model,
            label=text["p1"],
            B=1,
            cfg=1.0,
            tau=0.5,
            **greedy,
            doc="no guidance (cfg 1 everywhere, bs=B), p1",
        )
    if "g" in args.runs:
        run("g", model, label=text["p0"], B=1, cfg=3.0, tau=0.5, trunk=5, **greedy, doc="trunk_scale=5 early stop, p0")

    # ---- diagnostics (recorded in the manifest, not fixtures) ---------------------------------------------------
    def compare(ref: torch.Tensor, other: torch.Tensor, prefix: str) -> None:
        diff = (other - ref).abs()
        a, b = ref.reshape(*ref.shape[:-1], -1, 2), other.reshape(*other.shape[:-1], -1, 2)
        flips = ((a[..., 1] > a[..., 0]) != (b[..., 1] > b[..., 0])).sum().item()
        observed[f"{prefix}_max_abs_diff"] = float(f"{diff.max().item():.3g}")
        observed[f"{prefix}_frac_gt_1e-5"] = float(f"{(diff > 1e-5).float().mean().item():.3g}")
        observed[f"{prefix}_argmax_flips"] = f"{flips} of {a[..., 0].numel()}"

    observed["logits_max_abs"] = float(f"{tf_logits.abs().max().item():.3g}")
    if "f" in args.runs:
        # Two official paths to the same numbers: the KV-cached sampler and the full forward (no guidance in f).
        f_file = npz.files["sample_f.npz"]
        with torch.no_grad():
            full = model.forward(
                label_B_or_BLT=text["p1"],
                x_BLC_wo_prefix=torch.from_numpy(f_file["next_inputs"]),
                scale_schedule=scale_schedule,
            )
        compare(torch.from_numpy(f_file["logits"]), full.mul(1 / 0.5), "run_f_kv_cache_vs_forward")
    # What skipping the bf16 round trip of the cross-attention costs (a float32 "fast" mode).
    real_ca_forward = IM.CrossAttention.forward
    IM.CrossAttention.forward = fp32_cross_attention_forward
    try:
        with torch.no_grad():
            fp32 = model.forward(label_B_or_BLT=pair, x_BLC_wo_prefix=x_BLC_wo_prefix, scale_schedule=scale_schedule)
    finally:
        IM.CrossAttention.forward = real_ca_forward
    compare(tf_logits, fp32, "teacher_forcing_without_bf16_cross_attention")
    with torch.no_grad():
        one = vae.decode(z[:1])
    observed["vae_decode_batch1_vs_batch2_max_abs_diff"] = float(f"{(one - recon[:1]).abs().max().item():.3g}")

    npz.write()
    info = OrderedDict(
        template=template,
        scale_schedule=scale_schedule,
        vae_scale_schedule=vae_scale_schedule,
        L=L,
        image_hw=(img_h, img_w),
        d_vae=d_vae,
        d_tok=d_tok,
        patch_size=patch_size,
        model_kwargs=model_kwargs,
        load_kw={k: v for k, v in load_kw.items() if k != "vae"},
        vae_kw=vae_kw,
        prompts=prompts,
        text=text,
        tok_dir=tok_dir,
        enc_dir=enc_dir,
        t5_config=text_encoder.config.to_dict(),
        rules=OrderedDict(transformer=model_rules, vae=vae_rules, t5=t5_rules),
        model_sd=saved_sd,
        vae_sd=saved_vae_sd,
        t5_sd=OrderedDict((k, v) for k, v in text_encoder.state_dict().items()),
        official_versions=dict(transformers=transformers.__version__),
    )
    write_manifest_and_readme(args, out, npz, observed, runs_doc, info)


def build_text_encoder(args, tok_dir: Path, enc_dir: Path, T5Config, T5EncoderModel, T5TokenizerFast) -> dict:
    """Tiny T5 encoder + T5 tokenizer (Unigram over plain words, Metaspace, '$A </s>' template; pad 0, eos 1)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    vocab += [("▁" + w, -5.0) for w in WORDS] + [(",", -5.0), (".", -5.0)]
    vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]  # unknown lowercase words fall back to letters
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.model_max_length = 512
    tok.save_pretrained(tok_dir)
    cfg = T5Config(
        vocab_size=len(vocab),
        d_model=args.text_width,
        d_kv=args.t5_d_kv,
        num_heads=args.t5_heads,
        d_ff=args.t5_d_ff,
        num_layers=args.t5_layers,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    t5 = T5EncoderModel(cfg).eval()
    rules = redraw_t5(t5, torch.Generator().manual_seed(args.seed + 3))
    t5.save_pretrained(enc_dir)
    return rules


def fp32_cross_attention_forward(self, q, ca_kv):
    """Diagnostic only, NOT official: basic.py CrossAttention.forward without the bf16 casts."""
    kv_compact, cu_seqlens_k, max_seqlen_k = ca_kv
    N = kv_compact.shape[0]
    bias = torch.cat((self.zero_k_bias, self.v_bias))
    kv_compact = F.linear(kv_compact, weight=self.mat_kv.weight, bias=bias).view(N, 2, self.num_heads, self.head_dim)
    if not self.for_attn_pool:
        B, Lq = q.shape[:2]
        q_compact = self.mat_q(q).view(-1, self.num_heads, self.head_dim)
    else:
        B, Lq = cu_seqlens_k.shape[0] - 1, 1
        q_compact = self.mat_q.repeat(B, 1, 1).to(dtype=kv_compact.dtype)
    cu_seqlens_q = torch.arange(0, Lq * (B + 1), Lq, dtype=torch.int32)
    oup = flash_attn_varlen_kvpacked_func(
        q_compact, kv_compact, cu_seqlens_q, cu_seqlens_k, Lq, max_seqlen_k, softmax_scale=self.scale
    ).reshape(B, Lq, -1)
    return self.proj_drop(self.proj(oup))


def vae_bit_margins(vae, raw: torch.Tensor, vae_scale_schedule) -> list[float]:
    """Per scale, the smallest |component| of the l2-normalised residual the BSQ signs (0 would be a tie)."""
    margins, cum = [], 0
    codes_out = raw.unsqueeze(2)
    for si, (pt, ph, pw) in enumerate(vae_scale_schedule):
        res = codes_out - cum
        if si != len(vae_scale_schedule) - 1:
            res = F.interpolate(res, size=(pt, ph, pw), mode=vae.quantizer.z_interplote_down)
        margins.append(F.normalize(res, dim=1).abs().amin().item())
        q = vae.quantizer.lfq(res)[0]
        cum = cum + F.interpolate(q, size=vae_scale_schedule[-1], mode=vae.quantizer.z_interplote_up)
    return margins


def add_image_summaries(npz: NpzWriter, file: str, name: str, img: torch.Tensor, doc: str, stride=True) -> None:
    x = img.detach().double()
    npz.add(file, f"{name}_sum", x.sum(dim=(2, 3)).numpy(), f"{doc}: per (image, channel) sum, float64")
    npz.add(file, f"{name}_sumsq", (x * x).sum(dim=(2, 3)).numpy(), f"{doc}: per (image, channel) sum of squares")
    if stride:
        npz.add(file, f"{name}_stride4", img[:1, :, ::4, ::4], f"{doc}: image 0, every 4th row/column [1,3,H/4,W/4]")
    npz.add(file, f"{name}_crop_tl", img[:, :, :16, :16], f"{doc}: top-left 16x16 crop")
    npz.add(file, f"{name}_crop_br", img[:, :, -16:, -16:], f"{doc}: bottom-right 16x16 crop")


def _group_rules(rules: dict[str, str]) -> list[str]:
    """'rule: names' lines, with per-block prefixes collapsed so the README stays short."""
    import re

    grouped: dict[str, list[str]] = OrderedDict()
    for name, rule in rules.items():
        short = re.sub(r"block_chunks\.\d+\.module\.\d+\.", "<block>.", name)
        short = re.sub(r"(encoder|decoder)\.(down|up)\.\d+\.", r"\1.\2.*.", short)
        short = re.sub(r"\.block\.\d+\.", ".block.*.", short)
        short = re.sub(r"block\.\d+\.layer\.\d+\.", "block.*.layer.*.", short)
        names = grouped.setdefault(rule, [])
        if short not in names:
            names.append(short)
    return [f"- {rule}: " + ", ".join(f"`{n}`" for n in names) for rule, names in grouped.items()]


def _fmt_shape(shape) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def write_manifest_and_readme(args, out: Path, npz: NpzWriter, observed, runs_doc, info) -> None:
    rel_text = os.path.relpath(info["enc_dir"].parent, out) if args.text_encoder_from is not None else "."
    data_files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("README.md", "manifest.json"))
    data_files = [p for p in data_files if p.parent == out or p.parent.name in ("text_encoder", "tokenizer")]
    file_info = OrderedDict(
        (str(p.relative_to(out)), OrderedDict(bytes=p.stat().st_size, sha256=sha256_file(p))) for p in data_files
    )
    shared = OrderedDict()
    if args.text_encoder_from is not None:
        for p in sorted(info["tok_dir"].iterdir()) + sorted(info["enc_dir"].iterdir()):
            shared[os.path.relpath(p, out)] = OrderedDict(bytes=p.stat().st_size, sha256=sha256_file(p))
    total = sum(v["bytes"] for v in file_info.values())
    official_sha = OrderedDict((f, sha256_file(args.official / f)) for f in OFFICIAL_FILES)
    arrays = OrderedDict(
        (
            file,
            OrderedDict(
                (name, OrderedDict(dtype=str(arr.dtype), shape=list(arr.shape))) for name, arr in named.items()
            ),
        )
        for file, named in npz.files.items()
    )

    def keys(sd):
        return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()]

    cmd = "python scripts/make_infinity_fixtures.py " + shlex.join(sys.argv[1:])
    cfg = OrderedDict((k, str(v) if isinstance(v, Path) else v) for k, v in vars(args).items())
    text_info = OrderedDict(
        (k, OrderedDict(prompt=info["prompts"][k], len=int(v[1][0]))) for k, v in info["text"].items()
    )
    manifest = OrderedDict(
        fixture_set=args.name,
        generator="scripts/make_infinity_fixtures.py",
        command=cmd,
        official_repo="FoundationVision/Infinity",
        official_commit=args.official_rev,
        official_source_sha256=official_sha,
        versions=OrderedDict(
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=info["official_versions"]["transformers"],
            numpy=np.__version__,
        ),
        dtype="float32",
        threads=1,
        arguments=cfg,
        derived=OrderedDict(
            h_div_w_template=info["template"],
            scale_schedule=[list(s) for s in info["scale_schedule"]],
            vae_scale_schedule=[list(s) for s in info["vae_scale_schedule"]],
            tokens=info["L"],
            image_hw=list(info["image_hw"]),
            d_vae=info["d_vae"],
            bits_per_token=info["d_tok"],
            V=2 * info["d_tok"],
            vae_patch_size=info["patch_size"],
        ),
        infinity_model_kwargs=info["model_kwargs"],
        load_infinity_kwargs=info["load_kw"],
        vae_model_kwargs=OrderedDict(info["vae_kw"], base_ch=args.vae_base_ch),
        t5_config={
            k: info["t5_config"][k]
            for k in (
                "vocab_size",
                "d_model",
                "d_kv",
                "num_heads",
                "d_ff",
                "num_layers",
                "feed_forward_proj",
                "relative_attention_num_buckets",
                "relative_attention_max_distance",
                "layer_norm_epsilon",
            )
        },
        text_encoder_dir=rel_text,
        prompts=text_info,
        runs=runs_doc,
        observed=observed,
        redraw=info["rules"],
        files=file_info,
        shared_files=shared,
        total_bytes=total,
        arrays=arrays,
        checkpoint_keys=OrderedDict(
            [("infinity.pth", keys(info["model_sd"])), ("vae.pth", keys(info["vae_sd"]))]
            + ([("text_encoder/model.safetensors", keys(info["t5_sd"]))] if args.text_encoder_from is None else [])
        ),
    )
    readme = render_readme(args, info, manifest, npz, cmd)
    (out / "README.md").write_text(readme)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def render_readme(args, info, m, npz: NpzWriter, cmd: str) -> str:
    d = m["derived"]
    mk = info["model_kwargs"]
    C, H = mk["embed_dim"], mk["num_heads"]
    Ct5 = args.text_width
    L = info["L"]
    rows = args.uncond_rows
    sched = ", ".join(f"{h}x{w}" for _, h, w in info["scale_schedule"])
    vsched = ", ".join(f"{h}x{w}" for _, h, w in info["vae_scale_schedule"])
    ffn = round(C * 4 / 256) * 256
    chs = [args.vae_base_ch * c for c in args.vae_ch_mult]
    lines: list[str] = []
    add = lines.append
    add(f"# {args.name} — compatibility fixtures produced with the official Infinity code")
    add("")
    add(
        "Small models with fixed-seed weights saved in the **checkpoint layouts of the Infinity release files** "
        '(`infinity_2b_reg.pth`: a pickled OrderedDict; `infinity_vae_d32reg.pth`: `{"vae": state_dict}`; a T5 '
        "encoder folder), plus what the official implementation (GitHub FoundationVision/Infinity, commit "
        f"`{args.official_rev}`; CPU, torch {torch.__version__}, float32, 1 thread, no compile, no autocast) "
        "computes for them. Every file here was loaded back through the official loaders "
        "(`tools/run_infinity.py:load_infinity`, `bsq_vae/vae.py:vae_model`) before anything was recorded. "
        "Data only: no official code is stored here. "
        "`manifest.json` repeats the configuration and gives every array's dtype/shape, every file's byte size and "
        "sha256, every checkpoint key with its shape, the sha256 of the official source files used, the versions, "
        "and the observed statistics quoted below."
    )
    add("")
    add(f"Total size of the files of this set: {m['total_bytes']:,} bytes (README and manifest not counted).")
    if args.text_encoder_from is not None:
        add(
            f"The text encoder and tokenizer are NOT stored here: this set uses `{m['text_encoder_dir']}/text_encoder` "
            f"and `{m['text_encoder_dir']}/tokenizer` (sha256 in `manifest.json` under `shared_files`)."
        )
    else:
        add(
            "Sub-folders other than `text_encoder/` and `tokenizer/` are separate fixture sets with their own README "
            "and manifest (made by further invocations of the generator, possibly reusing this text encoder)."
        )
    if args.readme_note:
        add("")
        add(args.readme_note)
    add("")
    add(
        "Regenerate (byte for byte) with an export of the official tree at the commit above as `--official`, "
        "`einops` and `pytz` importable, and the torch/transformers versions in the manifest:"
    )
    add("")
    add("```")
    add(cmd)
    add("```")
    add("")
    add("## Configuration")
    add("")
    add(
        f"- Schedule: h/w {args.h_div_w:g} -> template {info['template']:g}, pn `{args.pn}`: "
        f"{len(info['scale_schedule'])} scales, token grids {sched} (t replaced by 1, as run_infinity does), "
        f"L = {L} tokens, image "
        f"{d['image_hw'][0]}x{d['image_hw'][1]} px."
    )
    if args.patchify:
        add(
            f"- Spatial patchify (the 8B layout): VAE latent grids {vsched} (2x the token grids); a token holds 2x2 "
            f"latent pixels, so the transformer predicts {info['d_tok']} = 4 x {info['d_vae']} bits per token "
            f"(V = {2 * info['d_tok']} logits). Bits go from token layout [B,h,w,4d] to latent layout with "
            "`permute(0,3,1,2) -> pixel_shuffle(2) -> permute(0,2,3,1)`; next-scale inputs come back with "
            "`pixel_unshuffle(2)`."
        )
    add(
        f"- Transformer: `Infinity(...)` exactly as `load_infinity` builds it (kwargs in the manifest): depth "
        f"{mk['depth']}, C = D = {C}, {H} heads (head dim {C // H}), block_chunks {mk['block_chunks']} "
        f"({mk['depth'] // mk['block_chunks']} block(s) per chunk), mlp_ratio 4 -> FFN hidden {ffn}, text width "
        f"Ct5 = {Ct5} (attentive-pool heads {Ct5 // (64 if C > 4096 else 128)}), text_maxlen 512, "
        f"d = {info['d_tok']} bits/token, V = {2 * info['d_tok']}, shared_aln, cos_attn, "
        "rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, add_lvl_embeding_only_first_block=1, use_bit_label=1, "
        "pad_to_multiplier=128, fused_norm=True (fused path, compile removed), inference_mode=True, bf16=0."
    )
    add(
        f"- BSQ-VAE: `vae_model(path, 'dynamic', codebook_dim={info['d_vae']}, codebook_size=2**{info['d_vae']}, "
        f"patch_size={info['patch_size']}, encoder/decoder_ch_mult={list(args.vae_ch_mult)}, test_mode=True)` with "
        f"`AutoEncoder` wrapped to set `base_ch={args.vae_base_ch}` (vae_model hard-codes 128) -> channels {chs}; "
        "GroupNorm has 32 groups where C % 32 == 0, else 24. No attention blocks (cnn_attention='no'), "
        "2 res blocks per encoder level, 3 per decoder level, new_quant BSQ, no projections."
    )
    t5c = m["t5_config"]
    add(
        f"- T5 encoder (`T5EncoderModel`, float32): vocab {t5c['vocab_size']}, d_model {t5c['d_model']}, "
        f"{t5c['num_layers']} layers, {t5c['num_heads']} heads x d_kv {t5c['d_kv']}, d_ff {t5c['d_ff']}, "
        "gated-gelu, 32 relative buckets / max distance 128, eps 1e-6. Loaded with "
        f"`T5EncoderModel.from_pretrained(dir, dtype=float32)` (attention implementation "
        f"`{m['observed']['t5_attn_implementation']}`; eager differs by "
        f"{m['observed']['t5_sdpa_vs_eager_max_abs_diff']:g} at most). Tokenizer: transformers' `T5TokenizerFast` "
        "(in transformers 5 an alias of the tokenizers-backed `T5Tokenizer`) over a Unigram vocabulary of "
        "`<pad>`=0, `</s>`=1, `<unk>`=2, `▁`, plain English words as `▁word` pieces, `,`, `.` and the 26 lowercase "
        "letters (fallback for unknown lowercase words); WhitespaceSplit + Metaspace pre-tokenizer, template "
        "`$A </s>`, no normalizer (upper case maps to `<unk>`), extra_ids=0. Loaded as the official `load_tokenizer` "
        "does: `AutoTokenizer.from_pretrained(dir, revision=None, legacy=True)`, `model_max_length = 512`."
    )
    add("")
    add("## Files")
    add("")
    add("| file | bytes | content |")
    add("|---|---|---|")
    n_keys = len(info["model_sd"])
    n_numel = sum(v.numel() for v in info["model_sd"].values())
    descr = {
        "infinity.pth": (
            f"transformer: `torch.save(OrderedDict)` like `infinity_2b_reg.pth`; {n_keys} float32 entries "
            f"({n_numel:,} numel) incl. the `zero_k_bias` buffers; `cfg_uncond` has **{rows}** rows"
            + (" (the release has 512)." if rows < 512 else ".")
        ),
        "vae.pth": (
            f"VAE: `torch.save({{'vae': state_dict}})`; {len(info['vae_sd'])} entries, "
            + (
                "keys as the official model names them (`...conv1.conv.weight`, `...norm1.norm.weight`)."
                if args.vae_key_style == "wrapped"
                else "keys in the OTHER style `load_cnn` accepts: plain `...conv1.weight`, `...norm1.weight`, "
                "`downsample.conv.weight` (one `.conv`/`.norm` wrapper removed); the official loader remaps them."
            )
        ),
        "images.npz": "input images",
        "text.npz": "tokenizer ids and T5 features of the prompts (official `encode_prompt`)",
        "text_conditioning.npz": "the transformer's text path during run a (cond + uncond)",
        "schedule.npz": "scale schedule, RoPE table rows" + (", extended cfg_uncond rows" if rows < 512 else ""),
        "vae_encode.npz": "VAE encode (bits per scale, BSC inputs) and decode of the two images",
        "teacher_forcing.npz": "`Infinity.forward` logits on the BSC inputs",
        "text_encoder/config.json": "T5 config",
        "text_encoder/model.safetensors": "T5 weights (float32)",
        "tokenizer/tokenizer.json": "tokenizer (tokenizers JSON)",
        "tokenizer/tokenizer_config.json": "tokenizer config",
    }
    for name, v in m["files"].items():
        run_doc = m["runs"].get(name[7:8], {}).get("doc", "") if name.startswith("sample_") else ""
        text = descr.get(name) or (f"sampling run {name[7]}: {run_doc}" if run_doc else "")
        add(f"| `{name}` | {v['bytes']:,} | {text} |")
    add("| `manifest.json` | | machine-readable everything |")
    add("")
    add("Loading notes:")
    add(
        "- Both `.pth` files load with `torch.load(path, map_location='cpu', weights_only=True)`. Keys, order and "
        "shapes of `infinity.pth` are in the manifest (`checkpoint_keys`); per block `block_chunks.{k}.module.{j}.` "
        f"holds global block k*{mk['depth'] // mk['block_chunks']}+j. "
        "`text_proj_for_sos.ca.zero_k_bias`, `*.sa.zero_k_bias`, `*.ca.zero_k_bias` are all-zero buffers."
    )
    add(
        f"- `scale_mul_1H11` is stored [1,{H},1,1] (`customized_flash_attn=False`). The [1,1,{H},1] variant (issue "
        "#117; only with the unpublished customized kernel) holds the same numbers: accept it by reshaping. No "
        "separate file is stored for it (size cap)."
    )
    if rows < 512:
        add(
            f"- `cfg_uncond` has {rows} rows. `Infinity.load_state_dict` (strict=False) extends a short table with the "
            "model's own init rows: `trunc_normal_(empty(512, Ct5), std=1.2, a=-2, b=2, generator=CPU Generator "
            "seeded 0) / sqrt(Ct5)`, rows >= stored rows. Every prompt here is longer than "
            f"{rows} tokens, so every guided run uses extension rows; `schedule.npz:cfg_uncond_loaded` holds the "
            "rows after the official load."
        )
    else:
        add(
            "- `cfg_uncond` has the release's 512 rows. A checkpoint with fewer rows is extended by the official "
            "loader with its own init (see the patchify sub-set, which stores a short table)."
        )
    add(
        "- `vae.pth` contains `quantizer.lfq.mask` and `quantize.lfq.mask` (int64 powers of two; `quantize` is the "
        "same module as `quantizer`). No other entries (the release files carry more, unverified which)."
    )
    add("")
    add("## Weights")
    add("")
    add(
        "Every parameter was overwritten after construction, in `named_parameters()` order, with normal draws from "
        f"its model's own `torch.Generator` (transformer seed {args.seed + 1}, VAE seed "
        f"{m['observed']['vae_param_seed']}"
        + (f", T5 seed {args.seed + 3}" if args.text_encoder_from is None else "; the T5 is the parent set's")
        + "); buffers are as constructed. The VAE seed was "
        f"picked among {args.vae_seed_candidates} candidates for the largest smallest encode-bit margin. The files "
        "ARE the weights; the rules are documentation:"
    )
    add("")
    add("Transformer:")
    lines += _group_rules(info["rules"]["transformer"])
    add("")
    add("VAE:")
    lines += _group_rules(info["rules"]["vae"])
    if info["rules"]["t5"]:
        add("")
        add("T5:")
        lines += _group_rules(info["rules"]["t5"])
    add("")
    add(
        f"`head.weight` gain {args.head_gain:g} was chosen so that, at tau 0.5 and cfg 3, about half of the bits are "
        "forced (p > 0.97) and a third are genuinely random (0.1 < p < 0.9); see the run statistics."
    )
    add("")
    add("## Inputs")
    add("")
    add("Prompts (the official `encode_prompt`, one prompt per call; `len` counts `</s>`):")
    for key, v in m["prompts"].items():
        add(f'- `{key}` ({v["len"]} tokens): "{v["prompt"]}"')
    add("")
    hh, ww = d["image_hw"]
    add(
        f"Images (`images.npz:images_u8` [2,3,{hh},{ww}] RGB): x = column, y = row, W = {ww}, H = {hh}, values "
        "rounded half-to-even and clipped to [0,255]. Image 0: R = 255x/(W-1), G = 255y/(H-1), B = 230 inside the "
        "ellipse ((x-0.5W)/(0.3W))^2 + ((y-0.4H)/(0.3H))^2 < 1, else 25. Image 1: R = 127.5 + 127.5 sin(2pi(3x/W + "
        "2y/H)), G = 127.5 + 127.5 cos(2pi(5x/W - y/H)), B = 255 where floor(8x/W) + floor(8y/H) is odd, else 0 "
        "(at 256x256 identical to `var-official/images.npz`). **The float VAE input is `u8/128 - 1`** (exact in "
        "float32), not the training normalisation."
    )
    add("")
    add("## Arrays")
    add("")
    add(
        "Float arrays are float32 unless noted (`*_sum`, `*_sumsq` are float64), index/bit arrays int64 or uint8. "
        "Token-layout arrays concatenate the scales in schedule order, each scale row-major (h, w). Bits are in "
        "{0,1}: bit i of a token uses logits 2i (value 0) and 2i+1 (value 1)."
    )
    for file, named in m["arrays"].items():
        add("")
        add(f"`{file}`:")
        for name, a in named.items():
            add(f"- `{name}` {a['dtype']} {_fmt_shape(a['shape'])}: {npz.docs[file][name]}")
    add("")
    add("## Runs")
    add("")
    add(
        "Each run is one `Infinity.autoregressive_infer_cfg` call with the arguments `gen_one_img` passes "
        f"(`g_seed=0, returns_vemb=1, ret_img=True, inference_mode=True, gt_leak=0, vae_type={info['d_vae']}, "
        "sampling_per_bits=1`; `cfg_sc`, `gumbel`, `norm_cfg`, `cfg_exp_k`, `softmax_merge_topk` are dead), under "
        "`torch.no_grad()`, with the captures wrapped around it: the module-level "
        "`sample_with_top_k_top_p_also_inplace_modifying_logits_` (its logits argument is cloned before the in-place "
        "filtering: guided, divided by tau, shaped [B, h*w*d, 2]), `vae.quantizer.lfq.indices_to_codes` (the bits "
        "after unpatchify), a forward hook on `word_embed` (next-scale inputs) and `vae.decode` (summed codes, "
        "float image). B=2 runs batch p0 and p1 (their `encode_prompt` tuples concatenated: kv_compact, lens, "
        "cu_seqlens = [0, len0, len0+len1], max len)."
    )
    add("")
    add("| run | B | prompt(s) | cfg | tau | top_k / top_p | cfg_insertion_layer | trunk | notes |")
    add("|---|---|---|---|---|---|---|---|---|")
    prompts_of = {"a": "p0,p1", "b": "p0,p1", "c": "p1", "d": "p0", "e": "p0 (neg)", "f": "p1", "g": "p0"}
    for name, r in m["runs"].items():
        cfgs = sorted(set(r["cfg_list"]))
        taus = sorted(set(r["tau_list"]))
        cfg_s = f"{r['cfg_list'][0]:g}" if len(cfgs) == 1 else "[" + ",".join(f"{c:g}" for c in r["cfg_list"]) + "]"
        tau_s = f"{r['tau_list'][0]:g}" if len(taus) == 1 else "[" + ",".join(f"{t:g}" for t in r["tau_list"]) + "]"
        add(
            f"| {name} | {r['B']} | {prompts_of[name]} | {cfg_s} | {tau_s} | {r['top_k']} / {r['top_p']:g} | "
            f"{r['cfg_insertion_layer']} | {r['trunk_scale']} | {r['doc']} |"
        )
    add("")
    add("Run statistics (`frac_bits_p_gt_0_97`: share of bits whose likelier value has p > 0.97;")
    add(
        "`frac_bits_not_argmax`: sampled bits that differ from the argmax; margins are |l0 - l1| of the guided logits):"
    )
    add("")
    add("| run | scales | min greedy margin | p > 0.97 | 0.1 < p < 0.9 | not argmax |")
    add("|---|---|---|---|---|---|")
    for name, r in m["runs"].items():
        st = r["stats"]
        add(
            f"| {name} | {st['scales_sampled']} | {st['min_bit_margin']:g} | {st['frac_bits_p_gt_0_97']:g} | "
            f"{st['frac_bits_p_in_0_1_0_9']:g} | {st['frac_bits_not_argmax']:g} |"
        )
    add("")
    add("Details (official behaviour; the run letters point at the runs stored here):")
    have = m["runs"]

    def ref(name: str) -> str:
        return f" (run {name})" if name in have else ""

    add(
        "- Guidance on logits (cfg_insertion_layer=[0], every released script): bs = 2B, rows 0..B-1 conditional, "
        "B..2B-1 unconditional (`cfg_uncond[:len_i]` per prompt, or the negative prompt's T5 features); "
        "`logits = get_logits(x, cond_BD) * (1/tau)`, then `cfg*l[:B] + (1-cfg)*l[B:]` (tau before mixing)."
    )
    add(
        f"- A scale with cfg == 1 inside a guided run{ref('c')} still runs 2B rows and takes `get_logits(x[:B], "
        f"cond_BD[:B]) * (1/tau)` unmixed. cfg == 1 at every scale{ref('f')} runs B rows only."
    )
    add(
        f"- cfg_insertion_layer=[-1]{ref('d')}: after block depth-1 the hidden states become "
        "`cat(cfg*x[:B] + (1-cfg)*x[B:])` twice; logits then come from `get_logits(x[:B], cond_BD[:B])` unmixed."
    )
    add(
        f"- Negative prompt{ref('e')}: its `encode_prompt` tuple replaces the cfg_uncond rows; "
        "`cu_seqlens = cat(cu, cu_neg[1:] + cu[-1])`, `max_seqlen = max(both)`."
    )
    add(
        f"- trunk_scale=5{ref('g')}: `si >= 5` breaks the loop; the summed codes of scales 0..4 (kept at full latent "
        "resolution) are decoded. Logits/bits cover 5 scales, next_inputs the inputs of scales 1..5."
    )
    add(
        f"- Top-k/top-p sampling{ref('b')} is reproducible only with torch's CPU generator: "
        "`model.rng.manual_seed(g_seed)` at the call, then one `torch.multinomial(softmax(filtered logits).view(-1, "
        "2), 1, replacement=True, generator=rng)` per scale on the [B*h*w*d, 2] tensor, in scale order; nothing else "
        "draws. top_k=900 >= 2 is a no-op; top_p=0.97 removes the less likely value when its probability <= 0.03 "
        "(ascending sort, `cumsum <= 1 - top_p`). Greedy runs (top_k=1) do not depend on the generator."
    )
    add("")
    add("## CPU patch set (what it took to run the official code here)")
    add("")
    add(
        "Nothing in the official tree was edited. Before importing it, the generator installs stand-in modules in "
        "`sys.modules` and these monkey-patches:"
    )
    add(
        "- `torch.compile` -> an identity decorator (`fused_op.py` decorates the fused norms with "
        "`@torch.compile(fullgraph=True)`; `TORCH_COMPILE_DISABLE=1` makes that raise on torch 2.13). The fused "
        "norm path stays on, as in official inference."
    )
    add(
        "- `torch.Tensor.cuda` and `torch.nn.Module.cuda` -> identity (reached by `encode_prompt`'s "
        "`.cuda(non_blocking=True)` and `load_infinity`'s `infinity_test.cuda()`)."
    )
    add(
        "- `flash_attn`: `flash_attn_func` raises (never called: `customized_flash_attn=False`, and "
        "`Infinity.__init__` only reads its `__code__.co_varnames`); `flash_attn_varlen_kvpacked_func` is plain "
        "per-sequence softmax attention with the official casts (the cross-attention hands it bf16 q/kv even in "
        "fp32 runs: bf16 in, float32 math, bf16 out, then `.float()`). `flash_attn.ops` stays absent, so "
        "`flash_fused_op_installed=False` and `FastRMSNorm` uses the official pure-torch `rms_norm_impl`."
    )
    add(
        "- `timm` (`timm.models.register_model`, `timm.models.layers.DropPath/drop_path`, "
        "`timm.loss.SoftTargetCrossEntropy`), `imageio`, `torchvision` (+ `transforms`, "
        "`transforms.functional.to_tensor`), `cv2`, `pandas`: stand-ins; none of them is used on the inference "
        "path (`tools/run_infinity.py` imports cv2/pandas/torchvision at module level). Real dependencies that "
        "must be installed: `einops` (used by the VAE) and `pytz`. `transformers` is imported before the "
        "stand-ins exist (it probes for torchvision)."
    )
    add(
        "- `infinity.models.bsq_vae.vae.AutoEncoder` is wrapped to set `args.base_ch` before construction "
        "(`vae_model` hard-codes 128 and exposes no size knob); the key names are unaffected."
    )
    add(
        "- Diagnostics only, after every array was recorded: `CrossAttention.forward` is swapped for a copy "
        "without the bf16 casts once (the `teacher_forcing_without_bf16_cross_attention_*` numbers) and restored."
    )
    add(
        "- Settings: 1 torch thread, `torch.use_deterministic_algorithms(True)`, T5 in float32 on the CPU (the "
        "official `load_tokenizer` loads fp16 and moves it to CUDA; its tokenizer half is repeated verbatim), "
        "`load_infinity(..., device='cpu', bf16=False)`, `inference_mode=True`, every `torch.cuda.amp.autocast` "
        "is disabled by torch on a CPU-only build (with a warning)."
    )
    add("")
    add("The stand-in definitions, verbatim:")
    add("")
    add("```python")
    for fn in (
        flash_attn_func,
        flash_attn_varlen_kvpacked_func,
        DropPath,
        drop_path,
        register_model,
        SoftTargetCrossEntropy,
        to_tensor,
        identity_compile,
        identity_cuda,
        install_cpu_patches,
    ):
        add(inspect.getsource(fn).rstrip())
        add("")
    lines[-1] = "```"
    add("")
    add("## Official-code details that numerical equality depends on")
    add("")
    add(
        "- Cross-attention (blocks and the attentive pool) rounds q and kv to bfloat16 and its output back from "
        "bfloat16 even in a float32 run (`basic.py` CrossAttention.forward: `if q_compact.dtype == torch.float32: "
        "... .to(torch.bfloat16)`). Two consequences: skipping the round trip moves the teacher-forcing logits by "
        f"up to {m['observed']['teacher_forcing_without_bf16_cross_attention_max_abs_diff']:g} (max |logit| "
        f"{m['observed']['logits_max_abs']:g}; "
        f"{m['observed']['teacher_forcing_without_bf16_cross_attention_argmax_flips']} argmax flips), and any "
        "float32 rounding difference upstream of the cast (another GEMM shape, another op order) can cross a "
        "bf16 rounding boundary and surface as a 2^-8-relative jump (see Tolerances)."
    )
    add(
        "- Self-attention: cos-attn, `q = normalize(q) * exp(clamp_max(scale_mul_1H11, ln 100))`, `k = "
        "normalize(k)`, RoPE on both, SDPA with scale 1; one head of block 0 is stored at 5.0 and clamps to ln 100. "
        "The KV cache holds post-RoPE k and v; RoPE slices start at the scale's token offset (fused path)."
    )
    add(
        "- BSQ code values: the encoder's `quantize_new` returns `z + (zhat - z)` and `indices_to_codes` returns "
        "`l2norm(bits*2s - s)` with s = 1/sqrt(d). For d a power of 4 (16 and 4 in these sets) both are exactly "
        "+-1/sqrt(d); for d = 32 (the 2B release) the first differs from zhat in the last ulp for ~5% of the "
        "entries and the second for all of them, so encode-side and decode-side codes are not bit-equal there. "
        "Sums of trilinear-upsampled codes accumulate in float32 in scale order."
    )
    add(
        "- `Infinity.forward` applies cond-drop through Python's `random` even in eval mode; the teacher forcing "
        "here set `cond_drop_rate = 0`. It pads the sequence to a multiple of 128 (pad rows attend to position 0) "
        "and uses a block-causal mask over scales."
    )
    add(
        "- `encode_prompt` pads to 512 tokens before the T5 call; features of the valid tokens were computed that "
        "way (a shorter padding changes them by float rounding only)."
    )
    add(
        "- The sampler's bits are `torch.multinomial` draws even for greedy top_k=1 (then the other value has "
        "probability 0); exact logit ties would keep both values."
    )
    add("")
    add("## Tolerances")
    add("")
    obs = m["observed"]
    add(
        "Everything recorded here is deterministic: a fresh official load reproduces every array bit for bit "
        "(1 thread). Suggested checks for a float32 reimplementation (TF32/reduced precision off) that keeps the "
        "cross-attention bf16 round trip:"
    )
    add("- scale schedule, RoPE rows: exact. Tokenizer ids, lens, cu_seqlens: exact.")
    add(
        "- T5 features (`*_kv_compact`): 1e-6 abs with the same transformers T5 (sdpa vs eager differ by "
        f"{obs['t5_sdpa_vs_eager_max_abs_diff']:g})."
    )
    add(
        "- `text_norm_out`: 1e-6. `cond_BD`, `ca_kv`, `cond_BD_or_gss`: 1e-6 when the pool's bf16 inputs match "
        "exactly; otherwise a bf16 rounding flip gives ~2^-8 relative on single elements."
    )
    add(
        "- logits (teacher forcing and per-run guided logits), next_inputs, summed_codes: 1e-5 abs when the op "
        "order matches the official one (same GEMM shapes: per-scale KV-cached steps for sampling, one padded "
        "pass for teacher forcing). The two official paths to the same logits (KV-cached sampling vs "
        "`Infinity.forward` on run f's inputs) differ by up to "
        f"{obs.get('run_f_kv_cache_vs_forward_max_abs_diff', 'n/a')} "
        f"(share of logits off by > 1e-5: {obs.get('run_f_kv_cache_vs_forward_frac_gt_1e-5', 'n/a')}; argmax flips: "
        f"{obs.get('run_f_kv_cache_vs_forward_argmax_flips', 'n/a')}) — that is the bf16 boundary effect, so a "
        "reimplementation with a different op order should use ~2e-3 abs on logits and compare bits where "
        "|l0 - l1| exceeds that."
    )
    add(
        "- bits: identical at every scale (VAE encode and every greedy run) when logits match to 1e-5. A greedy "
        "run is a chain: compare bits per scale and, at the first mismatch, look at that bit's margin "
        "(`|l0 - l1|` from the stored logits) before suspecting the code. Smallest greedy margins per scale are "
        "in each `sample_*.npz:min_bit_margin`."
    )
    add(
        "- VAE `h`, `z`, `x_BLC_wo_prefix`: 1e-5 abs. Decoded images (recon, run images: stride/crops): 1e-5 abs at "
        "1 thread with the same batch size. Convolution kernels depend on batch size and thread count: decoding image "
        f"0 alone instead of in the batch of 2 moves it by {obs['vae_decode_batch1_vs_batch2_max_abs_diff']:g}, and "
        "a `--threads 2` regeneration of the main set moved the batch-1 run images by up to 1.6e-5 (nothing else "
        "changed), so use 5e-5 otherwise. Sums divided by H*W: 1e-5."
    )
    add("- uint8 images: identical up to off-by-one on at most 0.1% of the values.")
    add(
        f"- run b (torch RNG): bits identical on torch {torch.__version__} with the CPU generator; skip on another "
        "torch version or device."
    )
    add(
        "- a float32 mode WITHOUT the bf16 round trip: logits within ~2e-2 of these (observed "
        f"{obs['teacher_forcing_without_bf16_cross_attention_max_abs_diff']:g} on teacher forcing); bits are not "
        "comparable there."
    )
    add("")
    add("Observed while generating (all in `observed` in the manifest):")
    add(f"- VAE encode smallest bit margin per scale: {obs['vae_encode_min_bit_margin_per_scale']}.")
    add(f"- teacher forcing smallest |l0 - l1|: {obs['teacher_forcing_min_bit_margin']:g}.")
    add(
        f"- the RoPE table stored under this schedule's key has {obs['rope_table_rows']} rows (it is built for the "
        "template's 1M schedule and shared by every pn); `schedule.npz` keeps the rows this schedule reads."
    )
    add("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
