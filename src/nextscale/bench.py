"""Benchmark harness: honest timing on a shared CPU, memory high-water marks, GEMM peaks, tables and JSON.

Rules it implements (see the project's notes on this machine): time repetitions back to back after a warm-up,
report min and median, record how busy the *other* processes kept the CPU during each repetition (from
``/proc/stat`` minus this process's own CPU time) and flag contaminated repetitions, and compare
implementations only within one process, interleaved.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nextscale import env
from nextscale.hardware import cpu_flags


def _busy_jiffies() -> tuple[float, float] | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    vals = [float(x) for x in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
    return sum(vals) - idle, sum(vals)


@dataclass
class Rep:
    seconds: float
    foreign_cores: float  # average number of cores other processes kept busy during this repetition
    peak_rss_mb: float  # high-water mark of this process's resident memory above the pre-run level

    @property
    def contaminated(self) -> bool:
        return self.foreign_cores > 0.25


class _RSSSampler:
    """Polls /proc/self/statm in a thread; ``peak`` is the max RSS seen (MB)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss_mb(self) -> float:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * self._page / 2**20
        except OSError:
            return 0.0

    def __enter__(self) -> _RSSSampler:
        self.base = self.peak = self.rss_mb()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss_mb())


def timed(fn: Callable[[], Any]) -> tuple[Rep, Any]:
    """Run ``fn`` once; wall time, foreign CPU load and peak RSS increase."""
    before = _busy_jiffies()
    own0 = os.times()
    with _RSSSampler() as rss:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    own1 = os.times()
    after = _busy_jiffies()
    foreign = 0.0
    if before and after and dt > 0:
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (after[0] - before[0]) / hz
        own = (own1.user - own0.user) + (own1.system - own0.system)
        foreign = max(0.0, busy - own) / dt
    return Rep(dt, foreign, max(0.0, rss.peak - rss.base)), out


@dataclass
class Cell:
    """All repetitions of one configuration."""

    name: str
    params: dict[str, Any]
    reps: list[Rep] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def clean(self) -> list[Rep]:
        good = [r for r in self.reps if not r.contaminated]
        return good or self.reps

    @property
    def min_s(self) -> float:
        return min(r.seconds for r in self.clean())

    @property
    def median_s(self) -> float:
        return statistics.median(r.seconds for r in self.clean())

    @property
    def peak_rss_mb(self) -> float:
        return max(r.peak_rss_mb for r in self.reps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "min_s": self.min_s,
            "median_s": self.median_s,
            "peak_rss_mb": self.peak_rss_mb,
            "reps": [asdict(r) | {"contaminated": r.contaminated} for r in self.reps],
            **self.extra,
        }


def interleave(cells: Sequence[Cell], fns: Sequence[Callable[[], Any]], reps: int, warmup: bool = True) -> None:
    """ABAB...: one repetition of every cell per round, so drift and noise hit all cells alike."""
    if warmup:
        for fn in fns:
            fn()
    for _ in range(reps):
        for cell, fn in zip(cells, fns):
            rep, _ = timed(fn)
            cell.reps.append(rep)


def gemm_peak_gflops(dtype: torch.dtype, m: int = 2048, k: int = 1024, n: int = 4096, reps: int = 5) -> float:
    """Best-of-``reps`` throughput of one large ``F.linear`` (the models' GEMM) in ``dtype``, now.

    ``F.linear`` rather than ``torch.mm``: on CPUs without native bf16, ``mm`` in bf16 falls back to a naive
    kernel ~50x slower than the linear path the models actually use.
    """
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    torch.nn.functional.linear(x, w)
    best = min(timed(lambda: torch.nn.functional.linear(x, w))[0].seconds for _ in range(reps))
    return 2 * m * k * n / best / 1e9


def machine_info() -> dict[str, Any]:
    flags = cpu_flags()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "ld_preload": env.ld_preload(),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
