"""Serving latency predicted from a measured cost model: static batching vs the engine's scheduler, simulated.

    python benchmarks/sim_serve.py --model demo                          # costs measured on this machine
    python benchmarks/sim_serve.py --model demo --unit-cost-scale 0.1    # what if per-unit compute were 10x cheaper

Why: ``bench_serve.py`` measures the real thing, but its p99 is noisy (a schedule's largest burst sets it) and
bound to this machine. This script measures the model's iteration costs once, then replays many Poisson
schedules through a discrete-event model of both servers in seconds. That separates the scheduling policy from
timing noise, and answers "what if this model were dispatch-bound (a GPU)?" by scaling the per-unit costs.
The continuous server is driven by the engine's own ``Scheduler`` (plain Python), so the policy simulated is the
real one (token budget, cheap scales, admit_gap, first_scale_priority).

Cost model, measured with the engine's ``ModelRunner`` (medians over repetitions):
  one iteration      = F + sum over its units of c[si] + G * (number of distinct scales - 1)
  decode of n images = d0 + d1 * n
Static batching is modelled as ``bench_serve.py`` runs it: up to B waiting requests (T = 0) go through every
scale together, then their images are decoded one by one. Not modelled: timing noise, decode time slices.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench_serve import Arrival, build, engine_configs, new_state, schedule
from nextscale.allocator import CHOICES, use_tcmalloc
from nextscale.bench import machine_info, markdown_table, write_json
from nextscale.engine.scheduler import Scheduler, SchedulerConfig
from nextscale.engine.var.runner import ModelRunner


@dataclass(frozen=True)
class CostModel:
    """Seconds: fixed cost per iteration, per-unit cost by scale, per extra distinct scale, decode."""

    F: float
    c: tuple[float, ...]
    G: float
    d0: float
    d1: float
    tokens: tuple[int, ...]  # pn^2 per scale

    def scaled(self, unit: float) -> CostModel:
        """Per-unit costs (compute) times ``unit``; fixed costs unchanged: a dispatch-bound what-if."""
        return dataclasses.replace(self, c=tuple(x * unit for x in self.c), d1=self.d1 * unit)

    def iteration(self, scales: list[int]) -> float:
        return self.F + sum(self.c[s] for s in scales) + self.G * max(0, len(set(scales)) - 1)

    def decode(self, n: int) -> float:
        return self.d0 + self.d1 * n


@torch.inference_mode()
def measure_costs(var, vae, base, n: int = 8, reps: int = 5) -> CostModel:
    """Fit the cost model on the real runner and decoder (one guided image per request, as bench_serve)."""
    runner = ModelRunner(var)
    S = var.scales.num_scales

    def states(k: int) -> list:
        return [new_state(var, vae, Arrival(i, 0.0, i % var.num_classes, i), base, runner.lvl_pos) for i in range(k)]

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def at_scale(k: int, si: int) -> float:
        ts = []
        for _ in range(reps):
            ss = states(k)
            for _ in range(si):
                runner.execute(ss)
            ts.append(timed(lambda ss=ss: runner.execute(ss)))
        return statistics.median(ts)

    one = [at_scale(1, si) for si in range(S)]
    many = [at_scale(n, si) for si in range(S)]
    c = [max(0.0, (m - o) / (n - 1)) for o, m in zip(one, many)]
    F = statistics.median(o - ci for o, ci in zip(one, c))
    mixed = []
    for _ in range(reps):
        ss = states(S)
        for g, s in enumerate(ss):  # request g is g scales in
            for _ in range(g):
                runner.execute([s])
        mixed.append(timed(lambda ss=ss: runner.execute(ss)))
    G = max(0.0, (statistics.median(mixed) - F - sum(c)) / (S - 1))
    f_hats = [s.f_hat for s in states(n)]
    dec1 = statistics.median(timed(lambda: vae.fhat_to_img(f_hats[0])) for _ in range(reps))
    decn = statistics.median(timed(lambda: vae.fhat_to_img(torch.cat(f_hats))) for _ in range(reps))
    d1 = max(0.0, (decn - dec1) / (n - 1))
    return CostModel(F, tuple(c), G, dec1 - d1, d1, tuple(pn * pn for pn in var.cfg.patch_nums))


def simulate_static(cost: CostModel, arrivals: np.ndarray, B: int) -> tuple[np.ndarray, np.ndarray]:
    """(latency, time to first scale) per request under static batching with window T = 0."""
    S, n = len(cost.c), len(arrivals)
    lat, ttfp = np.zeros(n), np.zeros(n)
    t, i = 0.0, 0
    while i < n:
        t = max(t, arrivals[i])
        j = i
        while j < n and j - i < B and arrivals[j] <= t:
            j += 1
        k = j - i
        ttfp[i:j] = t + cost.iteration([0] * k) - arrivals[i:j]
        t += sum(cost.iteration([si] * k) for si in range(S))
        for m in range(i, j):
            t += cost.decode(1)
            lat[m] = t - arrivals[m]
        i = j
    return lat, ttfp


def simulate_engine(cost: CostModel, arrivals: np.ndarray, cfg: SchedulerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(latency, time to first scale) per request under the engine's scheduler, one guided image each."""
    n = len(arrivals)
    lat, ttfp = np.zeros(n), np.zeros(n)
    sched = Scheduler(cfg)
    t, i, done = 0.0, 0, 0
    while done < n:
        if not sched.has_work():
            t = max(t, arrivals[i])
        while i < n and arrivals[i] <= t:
            sched.add(str(i), 2, cost.tokens)
            i += 1
        out = sched.schedule()
        scales = [sched.running[rid].si for rid in out.units]
        t += cost.iteration(scales)
        for rid, si in zip(out.units, scales):
            if si == 0:
                ttfp[int(rid)] = t - arrivals[int(rid)]
        finished = sched.update(out)
        if finished:
            t += cost.decode(len(finished))
            for rid in finished:
                lat[int(rid)] = t - arrivals[int(rid)]
            done += len(finished)
    return lat, ttfp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo | demo-random | d16 | d16-128px")
    p.add_argument(
        "--unit-cost-scale",
        type=float,
        default=1.0,
        help="multiply the measured per-unit costs (what-if: < 1 models a dispatch-bound device)",
    )
    p.add_argument("--requests", type=int, default=150, help="requests per schedule")
    p.add_argument("--schedules", type=int, default=50, help="Poisson schedules per load")
    p.add_argument("--loads", default="0.3,0.5,0.7,0.9", help="fractions of the saturation rate")
    p.add_argument("--static-b", default="1,2,3,4,6,8,12,16,32", help="static batch sizes to sweep")
    p.add_argument("--max-tokens", default="512,16384", help="engine token budgets to simulate")
    p.add_argument("--admit-gaps", default="0", help="engine admit_gap values to simulate")
    p.add_argument("--first-scale-priority", default="0", help="0, 1 or 0,1")
    p.add_argument(
        "--allocator",
        choices=CHOICES,
        default="auto",
        help="as bench_serve: costs are measured on the allocator the real server runs on",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    use_tcmalloc(args.allocator)
    out = Path(args.out or f"benchmarks/results/sim_serve_{args.model}.json")
    var, vae, base = build(args.model)
    measured = measure_costs(var, vae, base)
    cost = measured.scaled(args.unit_cost_scale)
    print(
        f"cost model (ms): F {cost.F * 1e3:.2f}, c {[round(x * 1e3, 2) for x in cost.c]}, G {cost.G * 1e3:.2f}, "
        f"decode {cost.d0 * 1e3:.2f} + {cost.d1 * 1e3:.2f} n",
        file=sys.stderr,
    )
    # the engine's scheduling settings as bench_serve runs them; KV memory is not modelled (rows unbounded)
    engines = {
        name: dataclasses.replace(e.scheduler, max_rows=1 << 20)
        for name, e in engine_configs(args.max_tokens, args.first_scale_priority, args.admit_gaps).items()
    }
    burst = np.zeros(max(64, args.requests))
    sat = len(burst) / simulate_engine(cost, burst, next(iter(engines.values())))[0].max()
    rows, summary = [], []
    for load in (float(x) for x in args.loads.split(",")):
        scheds = [
            np.sort(np.array([a.t for a in schedule(load * sat, args.requests, 1, seed=s)]))
            for s in range(args.schedules)
        ]
        res: dict[str, list[tuple[float, float]]] = {}
        for B in (int(x) for x in args.static_b.split(",")):
            res[f"static (B={B})"] = [_p99s(simulate_static(cost, a, B)) for a in scheds]
        for name, cfg in engines.items():
            res[f"continuous ({name})"] = [_p99s(simulate_engine(cost, a, cfg)) for a in scheds]
        best = min((k for k in res if k.startswith("static")), key=lambda k: np.median([x[0] for x in res[k]]))
        ref = np.array(res[best])
        for key in [k for k in res if k.startswith("continuous")] + [best]:
            v = np.array(res[key])
            r99, rt = v[:, 0] / ref[:, 0], v[:, 1] / ref[:, 1]
            rows.append(
                [
                    f"{load:.1f}",
                    f"{load * sat:.3g}",
                    key,
                    np.median(v[:, 0]),
                    np.median(r99),
                    f"{np.median(r99):.2f} / {np.percentile(r99, 90):.2f}",
                    np.median(v[:, 1]),
                    np.median(rt),
                ]
            )
            summary.append(
                {
                    "load": load,
                    "mode": key,
                    "p99": float(np.median(v[:, 0])),
                    "p99_ratio_median": float(np.median(r99)),
                    "ttfp_p99": float(np.median(v[:, 1])),
                    "ttfp_p99_ratio_median": float(np.median(rt)),
                }
            )
    print(
        f"model {args.model}, unit-cost scale {args.unit_cost_scale:g}, {args.schedules} schedules x "
        f"{args.requests} requests per load, simulated saturation {sat:.3g} img/s"
    )
    print(
        markdown_table(
            [
                "load",
                "req/s",
                "mode",
                "p99 s",
                "p99 / static",
                "per-schedule p99 ratio med / p90",
                "TTFP p99 s",
                "TTFP p99 / static",
            ],
            rows,
        )
    )
    write_json(
        out,
        {
            "benchmark": "sim_serve",
            "model": args.model,
            "machine": machine_info(),
            "measured_cost_model_s": dataclasses.asdict(measured),
            "unit_cost_scale": args.unit_cost_scale,
            "saturation_images_per_s": sat,
            "summary": summary,
        },
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _p99s(lat_ttfp: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    return float(np.percentile(lat_ttfp[0], 99)), float(np.percentile(lat_ttfp[1], 99))


if __name__ == "__main__":
    sys.exit(main())
