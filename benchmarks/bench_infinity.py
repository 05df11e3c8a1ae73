"""Infinity acceleration: token-phase speed and peak KV memory on random models of the released shapes, vs exact.

    python benchmarks/bench_infinity.py                          # both shapes, 3 reps (~20 min on 2 CPU cores)
    python benchmarks/bench_infinity.py --shape 125m-1024 --reps 2
    python benchmarks/bench_infinity.py --shape 125m-1024 --methods exact,fastvar,fast
    python benchmarks/bench_infinity.py --device cuda --dtype bf16

Shapes (random weights; speed does not depend on them): ``125m-1024`` = ``infinity_layer12`` (depth 12, width 768,
8 heads, the d32 tokenizer's 32 bits) on the 1M schedule (13 scales, 64 x 64 tokens, 1024 px); ``2b-256`` =
``infinity_2b`` (depth 32, width 2048, 16 heads) on the 0.06M schedule (7 scales, 16 x 16 tokens, 256 px). Text:
random T5-XL-width features of 32 tokens per prompt. Token phase only (the scale loop through the last bits, no
tokenizer decode), batch ``--batch``, guidance on (2 rows per image) as the official scripts, float32 (the
official fp32 path; bf16 weights are not supported yet). For every method
and preset, interleaved with exact in one process: median time, the ratio to exact, the FLOP-model ratio (query
rows x tokens through the transformer, the linear layers' share of the work) and peak KV bytes (self-attention
cache, what ``scalekv``/``hack`` compress). The machine's bf16/fp32 GEMM peak is measured in the same run.
Prints markdown tables and writes JSON.

``--part fidelity`` measures what each method costs in prompt following on the bundled text-to-image model
(``demo-fmnist-t2i``): the same prompts and seeds as exact, the pair accuracy of seen prompts, held-out pairs and
held-out phrasings (the bundled demo classifier reads each half) and the halves' Fréchet distance to real test items
(``jobs.prompt_quality``)::

    python benchmarks/bench_infinity.py --part fidelity --images 300 --batch 32 --reps 3

and the wall clock of each method there (``--batch`` seen prompts per repetition, interleaved with exact).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from nextscale.accel import PlanContext, build_plan, resolve
from nextscale.accel.base import transform_model
from nextscale.bench import Cell, gemm_peak_gflops, interleave, machine_info, markdown_table, write_json
from nextscale.engine.infinity.params import InfinityParams
from nextscale.engine.infinity.state import InfinityGeneration, own_cache, request_rows
from nextscale.models.infinity import Infinity, InfinityConfig
from nextscale.models.infinity_scales import schedule
from nextscale.models.text_encoder import TextFeatures
from nextscale.models.tokenizers.bsq import BSQVAE, BSQVAEConfig

SHAPES = {  # name -> (release model type, pn)
    "125m-1024": ("infinity_layer12", "1M"),
    "2b-256": ("infinity_2b", "0.06M"),
}
METHODS = {
    "exact": [],
    "cfg-cutoff:last=3": ["cfg-cutoff:last=3"],
    "skip-scales:last=2": ["skip-scales:last=2"],
    "fastvar": ["fastvar"],
    "fastvar:skip= (pruning only)": ["fastvar:skip="],
    "scalekv:budget=0.1": ["scalekv:budget=0.1"],
    "hack": ["hack"],
    "int8": ["int8"],
    "balanced": "balanced",
    "fast": "fast",
    "fast + scalekv:budget=0.1": ["fast", "scalekv:budget=0.1"],
    # preset candidates
    "cfg-cutoff:last=4": ["cfg-cutoff:last=4"],
    "cfg-cutoff:last=3 + fastvar:skip=": ["cfg-cutoff:last=3", "fastvar:skip="],
    "cfg-cutoff:last=3 + fastvar": ["cfg-cutoff:last=3", "fastvar"],
    "cfg-cutoff:last=4 + fastvar:skip=": ["cfg-cutoff:last=4", "fastvar:skip="],
    # candidates for models of few scales (the text-to-image demo's 6: its last two are 85 % of the tokens)
    "cfg-cutoff:last=2": ["cfg-cutoff:last=2"],
    "cfg-cutoff:last=2 + fastvar:skip=": ["cfg-cutoff:last=2", "fastvar:skip="],
}
TEXT_TOKENS = 32


def build(shape: str, dtype: torch.dtype, device: str) -> tuple[Infinity, BSQVAE, Any]:
    release, pn = SHAPES[shape]
    cfg = InfinityConfig.release(release, bits=32, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = Infinity(cfg)
    with torch.no_grad():  # random weights at init scale (the constructor leaves some parameters uninitialised)
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            else:
                p.normal_(0, 0.02)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    with torch.device("meta"):  # the token phase reads the tokenizer's configuration only (codes from bits)
        vae = BSQVAE(BSQVAEConfig(bits=32))
    return model, vae, schedule(1.0, pn)


def plan_for(model: Infinity, sched: Any, accel: Any) -> tuple[Any, Infinity]:
    """The plan of ``accel`` (None: exact) and the model it runs on (an int8 copy for int8)."""
    ctx = PlanContext(
        tuple(h for h, _ in sched.grids), model.depth, None, model.cfg.num_heads, grids=sched.grids, family="infinity"
    )
    methods = resolve(accel, ctx)
    return (build_plan(methods, ctx) if methods else None), transform_model(methods, model)


def run_once(model: Infinity, vae: BSQVAE, sched: Any, plan: Any, batch: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    text = TextFeatures(torch.randn(batch * TEXT_TOKENS, model.cfg.text_channels, generator=g), (TEXT_TOKENS,) * batch)
    text = TextFeatures(text.kv_compact.to(model.head.weight.device), text.lens)
    params = InfinityParams(seed=0)
    rows = request_rows(params, sched, batch, plan)
    kv = own_cache(model, rows, sched, plan, sched.seq_len)
    gens = params.generators(batch, model.head.weight.device)
    gen = InfinityGeneration(model, vae, text, sched, params, gens, kv, release=kv.free, plan=plan)
    try:
        with torch.inference_mode():
            while not gen.done:
                gen.step()
        return gen.stats()
    finally:
        gen.release()


def bench_shape(
    shape: str, dtype: torch.dtype, device: str, reps: int, batch: int, names: list[str]
) -> tuple[list[Cell], str]:
    model, vae, sched = build(shape, dtype, device)
    plans = {name: plan_for(model, sched, METHODS[name]) for name in names}
    cells = [Cell(name, {"shape": shape, "batch": batch}) for name in names]
    stats: dict[str, Any] = {}

    def fn(name: str) -> Any:
        def go() -> None:
            plan, runs_on = plans[name]
            stats[name] = run_once(runs_on, vae, sched, plan, batch)
            if device == "cuda":
                torch.cuda.synchronize()

        return go

    interleave(cells, [fn(n) for n in names], reps)
    exact = cells[0]
    work0 = sum(stats["exact"]["rows_x_tokens"])
    kv0 = stats["exact"]["kv_bytes_peak"]
    rows = []
    for c in cells:
        s = stats[c.name]
        speed = exact.median_s / c.median_s
        flop = work0 / max(1, sum(s["rows_x_tokens"]))
        kv = s["kv_bytes_peak"] / kv0
        c.extra.update(speedup=speed, flop_model_speedup=flop, kv_bytes_peak=s["kv_bytes_peak"], kv_ratio=kv)
        rows.append([c.name, c.median_s, f"{speed:.2f}x", f"{flop:.2f}x", f"{s['kv_bytes_peak'] / 2**20:.0f}", kv])
    h, w = sched.image_size
    title = f"{shape}: {model.cfg.release_name()} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params), "
    title += f"{sched.num_scales} scales to {h}x{w} px, batch {batch}, {dtype}"
    table = markdown_table(["method", "token phase s", "speed-up", "FLOP model", "peak KV MB", "KV / exact"], rows)
    return cells, f"### {title}\n\n{table}\n"


def fidelity(
    model: str, names: list[str], images: int, seed: int, reps: int, speed_batch: int
) -> tuple[dict[str, Any], str]:
    """Prompt following and FD of every method on ``model``, with exact's prompts and seeds; and its speed."""
    from nextscale.data import fashion_mnist
    from nextscale.data.captions import prompts
    from nextscale.eval.classifier import load_classifier
    from nextscale.jobs.prompt_quality import KINDS, prompt_quality, real_item_scale
    from nextscale.models.native import bundled_model_dir
    from nextscale.pipelines.infinity import InfinityPipeline

    pipe = InfinityPipeline.from_pretrained(model)
    net = load_classifier(bundled_model_dir("demo-fmnist") / "classifier")
    train, test = fashion_mnist("train", size=32), fashion_mnist("test", size=32)
    real = (test.images.permute(0, 2, 3, 1).numpy(), test.labels.numpy())
    scale = real_item_scale(net, train.images[:10000].permute(0, 2, 3, 1).numpy(), real[0])["FD-classifier"]
    counts = dict.fromkeys(KINDS, images)
    reports: dict[str, Any] = {}
    rows = []
    for name in names:
        accel = METHODS[name] or None
        r = prompt_quality(pipe, net, real, counts, {"seed": seed, "accel": accel})
        r["fd_ratio"] = r["FD-classifier"] / scale
        reports[name] = r
        ex = reports[names[0]]
        cells = [name]
        for kind in KINDS:
            acc, acc0 = r[kind]["pair_accuracy"], ex[kind]["pair_accuracy"]
            cells.append(f"{100 * acc:.1f}" + ("" if name == names[0] else f" ({100 * (acc - acc0):+.1f})"))
        cells.append(f"{r['fd_ratio']:.2f}x")
        rows.append(cells)
        print(" | ".join(cells), flush=True)
    # Wall clock on this model, interleaved with exact: one batch of ``speed_batch`` seen prompts per repetition.
    asked = [p for p, _, _ in prompts("seen")[:speed_batch]]
    cells = [Cell(name, {"batch": speed_batch}) for name in names]

    def run(name: str) -> Any:
        return lambda: pipe(asked, seed=seed, accel=METHODS[name] or None, output_type="pt")

    interleave(cells, [run(n) for n in names], reps)
    for row, c in zip(rows, cells):
        row.append(f"{cells[0].median_s / c.median_s:.2f}x")
        reports[c.name]["wall"] = c.to_dict()
    d = pipe.sampling_defaults
    title = f"fidelity on {model}: {images} images per prompt kind, seed {seed}, cfg {d['cfg']}, tau {d['tau']}"
    headers = ["method", *(f"pairs {k} %" for k in KINDS), "FD halves / real", f"x exact (wall, batch {speed_batch})"]
    return {"real_fd": scale, "reports": reports}, f"### {title}\n\n{markdown_table(headers, rows)}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32",), default="fp32", help="Infinity runs in float32 for now")
    ap.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, exact first; of: {', '.join(METHODS)}"
    )
    ap.add_argument("--json", default="benchmarks/results/bench_infinity.json")
    ap.add_argument("--part", choices=("speed", "fidelity"), default="speed")
    ap.add_argument("--model", default="demo-fmnist-t2i", help="fidelity: the text-to-image model")
    ap.add_argument("--images", type=int, default=300, help="fidelity: images per prompt kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not names or names[0] != "exact" or any(n not in METHODS for n in names):
        ap.error(f"--methods: exact first, then any of: {', '.join(METHODS)}; got {args.methods!r}")
    dtype = torch.float32
    info = machine_info()
    peaks = {"bf16": gemm_peak_gflops(torch.bfloat16), "fp32": gemm_peak_gflops(torch.float32)}
    print(f"machine: {info}; GEMM peak GFLOP/s: bf16 {peaks['bf16']:.0f}, fp32 {peaks['fp32']:.0f}", flush=True)
    out: dict[str, Any] = {"machine": info, "gemm_peak_gflops": peaks, "dtype": str(dtype), "shapes": {}}
    if args.part == "fidelity":
        result, text = fidelity(args.model, names, args.images, args.seed, args.reps, args.batch)
        print(text, flush=True)
        out["fidelity"] = {"table": text, **result}
        print(f"wrote {write_json(args.json, out)}")
        return 0
    for shape in SHAPES if args.shape == "all" else [args.shape]:
        cells, text = bench_shape(shape, dtype, args.device, args.reps, args.batch, names)
        print(text, flush=True)
        out["shapes"][shape] = {"table": text, "cells": [c.to_dict() for c in cells]}
    print(f"wrote {write_json(args.json, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
