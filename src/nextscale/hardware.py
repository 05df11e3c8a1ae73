"""What the machine can do fast, read at run time: CPU feature flags and the best sampling dtype.

Machines differ between runs of the same code (AVX2-only CPUs emulate bf16 at ~4x the cost of fp32; AVX-512-BF16
and AMX CPUs run bf16 GEMMs ~3.5x faster than fp32 — see benchmarks/RESULTS.md), so the dtype is chosen here,
per machine, never assumed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu() -> bool:
    """bf16 matrix units on this CPU (AVX512-BF16 or AMX), i.e. bf16 is faster than fp32 here, not emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it and on CPUs with native bf16; fp32 elsewhere (bf16 is emulated there)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if native_bf16_cpu() else torch.float32
