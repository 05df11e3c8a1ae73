"""Training throughput, fp32 vs bf16 autocast: the demo transformer config and a VAR-d16-shaped model.

    python benchmarks/bench_train.py                    # demo + d16, a few steps each
    python benchmarks/bench_train.py --models demo --steps 20

One step = forward (teacher forcing on random tokens) + cross-entropy + backward + AdamW with the official
parameter groups and gradient clipping, the same step ``nextscale train`` takes. Reports images/s, s/step,
peak RSS growth and achieved GFLOP/s (3x the forward's GEMM + attention FLOPs) against a GEMM peak measured
in the same process. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

from nextscale.bench import Cell, gemm_peak_gflops, interleave, machine_info, markdown_table, write_json
from nextscale.config import VARConfig
from nextscale.models.var import VAR
from nextscale.train.optim import make_adamw

MODELS = {
    "demo": (
        VARConfig(
            depth=6,
            embed_dim=192,
            num_heads=3,
            num_classes=10,
            vocab_size=512,
            z_channels=16,
            patch_nums=(1, 2, 3, 4, 6, 8),
        ),
        128,
    ),
    "d16": (VARConfig(depth=16, embed_dim=1024, num_heads=16), 8),
}


def forward_gflop(cfg: VARConfig, batch: int) -> float:
    C, hidden, L = cfg.embed_dim, cfg.mlp_hidden, cfg.seq_len
    attn = sum(4 * (p * p) * sum(q * q for q in cfg.patch_nums[: i + 1]) * C for i, p in enumerate(cfg.patch_nums))
    per_img = cfg.depth * (2 * L * C * (4 * C + 2 * hidden) + attn) + 2 * L * C * cfg.vocab_size
    return batch * per_img / 1e9


def make_step(cfg: VARConfig, batch: int, precision: str):
    torch.manual_seed(0)
    model = VAR(cfg).train()
    model.init_weights(init_adaln_gamma=1e-3)
    opt = make_adamw(model, 1e-4, 0.05)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    x_in = torch.randn(batch, cfg.seq_len - 1, cfg.z_channels, generator=g)
    gt = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with amp:
            logits = model(labels, x_in)
        loss = F.cross_entropy(logits.float().transpose(1, 2), gt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def precisions(spec: str, model: str) -> list[str]:
    """``"fp32,bf16"`` for every model, or ``"demo:fp32,bf16;d16:fp32"`` per model (fp32 where unnamed)."""
    if ":" not in spec:
        chosen = spec.split(",")
    else:
        per = dict(part.split(":", 1) for part in spec.split(";"))
        chosen = per.get(model, "fp32").split(",")
    bad = [c for c in chosen if c not in ("fp32", "bf16")]
    if bad:
        raise SystemExit(f"unknown precision {bad[0]!r}: fp32 or bf16")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,d16")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell (after one warm-up step)")
    p.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="per model, e.g. 'fp32,bf16' or 'demo:fp32,bf16;d16:fp32' (bf16 is emulated on AVX2 CPUs)",
    )
    p.add_argument("--out", default="benchmarks/results/bench_train.json")
    args = p.parse_args(argv)
    peaks = {"fp32": gemm_peak_gflops(torch.float32), "bf16": gemm_peak_gflops(torch.bfloat16)}
    print(f"GEMM peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", file=sys.stderr)
    cells, rows = [], []
    for name in args.models.split(","):
        cfg, batch = MODELS[name]
        precs = precisions(args.precisions, name)
        row = [Cell(f"{name}/{prec}", {"model": name, "precision": prec, "batch": batch}) for prec in precs]
        interleave(row, [make_step(cfg, batch, c.params["precision"]) for c in row], args.steps)
        gflop = 3 * forward_gflop(cfg, batch)
        for c in row:
            ips = batch / c.median_s
            gfs = gflop / c.median_s
            c.extra.update({"images_per_s": ips, "gflop_per_step": gflop})
            rows.append(
                [
                    name,
                    c.params["precision"],
                    batch,
                    ips,
                    c.median_s,
                    c.peak_rss_mb,
                    gfs,
                    f"{100 * gfs / peaks[c.params['precision']]:.0f}%",
                    len(c.clean()),
                ]
            )
        cells += row
    print(
        markdown_table(
            [
                "model",
                "precision",
                "batch",
                "images/s",
                "s/step",
                "peak RSS MB",
                "GFLOP/s",
                "% GEMM peak",
                "clean reps",
            ],
            rows,
        )
    )
    write_json(
        args.out,
        {
            "benchmark": "bench_train",
            "machine": machine_info(),
            "gemm_peak_gflops": peaks,
            "cells": [c.to_dict() for c in cells],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
