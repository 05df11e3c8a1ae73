"""Serving under open-loop Poisson load: one request at a time vs static batching vs the continuous engine.

    python benchmarks/bench_serve.py --model demo --repeats 3     # the bundled Fashion-MNIST model
    python benchmarks/bench_serve.py --model d16-128px --requests 12 --max-tokens 240 --first-scale-priority 1
    python benchmarks/bench_serve.py --replicas 1,2 --requests 200     # over HTTP: Ray Serve replicas (the demo)

All three modes run in this process on the same model and the same kernels (``engine.runner``), fed the same
arrival schedule in real time by a driver thread: *sequential* serves one request at a time; *static*
collects up to B requests or waits T seconds after the first, then runs that batch through all scales
(later arrivals wait for the next batch) — it is swept over (B, T) and the best p99 per load is reported;
*continuous* is ``Engine``: arrivals join at the next iteration. Each request is one image (guided, the
model's default settings); latency = arrival -> decoded image; TTFP = arrival -> first scale's tokens (a
coarse preview is one decode away in every mode). Loads are fractions of the measured saturation rate.
Each load runs ``--repeats`` arrival schedules with every mode on each; the table reports medians over them and
each mode's per-schedule ratio to the best static configuration (single runs of a Poisson schedule are noisy:
p99 is set by the schedule's largest burst). Writes a markdown table, JSON and a PNG plot (p99 against load).

``--replicas 1,2`` measures the other axis, over HTTP: ``nextscale serve --replicas R`` on the bundled demo (a local
Ray cluster in this process; the machine's cores split between the replicas, torch threads to match) under the same
Poisson schedules for every R, at fractions of the one-replica saturation rate (measured with a closed-loop burst):
throughput and latency percentiles (arrival -> the JSON response with its image).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nextscale.allocator import CHOICES, use_tcmalloc
from nextscale.bench import machine_info, markdown_table, write_json
from nextscale.config import VARConfig, VQVAEConfig
from nextscale.engine.engine import Engine, EngineConfig
from nextscale.engine.sampling import image_generators
from nextscale.engine.scheduler import SchedulerConfig
from nextscale.engine.var.family import VARFamily
from nextscale.engine.var.params import SamplingParams
from nextscale.engine.var.runner import ModelRunner
from nextscale.engine.var.state import Generation
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR
from nextscale.plot import line_plot


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
        return {
            "mode": self.mode,
            "load": self.load,
            "rate": self.rate,
            **self.params,
            "throughput": self.throughput,
            "p50": self.pct(self.latency, 50),
            "p95": self.pct(self.latency, 95),
            "p99": self.pct(self.latency, 99),
            "ttfp_p50": self.pct(self.ttfp, 50),
            "ttfp_p99": self.pct(self.ttfp, 99),
        }


def build(name: str) -> tuple[VAR, VQVAE, SamplingParams]:
    if name == "demo":
        from nextscale.pipelines.var import VARPipeline

        pipe = VARPipeline.from_pretrained()
        return pipe.transformer, pipe.vae, pipe.sampling_params(seed=0)
    torch.manual_seed(0)
    if name == "d16":
        var_cfg, vae_cfg = VARConfig(depth=16, embed_dim=1024, num_heads=16), VQVAEConfig(ch=160)
    elif name == "demo-random":  # the demo model's shape with random weights
        pn = (1, 2, 3, 4, 6, 8)
        var_cfg = VARConfig(
            depth=6, embed_dim=192, num_heads=3, num_classes=10, vocab_size=512, z_channels=16, patch_nums=pn
        )
        vae_cfg = VQVAEConfig(
            vocab_size=512,
            z_channels=16,
            ch=32,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            in_channels=1,
            using_sa=False,
            using_mid_sa=False,
            patch_nums=pn,
        )
    elif name == "d16-128px":
        pn = (1, 2, 3, 4, 5, 6, 8)
        var_cfg, vae_cfg = (
            VARConfig(depth=16, embed_dim=1024, num_heads=16, patch_nums=pn),
            VQVAEConfig(ch=160, ch_mult=(1, 1, 2, 2, 4), patch_nums=pn),
        )
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
    return Generation(
        var, vae.quantize, torch.tensor([a.label]), params, image_generators(a.seed, 1), lvl_pos_1LC=lvl_pos
    )


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
    engine, q = Engine(VARFamily(var, vae), cfg), queue.Queue()
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
        for ev in engine.step(interrupt=lambda: not q.empty()):
            now = time.perf_counter()
            a = by_id[ev.request_id]
            if ev.si == 0:
                a.first = now
            if ev.finished:
                a.done = now
                finished += 1


def measure(
    mode: str, var: VAR, vae: VQVAE, base: SamplingParams, arrivals: list[Arrival], load: float, rate: float, **kw
) -> RunResult:
    t0 = time.perf_counter()
    if mode == "continuous":
        run_continuous(var, vae, arrivals, base, kw["engine"])
    else:
        run_static(var, vae, arrivals, base, kw["B"], kw["T"])
    span = max(a.done for a in arrivals) - t0
    params = {} if mode == "continuous" else {"B": kw["B"], "T": kw["T"]}
    return RunResult(
        mode,
        load,
        rate,
        params,
        [a.done - a.start for a in arrivals],
        [a.first - a.start for a in arrivals],
        len(arrivals) / span,
    )


def fresh(arrivals: list[Arrival]) -> list[Arrival]:
    return [Arrival(a.idx, a.t, a.label, a.seed) for a in arrivals]


def summarise(runs: list[RunResult]) -> dict:
    """Median over repetitions (each on its own arrival schedule) of every latency statistic."""
    rows = [r.row() for r in runs]
    keys = ("throughput", "p50", "p95", "p99", "ttfp_p50", "ttfp_p99")
    return {**{k: float(np.median([row[k] for row in rows])) for k in keys}, "reps": len(rows)}


def engine_configs(
    max_tokens: str, first_scale_priority: str, admit_gaps: str, max_running: str = "256"
) -> dict[str, EngineConfig]:
    """Every combination of the comma-separated option values, as named engine configurations."""
    engines: dict[str, EngineConfig] = {}
    for mt, prio, g, k in itertools.product(
        [int(x) for x in max_tokens.split(",")],
        [bool(int(x)) for x in first_scale_priority.split(",")],
        [int(x) for x in admit_gaps.split(",")],
        [int(x) for x in max_running.split(",")],
    ):
        name = (
            f"budget={mt}"
            + (" first-scale-priority" if prio else "")
            + (f" admit_gap={g}" if g else "")
            + (f" max_running={k}" if k != 256 else "")
        )
        scheduler = SchedulerConfig(max_tokens=mt, max_running=k, admit_gap=g, first_scale_priority=prio)
        engines[name] = EngineConfig(scheduler=scheduler, max_images_per_request=1)
    return engines


def label(r: RunResult) -> str:
    if r.mode == "static":
        return f"static (B={r.params['B']} T={r.params['T']:.2g}s)"
    if r.mode == "continuous":
        return f"continuous ({r.params['name']})"
    return r.mode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo | demo-random | d16 | d16-128px")
    p.add_argument("--requests", type=int, default=200, help="requests per run")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="arrival schedules per load; every mode runs on each, statistics are medians over them",
    )
    p.add_argument("--loads", default="0.3,0.5,0.7,0.9", help="fractions of the saturation rate")
    p.add_argument(
        "--saturation",
        type=float,
        default=None,
        help="images/s to take as saturation instead of measuring it with a burst",
    )
    p.add_argument("--static-b", default="2,4,8,16", help="static batch sizes to sweep")
    p.add_argument("--static-t", default="0,0.5,2", help="batch windows to sweep, in mean inter-arrival times")
    p.add_argument(
        "--max-tokens",
        default="1024",
        help="engine token budget(s) per iteration, comma-separated: each is a continuous configuration",
    )
    p.add_argument("--first-scale-priority", default="0", help="0, 1 or 0,1: engine first_scale_priority values")
    p.add_argument("--admit-gaps", default="0", help="engine admit_gap values to run (cohort admission; 0 = off)")
    p.add_argument("--max-running", default="256", help="engine max_running_requests value(s), comma-separated")
    p.add_argument("--no-sequential", action="store_true", help="skip the one-request-at-a-time mode")
    p.add_argument(
        "--allocator",
        choices=CHOICES,
        default="auto",
        help="as `nextscale serve --allocator`: every mode runs in this process, so all get the same one",
    )
    p.add_argument("--replicas", default=None, help="over HTTP on Ray Serve: replica counts to compare, e.g. 1,2")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.replicas:
        return replicas_main(args)
    allocator = use_tcmalloc(args.allocator)
    out = Path(args.out or f"benchmarks/results/bench_serve_{args.model}.json")
    var, vae, base = build(args.model)
    nc = var.num_classes
    engines = engine_configs(args.max_tokens, args.first_scale_priority, args.admit_gaps, args.max_running)
    if args.saturation:
        sat = args.saturation
    else:  # a burst through the first continuous configuration (an overestimate when bursts batch better)
        burst = schedule(0.0, max(8, args.requests // 4), nc, seed=1)
        sat = measure("continuous", var, vae, base, burst, 1.0, 0.0, engine=next(iter(engines.values()))).throughput
    print(f"saturation ~ {sat:.3g} images/s", file=sys.stderr)
    results: list[RunResult] = []
    for load in (float(x) for x in args.loads.split(",")):
        rate = load * sat
        t0 = time.perf_counter()
        for rep in range(args.repeats):
            arrivals = schedule(rate, args.requests, nc, seed=int(load * 1000) + 7919 * rep)
            for name, ecfg in engines.items():
                r = measure("continuous", var, vae, base, fresh(arrivals), load, rate, engine=ecfg)
                r.params.update(name=name, rep=rep)
                results.append(r)
            if not args.no_sequential:
                results.append(measure("sequential", var, vae, base, fresh(arrivals), load, rate, B=1, T=0.0))
                results[-1].params["rep"] = rep
            for b in (int(x) for x in args.static_b.split(",")):
                for tw in (float(x) for x in args.static_t.split(",")):
                    results.append(measure("static", var, vae, base, fresh(arrivals), load, rate, B=b, T=tw / rate))
                    results[-1].params["rep"] = rep
        print(f"load {load}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    groups: dict[tuple[float, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.load, label(r)), []).append(r)
    summary = {key: summarise(runs) for key, runs in groups.items()}
    loads = sorted({k[0] for k in summary})
    best = {
        ld: min((k for k in summary if k[0] == ld and k[1].startswith("static")), key=lambda k: summary[k]["p99"])
        for ld in loads
    }

    def per_schedule_ratio(key: tuple[float, str], stat: str) -> tuple[float, float]:
        """Median and max over schedules of (this mode's statistic / the best static's, same schedule)."""
        ref = {r.params["rep"]: r.row()[stat] for r in groups[best[key[0]]]}
        ratios = [r.row()[stat] / ref[r.params["rep"]] for r in groups[key]]
        return float(np.median(ratios)), float(max(ratios))

    rows = []
    for key in sorted(summary, key=lambda k: (k[0], not k[1].startswith("continuous"), k[1])):
        if key[1].startswith("static") and key != best[key[0]]:
            continue
        d, ref = summary[key], summary[best[key[0]]]
        q99 = per_schedule_ratio(key, "p99")
        t99 = per_schedule_ratio(key, "ttfp_p99")
        rows.append(
            [
                f"{key[0]:.1f}",
                f"{key[0] * sat:.3g}",
                key[1],
                d["throughput"],
                d["p50"],
                d["p95"],
                d["p99"],
                d["p99"] / ref["p99"],
                f"{q99[0]:.2f} / {q99[1]:.2f}",
                d["ttfp_p50"],
                d["ttfp_p99"],
                d["ttfp_p99"] / ref["ttfp_p99"],
                f"{t99[0]:.2f} / {t99[1]:.2f}",
            ]
        )
    header = [
        "load",
        "req/s",
        "mode",
        "images/s",
        "p50 s",
        "p95 s",
        "p99 s",
        "p99 / static",
        "per-schedule p99 ratio med / max",
        "TTFP p50 s",
        "TTFP p99 s",
        "TTFP p99 / static",
        "per-schedule TTFP ratio med / max",
    ]
    print(
        f"model {args.model}, {args.requests} requests per run, {args.repeats} schedule(s) per load, "
        f"saturation {sat:.3g} img/s, allocator {allocator}; statistics are medians over schedules"
    )
    print(markdown_table(header, rows))
    write_json(
        out,
        {
            "benchmark": "bench_serve",
            "model": args.model,
            "machine": machine_info(),
            "allocator": allocator,
            "saturation_images_per_s": sat,
            "repeats": args.repeats,
            "engines": {n: dataclasses.asdict(e) for n, e in engines.items()},
            "runs": [{**r.row(), "label": label(r)} for r in results],
            "summary": [{"load": k[0], "mode": k[1], **v} for k, v in summary.items()],
        },
    )
    series: dict[str, list[tuple[float, float]]] = {}
    for key in sorted(summary):
        if not key[1].startswith("static"):
            series.setdefault(key[1], []).append((key[0], summary[key]["p99"]))
    series["static (best B,T)"] = [(ld, summary[best[ld]]["p99"]) for ld in loads]
    png = line_plot(
        series,
        out.with_suffix(".png"),
        title=f"p99 latency vs load ({args.model})",
        xlabel="load (fraction of saturation)",
        ylabel="p99 latency (s)",
        log_y=True,
    )
    print(f"wrote {out} and {png}", file=sys.stderr)
    return 0


# ---- the replicas axis (HTTP, Ray Serve) ----------------------------------------------------------------------------
def replicas_main(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import socket

    import httpx
    import ray

    from nextscale.cli.main import build_parser
    from nextscale.cli.serve import build_app
    from nextscale.serve import replicas

    counts = [int(x) for x in args.replicas.split(",")]
    cores = os.cpu_count() or 1
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    serve_args = build_parser().parse_args(["serve", "--max-queue", "1000000"])
    rng = np.random.default_rng(0)

    async def post(c: httpx.AsyncClient, label: int) -> float:
        t = time.perf_counter()
        r = await c.post("/v1/images/generations", json={"prompt": str(label), "seed": int(rng.integers(1 << 30))})
        r.raise_for_status()
        return time.perf_counter() - t

    async def burst(n: int) -> float:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            t = time.perf_counter()
            await asyncio.gather(*(post(c, i % 10) for i in range(n)))
            return n / (time.perf_counter() - t)

    async def poisson(rate: float, n: int, seed: int) -> tuple[list[float], float]:
        gaps = np.random.default_rng(seed).exponential(1 / rate, n)
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            t0, tasks = time.perf_counter(), []
            for i, at in enumerate(np.cumsum(gaps)):
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                tasks.append(asyncio.ensure_future(post(c, i % 10)))
            lat = await asyncio.gather(*tasks)
            return list(lat), n / (time.perf_counter() - t0)

    rows, runs, sat = [], [], None
    for R in counts:
        threads = max(1, cores // R)
        settings = replicas.ReplicaSettings(
            replicas=R,
            num_cpus=threads,
            torch_threads=threads,
            max_ongoing=1_000_000,
            max_queued=1_000_000,
            drain_timeout=5,
        )
        running = replicas.start(functools.partial(build_app, serve_args), settings, "127.0.0.1", port)
        while httpx.get(url + "/ready", timeout=30).status_code != 200:
            time.sleep(0.5)
        asyncio.run(burst(16))  # warm-up: first calls through the proxy and the router
        measured = asyncio.run(burst(max(32, args.requests // 4)))
        sat = sat or measured  # loads are fractions of one replica's saturation, for every R
        print(f"{R} replica(s): burst throughput {measured:.3g} images/s", file=sys.stderr)
        for load in (float(x) for x in args.loads.split(",")):
            for rep in range(args.repeats):
                lat, thr = asyncio.run(poisson(load * sat, args.requests, seed=int(load * 1000) + 7919 * rep))
                runs.append({"replicas": R, "load": load, "rep": rep, "throughput": thr, "latencies": lat})
        from ray import serve

        serve.delete(replicas.APP_NAME)
        del running
        rows.append((R, measured))
    table = []
    for R in counts:
        for load in (float(x) for x in args.loads.split(",")):
            sel = [r for r in runs if r["replicas"] == R and r["load"] == load]
            lat = np.concatenate([r["latencies"] for r in sel])
            table.append(
                [
                    R,
                    f"{load:.1f}",
                    f"{load * sat:.3g}",
                    float(np.median([r["throughput"] for r in sel])),
                    float(np.percentile(lat, 50)),
                    float(np.percentile(lat, 99)),
                ]
            )
    bursts = ", ".join(f"{R}: {m:.3g}" for R, m in rows)
    print(f"demo over HTTP on Ray Serve; {cores} cores; burst images/s by replicas: {bursts}")
    print(markdown_table(["replicas", "load", "req/s", "images/s", "p50 s", "p99 s"], table))
    out = Path(args.out or "benchmarks/results/bench_serve_replicas.json")
    write_json(out, {"benchmark": "bench_serve --replicas", "machine": machine_info(), "bursts": rows, "runs": runs})
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
