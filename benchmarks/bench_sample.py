"""Sampling throughput: the reference loop vs the fast path (fp32 and bf16), on random-weight models.

    python benchmarks/bench_sample.py                       # tiny + d16-shaped, batch 1/8/16, all modes
    python benchmarks/bench_sample.py --models d16 --batch-sizes 8 --reps 2

Models: ``d16`` has the shape of VAR-d16 with the 256 px VQ-VAE (ch 160); ``tiny`` is a 4-layer, width-256
VAR with a ch-32 VQ-VAE at 256 px. Modes: ``reference`` = the oracle loop (``engine/var/reference.py``), one
image at a time as the house style's naive per-sample loop, float32, decoder in the official (NCHW) layout;
``fast`` = ``VARPipeline`` in float32 (batched, preallocated KV cache, conditioning computed once, NHWC
decoder); ``fast-bf16`` = the same in bfloat16. Every cell generates full images (tokens + VQ-VAE decode).
Prints a markdown table, writes JSON. GFLOP/s counts the transformer analytically (GEMMs + attention) and
the decoder with torch's FLOP counter; "% peak" compares with a GEMM measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from nextscale.bench import Cell, gemm_peak_gflops, interleave, machine_info, markdown_table, write_json
from nextscale.config import VARConfig, VQVAEConfig
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR
from nextscale.pipelines.var import VARPipeline

MODELS = {
    "tiny": (dict(depth=4, embed_dim=256, num_heads=4), dict(ch=32)),
    "d16": (dict(depth=16, embed_dim=1024, num_heads=16), dict(ch=160)),
}
SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)  # the official FID recipe


def build(name: str, seed: int = 0) -> tuple[VAR, VQVAE]:
    var_kw, vae_kw = MODELS[name]
    torch.manual_seed(seed)
    var = VAR(VARConfig(**var_kw))
    var.init_weights(init_adaln_gamma=1e-3)  # the d16 training recipe's gamma init: non-trivial blocks
    vae = VQVAE(VQVAEConfig(**vae_kw))
    return var.eval(), vae.eval()


def transformer_gflop_per_image(cfg: VARConfig) -> float:
    """GEMM + attention FLOPs of one CFG image (2 rows) through all scales."""
    C, hidden, V = cfg.embed_dim, cfg.mlp_hidden, cfg.vocab_size
    total, cum = 0.0, 0
    for pn in cfg.patch_nums:
        l = pn * pn
        cum += l
        per_block = 2 * l * C * (3 * C + C + 2 * hidden) + 4 * l * cum * C
        total += cfg.depth * per_block + 2 * l * C * V + 2 * l * cfg.z_channels * C
    return 2 * total / 1e9


def decoder_gflop_per_image(vae: VQVAE) -> float:
    side = vae.cfg.patch_nums[-1]
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        vae.fhat_to_img(torch.zeros(1, vae.cfg.z_channels, side, side))
    return counter.get_total_flops() / 1e9


def make_runners(var: VAR, vae: VQVAE, modes: list[str], B: int):
    labels = [i % var.num_classes for i in range(B)]
    pipes, fns = {}, {}
    for mode in modes:
        dtype = torch.bfloat16 if mode == "fast-bf16" else torch.float32
        pipes[mode] = VARPipeline(
            copy.deepcopy(var), copy.deepcopy(vae), dtype=dtype, channels_last_decoder=mode != "reference"
        )
    results: dict[str, list] = {}

    def reference() -> None:
        pipe = pipes["reference"]
        toks = [
            pipe([lab], seed=0, output_type="pt", sampler="reference", first_image_index=i, **SAMPLING).tokens
            for i, lab in enumerate(labels)
        ]
        results["reference"] = [torch.cat([t[si] for t in toks]) for si in range(len(toks[0]))]

    def fast(mode: str) -> None:
        results[mode] = pipes[mode](labels, seed=0, output_type="pt", **SAMPLING).tokens

    for mode in modes:
        fns[mode] = reference if mode == "reference" else (lambda m=mode: fast(m))
    return fns, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,d16")
    p.add_argument("--batch-sizes", default="1,8,16")
    p.add_argument("--modes", default="reference,fast,fast-bf16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per cell (0 for very slow cells)")
    p.add_argument("--out", default="benchmarks/results/bench_sample.json")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    print("machine:", machine_info(), file=sys.stderr)
    peaks = {"float32": gemm_peak_gflops(torch.float32), "bfloat16": gemm_peak_gflops(torch.bfloat16)}
    print(
        f"GEMM peak (F.linear 2048x1024 -> 4096): fp32 {peaks['float32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bfloat16']:.0f} GFLOP/s",
        file=sys.stderr,
    )
    cells: list[Cell] = []
    for name in args.models.split(","):
        var, vae = build(name)
        gflop_img = transformer_gflop_per_image(var.cfg) + decoder_gflop_per_image(vae)
        for B in (int(b) for b in args.batch_sizes.split(",")):
            fns, results = make_runners(var, vae, modes, B)
            row = [Cell(f"{name}/B{B}/{m}", {"model": name, "batch": B, "mode": m}) for m in modes]
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                for m in modes:
                    fns[m]()
            interleave(row, [fns[m] for m in modes], args.reps, warmup=False)
            if "reference" in results and "fast" in results:
                same = all(torch.equal(a, b) for a, b in zip(results["reference"], results["fast"]))
                for c in row:
                    c.extra["fast_fp32_tokens_equal_reference"] = same
            for c in row:
                c.extra["gflop_per_image"] = gflop_img
            cells += row
            print(f"{name} B={B}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    rows = []
    for c in cells:
        B, mode = c.params["batch"], c.params["mode"]
        ref = next((r for r in cells if r.params == {**c.params, "mode": "reference"}), None)
        ips = B / c.median_s
        gfs = c.extra["gflop_per_image"] * ips
        peak = peaks["bfloat16" if mode.endswith("bf16") else "float32"]
        speed = ref.median_s / c.median_s if ref else float("nan")
        rows.append(
            [
                c.params["model"],
                B,
                mode,
                ips,
                c.median_s / B,
                speed,
                c.peak_rss_mb,
                gfs,
                f"{100 * gfs / peak:.0f}%",
                len(c.clean()),
                c.extra.get("fast_fp32_tokens_equal_reference", "") if mode == "fast" else "",
            ]
        )
    header = [
        "model",
        "batch",
        "mode",
        "images/s",
        "s/image",
        "x reference",
        "peak RSS MB",
        "GFLOP/s",
        "% GEMM peak",
        "clean reps",
        "fp32 fast == ref tokens",
    ]
    print(markdown_table(header, rows))
    write_json(
        args.out,
        {
            "benchmark": "bench_sample",
            "machine": machine_info(),
            "gemm_peak_gflops": peaks,
            "sampling": SAMPLING,
            "cells": [c.to_dict() for c in cells],
        },
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
