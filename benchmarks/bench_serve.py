"""Serving under open-loop Poisson load: one request at a time vs static batching vs the continuous engine.

    python benchmarks/bench_serve.py --model demo                 # the bundled Fashion-MNIST model
    python benchmarks/bench_serve.py --model d16 --requests 24    # random weights shaped like VAR-d16

All three modes run in this process on the same model and the same kernels (``engine.runner``), fed the same
arrival schedule in real time by a driver thread: *sequential* serves one request at a time; *static*
collects up to B requests or waits T seconds after the first, then runs that batch through all scales
(later arrivals wait for the next batch) — it is swept over (B, T) and the best p99 per load is reported;
*continuous* is ``Engine``: arrivals join at the next iteration. Each request is one image (guided, the
model's default settings); latency = arrival -> decoded image; TTFP = arrival -> first scale's tokens (a
coarse preview is one decode away in every mode). Loads are fractions of the measured saturation rate.
Writes a markdown table, JSON and a PNG plot (p99 latency against load).
"""

from __future__ import annotations

import argparse
import dataclasses
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nextscale.config import VARConfig, VQVAEConfig
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.request import SamplingParams
from nextscale.engine.runner import ModelRunner
from nextscale.engine.sampling import image_generators
from nextscale.engine.state import Generation
from nextscale.eval.bench import machine_info, markdown_table, write_json
from nextscale.eval.plot import line_plot
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR


@dataclass
class Arrival:
    idx: int
    t: float  # seconds after the start of the run
    label: int
    seed: int
    start: float = 0.0  # absolute time the driver released it
    first: float = 0.0
    done: float = 0.0


@dataclass
class RunResult:
    mode: str
    load: float
    rate: float
    params: dict = field(default_factory=dict)
    latency: list[float] = field(default_factory=list)
    ttfp: list[float] = field(default_factory=list)
    throughput: float = 0.0

    def pct(self, xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else float("nan")

    def row(self) -> dict:
        return {"mode": self.mode, "load": self.load, "rate": self.rate, **self.params,
                "throughput": self.throughput, "p50": self.pct(self.latency, 50), "p95": self.pct(self.latency, 95),
                "p99": self.pct(self.latency, 99), "ttfp_p50": self.pct(self.ttfp, 50),
                "ttfp_p99": self.pct(self.ttfp, 99)}


def build(name: str) -> tuple[VAR, VQVAE, SamplingParams]:
    if name == "demo":
        from nextscale.pipeline import VARPipeline

        pipe = VARPipeline.from_pretrained()
        return pipe.transformer, pipe.vae, pipe.sampling_params(seed=0)
    torch.manual_seed(0)
    if name == "d16":
        var_cfg, vae_cfg = VARConfig(depth=16, embed_dim=1024, num_heads=16), VQVAEConfig(ch=160)
    elif name == "demo-random":  # the demo model's shape with random weights
        pn = (1, 2, 3, 4, 6, 8)
        var_cfg = VARConfig(depth=6, embed_dim=192, num_heads=3, num_classes=10, vocab_size=512, z_channels=16,
                            patch_nums=pn)
        vae_cfg = VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                              in_channels=1, using_sa=False, using_mid_sa=False, patch_nums=pn)
    elif name == "d16-128px":
        pn = (1, 2, 3, 4, 5, 6, 8)
        var_cfg, vae_cfg = VARConfig(depth=16, embed_dim=1024, num_heads=16, patch_nums=pn), \
            VQVAEConfig(ch=160, ch_mult=(1, 1, 2, 2, 4), patch_nums=pn)
    else:
        raise SystemExit(f"unknown model {name!r}: demo, demo-random, d16, d16-128px")
    var = VAR(var_cfg)
    var.init_weights(init_adaln_gamma=1e-3)
    top_k = min(900, var_cfg.vocab_size)
    return var.eval(), VQVAE(vae_cfg).eval(), SamplingParams(cfg=1.5, top_k=top_k, top_p=0.96, seed=0)


def schedule(rate: float, count: int, num_classes: int, seed: int) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, count) if rate > 0 else np.zeros(count)
    gaps[0] = 0.0
    times = np.cumsum(gaps)
    return [Arrival(i, float(t), int(rng.integers(num_classes)), 1000 + i) for i, t in enumerate(times)]


def drive(arrivals: list[Arrival], q: queue.Queue, t0: float) -> threading.Thread:
    def run() -> None:
        for a in arrivals:
            delay = t0 + a.t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            a.start = time.perf_counter()
            q.put(a)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def new_state(var: VAR, vae: VQVAE, a: Arrival, base: SamplingParams, lvl_pos: torch.Tensor) -> Generation:
    params = SamplingParams(cfg=base.cfg, top_k=base.top_k, top_p=base.top_p, seed=a.seed)
    return Generation(var, vae.quantize, torch.tensor([a.label]), params, image_generators(a.seed, 1),
                      lvl_pos_1LC=lvl_pos)


@torch.inference_mode()
def run_static(var: VAR, vae: VQVAE, arrivals: list[Arrival], base: SamplingParams, B: int, T: float) -> None:
    """Collect up to B requests (or T seconds after the first), run the batch through every scale."""
    runner, q, left = ModelRunner(var), queue.Queue(), len(arrivals)
    drive(arrivals, q, time.perf_counter())
    while left:
        batch = [q.get()]
        deadline = time.perf_counter() + T
        while len(batch) < B:
            try:
                batch.append(q.get(timeout=max(0.0, deadline - time.perf_counter())) if T > 0 else q.get_nowait())
            except queue.Empty:
                break
        states = [new_state(var, vae, a, base, runner.lvl_pos) for a in batch]
        while not states[0].done:
            runner.execute(states)
            if states[0].si == 1:
                now = time.perf_counter()
                for a in batch:
                    a.first = now
        for a, s in zip(batch, states):
            vae.fhat_to_img(s.f_hat)
            a.done = time.perf_counter()
            s.release()
        left -= len(batch)


@torch.inference_mode()
def run_continuous(var: VAR, vae: VQVAE, arrivals: list[Arrival], base: SamplingParams, cfg: EngineConfig) -> None:
    engine, q = Engine(var, vae, cfg), queue.Queue()
    by_id: dict[str, Arrival] = {}
    drive(arrivals, q, time.perf_counter())
    finished = 0
    while finished < len(arrivals):
        new = [] if engine.has_unfinished() else [q.get()]  # idle: block until the next arrival
        while True:
            try:
                new.append(q.get_nowait())
            except queue.Empty:
                break
        for a in new:
            params = SamplingParams(cfg=base.cfg, top_k=base.top_k, top_p=base.top_p, seed=a.seed)
            by_id[engine.add_request(torch.tensor([a.label]), params)] = a
        for ev in engine.step():
            now = time.perf_counter()
            a = by_id[ev.request_id]
            if ev.si == 0:
                a.first = now
            if ev.finished:
                a.done = now
                finished += 1


def measure(mode: str, var: VAR, vae: VQVAE, base: SamplingParams, arrivals: list[Arrival], load: float,
            rate: float, **kw) -> RunResult:
    t0 = time.perf_counter()
    if mode == "continuous":
        run_continuous(var, vae, arrivals, base, kw["engine"])
    else:
        run_static(var, vae, arrivals, base, kw["B"], kw["T"])
    span = max(a.done for a in arrivals) - t0
    params = {"admit_gap": kw["engine"].admit_gap} if mode == "continuous" else {"B": kw["B"], "T": kw["T"]}
    return RunResult(mode, load, rate, params, [a.done - a.start for a in arrivals],
                     [a.first - a.start for a in arrivals], len(arrivals) / span)


def fresh(arrivals: list[Arrival]) -> list[Arrival]:
    return [Arrival(a.idx, a.t, a.label, a.seed) for a in arrivals]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo | d16 | d16-128px")
    p.add_argument("--requests", type=int, default=200, help="requests per run")
    p.add_argument("--loads", default="0.3,0.5,0.7,0.9", help="fractions of the saturation rate")
    p.add_argument("--static-b", default="2,4,8,16", help="static batch sizes to sweep")
    p.add_argument("--static-t", default="0,0.5,2", help="batch windows to sweep, in mean inter-arrival times")
    p.add_argument("--max-tokens", type=int, default=1024, help="engine token budget per iteration")
    p.add_argument("--admit-gaps", default="0", help="engine admit_gap values to run (cohort admission; 0 = off)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = Path(args.out or f"benchmarks/results/bench_serve_{args.model}.json")
    var, vae, base = build(args.model)
    nc = var.num_classes
    gaps = [int(x) for x in args.admit_gaps.split(",")]
    engines = {g: EngineConfig(max_tokens_per_iter=args.max_tokens, max_images_per_request=1,
                               max_running_requests=256, admit_gap=g) for g in gaps}
    engine_cfg = engines[gaps[0]]
    # saturation: a burst of requests through the continuous engine
    burst = schedule(0.0, max(8, args.requests // 4), nc, seed=1)
    sat = measure("continuous", var, vae, base, burst, 1.0, 0.0, engine=engine_cfg).throughput
    print(f"saturation ~ {sat:.3g} images/s", file=sys.stderr)
    results: list[RunResult] = []
    for load in (float(x) for x in args.loads.split(",")):
        rate = load * sat
        arrivals = schedule(rate, args.requests, nc, seed=int(load * 1000))
        t0 = time.perf_counter()
        for ecfg in engines.values():
            results.append(measure("continuous", var, vae, base, fresh(arrivals), load, rate, engine=ecfg))
        results.append(measure("sequential", var, vae, base, fresh(arrivals), load, rate, B=1, T=0.0))
        for b in (int(x) for x in args.static_b.split(",")):
            for tw in (float(x) for x in args.static_t.split(",")):
                results.append(measure("static", var, vae, base, fresh(arrivals), load, rate, B=b, T=tw / rate))
        print(f"load {load}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    rows, best = [], {}
    for r in results:
        if r.mode == "static":
            key = r.load
            if key not in best or r.row()["p99"] < best[key].row()["p99"]:
                best[key] = r
    shown = [r for r in results if r.mode != "static"] + list(best.values())
    for r in sorted(shown, key=lambda r: (r.load, r.mode, r.params.get("admit_gap", 0))):
        d = r.row()
        static_ref = best[r.load].row()
        cfg_txt = (f"B={d['B']} T={d['T']:.2g}s" if r.mode == "static" else
                   f"admit_gap={d['admit_gap']}" if r.mode == "continuous" and len(gaps) > 1 else "")
        rows.append([f"{r.load:.1f}", f"{r.rate:.3g}", r.mode + (f" ({cfg_txt})" if cfg_txt else ""),
                     d["throughput"], d["p50"], d["p95"], d["p99"], d["p99"] / static_ref["p99"], d["ttfp_p50"],
                     d["ttfp_p99"], d["ttfp_p99"] / static_ref["ttfp_p99"]])
    header = ["load", "req/s", "mode", "images/s", "p50 s", "p95 s", "p99 s", "p99 / static", "TTFP p50 s",
              "TTFP p99 s", "TTFP p99 / static"]
    print(f"model {args.model}, {args.requests} requests per run, saturation {sat:.3g} img/s")
    print(markdown_table(header, rows))
    write_json(out, {"benchmark": "bench_serve", "model": args.model, "machine": machine_info(),
                     "saturation_images_per_s": sat, "engines": [dataclasses.asdict(e) for e in engines.values()],
                     "runs": [r.row() for r in results]})
    series = {"sequential": [(r.load, r.row()["p99"]) for r in shown if r.mode == "sequential"]}
    for g in gaps:
        series[f"continuous (admit_gap={g})" if len(gaps) > 1 else "continuous"] = [
            (r.load, r.row()["p99"]) for r in shown if r.mode == "continuous" and r.params["admit_gap"] == g]
    series["static (best B,T)"] = [(r.load, r.row()["p99"]) for r in best.values()]
    png = line_plot(series, out.with_suffix(".png"), title=f"p99 latency vs load ({args.model})",
                    xlabel="load (fraction of saturation)", ylabel="p99 latency (s)", log_y=True)
    print(f"wrote {out} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
