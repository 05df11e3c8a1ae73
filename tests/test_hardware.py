"""dtype="auto" follows what the CPU runs natively (bf16 is emulated, and slower than fp32, without it)."""

from __future__ import annotations

import pytest
import torch

from nextscale import hardware
from nextscale.pipelines.var import VARPipeline

from .conftest import tiny_pair


@pytest.mark.parametrize(
    "flags, dtype",
    [({"avx2", "fma"}, torch.float32), ({"avx512f", "avx512_bf16"}, torch.bfloat16), ({"amx_bf16"}, torch.bfloat16)],
)
def test_auto_dtype_follows_the_cpu(monkeypatch, flags, dtype):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.auto_dtype(torch.device("cpu")) == dtype
    var, vae = tiny_pair(0)
    pipe = VARPipeline(var, vae, dtype="auto")
    assert pipe.dtype == dtype and pipe.transformer.head.weight.dtype == dtype
    assert pipe.vae.quantize.embedding.weight.dtype == torch.float32, "code search stays float32"


def test_cpu_flags_are_read_from_this_machine():
    flags = hardware.cpu_flags()
    assert isinstance(flags, frozenset)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert "avx2" in flags
