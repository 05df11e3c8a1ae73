"""``int8``: int8 weights for a next-scale transformer's linear layers, through torchao's maintained kernels.

``quantize_int8`` returns a quantized deep copy of a ``VAR`` or an ``Infinity`` (the exact model is left as it is,
for exact requests): every linear layer the model lists in ``linear_roles()`` — VAR's block attention/MLP and AdaLN
projections; Infinity's self- and cross-attention, MLP, text projections and AdaLN — gets int8 weights with one
float32 scale per output channel, via torchao's ``quantize_`` (``Int8WeightOnlyConfig`` /
``Int8DynamicActivationInt8WeightConfig``, torchao 0.18, https://github.com/pytorch/ao). The output ``head`` and the
tiny input ``word_embed`` stay in the model's dtype: the head's logits decide the sampled tokens (and are 1-2 % of
the weights), and the engine sizes its KV cache from ``head.weight``'s dtype.

Modes: ``weight`` (default) — int8 weights, activations in the model's dtype (fp32 or bf16; torchao converts
the int8 weight to the activation dtype inside each matmul); ``dynamic`` — the attention/MLP linears also
quantize their input per token to int8 and run an int8 x int8 matmul (``torch._int_mm``, oneDNN on CPU); the
AdaLN projections stay weight-only there, since they run once per request on the class embeddings, so
quantizing their input would add error for no speed.

On a CPU int8 is a memory feature, not a speed one: weight-only int8 runs at the activation dtype's speed with half
bf16's weight bytes (measurements: ``benchmarks/RESULTS.md``, "int8 weights"). torch's own fused weight-only kernel
(``aten._weight_int8pack_mm``), considered as a fallback, was far slower than an fp32 GEMM here, so there is none:
without torchao the method says how to install it. Lossy (logits ~0.5-0.9 % relative on a random model, the size of
bf16's own rounding): measure fidelity on your model. Needs torchao (``pip install 'nextscale[int8]'``);
``quantize_int8`` takes seconds for d16, so callers cache the copy.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol, cast

import torch
from torch import nn

from nextscale.accel.base import Accel, M, PlanContext, register
from nextscale.engine.var.plan import StepPlan
from nextscale.errors import InvalidInputError

MODES = ("weight", "dynamic")
INSTALL_HINT = "pip install 'nextscale[int8]' (torchao)"


# ---- the backend -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """torchao's import logs warnings that say nothing about int8 on this machine (its CUDA/mxfp8 C extensions
    failing to load on a CPU build, a torch pytree deprecation notice); keep them out of the CLI's output."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@functools.cache
def _torchao() -> ModuleType | None:
    """``torchao.quantization`` with the configs this module uses, or None (not installed, or incompatible with
    this torch: an import error of any kind means the backend is unusable)."""
    try:
        with _quiet_import():
            import torchao.quantization as tq

        for name in ("quantize_", "Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"):
            getattr(tq, name)
    except Exception:  # any failure to import means "not available", reported by the caller
        return None
    return tq


def int8_available() -> bool:
    """Whether the int8 backend (torchao) imports with this torch."""
    return _torchao() is not None


def _backend() -> ModuleType:
    tq = _torchao()
    if tq is None:
        raise InvalidInputError(f"int8 needs torchao, which is not installed or does not import; {INSTALL_HINT}")
    return tq


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidInputError(f"int8: mode={mode!r} is not one of: {', '.join(MODES)}")


# ---- quantization ------------------------------------------------------------------------------------------------
class Quantizable(Protocol):
    """A transformer whose linear layers int8 may quantize: (per-token, per-request) module names."""

    def linear_roles(self) -> tuple[list[str], list[str]]: ...


def quantize_int8(model: M, mode: str = "weight") -> M:
    """A copy of ``model`` with int8 linear weights (see the module docstring); ``model`` is not changed.

    The weights being quantized are not copied first, so the peak memory is the original, plus the copy's other
    parameters, plus the int8 weights — not two full models."""
    _check_mode(mode)
    tq = _backend()
    tokens, adaln = cast(Quantizable, model).linear_roles()
    modules = dict(model.named_modules())
    # deepcopy would duplicate every weight only for quantize_ to drop the copies; sharing the ones it replaces
    # is safe because it reads them (new tensors out) and then swaps the copy's parameter for a new one.
    memo = {id(modules[n].weight): modules[n].weight for n in tokens + adaln}
    q = copy.deepcopy(model, memo)
    # set_inductor_config=False: the default changes torch._inductor's global settings, which this eager path
    # does not use and other code in the process should not inherit.
    weight_only = tq.Int8WeightOnlyConfig(set_inductor_config=False)
    if mode == "weight":
        token_cfg = weight_only
    else:
        from torchao.utils import should_reduce_range

        # Without VNNI the CPU's u8 x s8 instructions (vpmaddubsw) saturate int16 sums (2.4 % logit error instead
        # of 0.6 % on the test model): torchao's rule is to quantize to the 7-bit range there. torchao asks the
        # CPU; oneDNN, which runs the GEMM, may also be capped below VNNI by its environment variable.
        device = modules[tokens[0]].weight.device
        reduce = should_reduce_range(device) or (device.type == "cpu" and _onednn_capped_below_vnni())
        token_cfg = tq.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False, reduce_range=reduce)
    for names, cfg in ((tokens, token_cfg), (adaln, weight_only)):
        chosen = set(names)
        tq.quantize_(q, cfg, filter_fn=lambda m, fqn, chosen=chosen: fqn in chosen)
    q_modules = dict(q.named_modules())
    left = [n for n in tokens + adaln if q_modules[n].weight is modules[n].weight]
    assert not left, f"int8: weights still shared with the exact model: {left}"
    return q.eval().requires_grad_(False)


def _onednn_capped_below_vnni() -> bool:
    """``ONEDNN_MAX_CPU_ISA`` (or its old name) set to an ISA without int8 dot products (VNNI)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    return isa.strip().upper() in ("SSE41", "AVX", "AVX2", "AVX512_CORE")


def _tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor; for a tensor subclass (torchao's ``Int8Tensor``) the sum over the tensors it
    wraps, since its own ``nbytes``/``element_size`` report the dtype it stands for (4 bytes for an int8 weight
    of an fp32 model)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters as stored: for a quantized weight its int8 data, float32 scales and (all
    zero, symmetric quantization) int8 zero points."""
    return sum(_tensor_bytes(p) for p in model.parameters())


def is_int8(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is stored as int8 (a torchao quantized tensor)."""
    inner = getattr(weight, "qdata", None)
    return isinstance(inner, torch.Tensor) and inner.dtype == torch.int8


# ---- the plug-in -------------------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class Int8(Accel):
    """``mode``: ``weight`` (int8 weights, default) or ``dynamic`` (int8 activations too). Changes the model,
    not the per-scale plan: ``transform`` gives the quantized copy the request runs on."""

    name = "int8"
    lossless = False
    transforms_model = True
    mode: str = "weight"

    def __post_init__(self) -> None:
        _check_mode(self.mode)

    def apply(self, steps: list[StepPlan], ctx: PlanContext) -> list[StepPlan]:
        _backend()  # refuse the request while planning, before any model is touched
        return steps

    def transform(self, model: M) -> M:
        """The quantized copy of ``model`` (slow: quantizes every linear layer; cache it per ``spec()``)."""
        return quantize_int8(model, self.mode)
