"""Speculative decoding for raster models (SJD, MC-SJD, SJD-PAC, GSD, LANTERN; ZipAR's order) against plain sampling.

    python benchmarks/bench_spec.py                        # both parts
    python benchmarks/bench_spec.py --part speed --reps 3  # the demo and a random GPT-B-shaped model
    python benchmarks/bench_spec.py --part fidelity --per-class 150   # the bundled raster demo
    python benchmarks/bench_spec.py --part fidelity --per-class 20 --method exact --method gsd:dist=2  # a sweep

Per method (``--method``, repeatable: "exact", a spec, or a preset name — the demo's tuned presets first): forward
passes per image (step compression = exact's passes / the method's), mean tokens fixed per pass, and wall-clock
images/s at batch 1 and 8 as a ratio to exact, interleaved in one process (median of ``--reps`` rounds, token
phase: ``output_type="latent"``). Speed runs on the bundled demo (its own sampling settings) and on a random-weight
model with GPT-B's shape at 256 px (12 layers, width 768, 16384 codes, 256 tokens; ``--top-k``); random weights
accept few guesses, so its step compression says little — what it shows is the cost of a pass at full scale.
Fidelity on ``demo-fmnist-raster`` with the same seeds as exact: class accuracy and Fréchet distance (bundled
classifier, ``--per-class`` samples per class), the share of images identical to exact's and of tokens equal to
exact's. Prints markdown tables, writes JSON and a plot (PNG).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nextscale.bench import Cell, interleave, machine_info, markdown_table, write_json
from nextscale.config import VQVAEConfig
from nextscale.hardware import auto_dtype
from nextscale.models.llamagen import LlamaGen, LlamaGenConfig
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.pipelines.raster import LlamaGenPipeline

METHODS = ["exact", "sjd", "gsd", "lantern"]
DEMO = "demo-fmnist-raster"


def spec(method: str) -> str | None:
    return None if method == "exact" else method


def demo_pipe() -> LlamaGenPipeline:
    return LlamaGenPipeline.from_pretrained(DEMO, dtype=auto_dtype(torch.device("cpu")))


def speed_pipe(seed: int = 0) -> LlamaGenPipeline:
    """GPT-B at 256 px with random weights, and a random single-scale VQ-VAE of the same grid (token phase only)."""
    torch.manual_seed(seed)
    gpt = LlamaGen(LlamaGenConfig.official("GPT-B"))
    for name, p in gpt.named_parameters():  # the official init leaves outputs near-uniform; give logits some shape
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=(3.0 if name == "output.weight" else 1.0) / p.shape[1] ** 0.5)
    vae = VQVAE(VQVAEConfig(vocab_size=16384, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1, 1), patch_nums=(16,)))
    return LlamaGenPipeline(gpt, vae, dtype=auto_dtype(torch.device("cpu")))


def speed(args: argparse.Namespace) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    rows, out = [], []
    methods = args.method
    for model in args.speed_models.split(","):
        if model not in ("demo", "gpt-b"):
            raise SystemExit(f"--speed-models: unknown model {model!r}; allowed: demo, gpt-b")
        pipe = demo_pipe() if model == "demo" else speed_pipe()
        kw = {} if model == "demo" else {"top_k": args.top_k}
        for batch in (1, 8):
            labels = [i % pipe.num_classes for i in range(batch)]
            stats: dict[str, dict[str, Any]] = {}

            def runner(method: str, labels: list[int] = labels, stats: dict = stats, pipe=pipe, kw=kw):
                def fn() -> None:
                    res = pipe(labels, seed=0, output_type="latent", speculative=spec(method), **kw)
                    stats[method] = res.stats

                return fn

            cells = [Cell(f"{model}/b{batch}/{m}", {"model": model, "batch": batch, "method": m}) for m in methods]
            interleave(cells, [runner(m) for m in methods], args.reps, warmup=True)
            for m, c in zip(methods, cells):
                ratio = statistics.median(e.seconds / r.seconds for e, r in zip(cells[0].reps, c.reps))
                st = stats[m]
                passes = float(st["forward_passes"])
                row = [model, batch, m, batch / c.median_s, ratio, passes, stats[methods[0]]["forward_passes"] / passes]
                rows.append([*row, float(st.get("mean_accepted", 1.0)), c.peak_rss_mb])
                out.append(c.to_dict() | {"stats": _plain(st), "ratio_vs_exact": ratio})
    return rows, out


def fidelity(args: argparse.Namespace) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    from nextscale.data import load_dataset
    from nextscale.eval.classifier import load_classifier
    from nextscale.eval.evaluate import evaluate
    from nextscale.images import to_uint8_nhwc
    from nextscale.jobs.quality import balanced_subset
    from nextscale.models.native import bundled_model_dir

    pipe = demo_pipe()
    clf = load_classifier(bundled_model_dir() / "classifier")
    test_ds = load_dataset("fashion-mnist", "test", pipe.image_size)
    real = balanced_subset(test_ds.images, test_ds.labels, args.per_class, pipe.num_classes)[0]
    labels = np.repeat(np.arange(pipe.num_classes), args.per_class)

    def sample(method: str) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
        toks, imgs, passes, accepted = [], [], [], []
        for i in range(0, len(labels), 100):
            chunk = labels[i : i + 100].tolist()
            indices = range(i, i + len(chunk))
            res = pipe(chunk, seed=0, output_type="pt", speculative=spec(method), image_indices=indices)
            toks.append(res.tokens)
            imgs.append(res.images)
            passes.append(float(res.stats["forward_passes"]))
            accepted.append(float(res.stats.get("mean_accepted", 1.0)))
        return torch.cat(toks), torch.cat(imgs), passes, accepted

    rows, out = [], []
    exact_tokens = None
    exact_passes = 1.0
    for m in args.method:
        tokens, images, passes, accepted = sample(m)
        if exact_tokens is None:
            exact_tokens, exact_passes = tokens, statistics.mean(passes)
        r = evaluate(to_uint8_nhwc(images), real, clf, labels, "classifier", num_classes=pipe.num_classes)
        same_image = float((tokens == exact_tokens).all(dim=1).float().mean())
        same_token = float((tokens == exact_tokens).float().mean())
        p = statistics.mean(passes)
        acc, fd, mean_acc = r["class_accuracy"], r["FD-classifier"], statistics.mean(accepted)
        full = "exact" if m == "exact" else pipe.speculative_config(m).spec()
        rows.append(
            [m if full == m else f"{m} = {full}", p, exact_passes / p, mean_acc, same_image, same_token, acc, fd]
        )
        out.append(
            {
                "method": m,
                "spec": full,
                "forward_passes": p,
                "mean_accepted": mean_acc,
                "same_image": same_image,
                "same_token": same_token,
                "class_accuracy": acc,
                "fd": fd,
            }
        )
        print(f"fidelity {m}: passes {p:.1f}, accuracy {r['class_accuracy']:.3f}", file=sys.stderr)
    return rows, out


def _plain(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in stats.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("speed", "fidelity", "both"), default="both")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top-k", type=int, default=2000, help="speed part: top-k of the random model's sampling")
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--method", action="append", help=f"exact, a spec or a preset, repeatable (default: {METHODS})")
    p.add_argument("--speed-models", default="demo,gpt-b", help="speed part: demo and/or gpt-b")
    p.add_argument("--out", default="benchmarks/results/bench_spec.json")
    args = p.parse_args(argv)
    args.method = args.method or METHODS
    if args.method[0] != "exact":
        p.error("--method: the first method is the baseline and must be exact")
    info = machine_info()
    print("machine:", info, file=sys.stderr)
    payload: dict[str, Any] = {"benchmark": "bench_spec", "machine": info}
    if args.part in ("speed", "both"):
        rows, payload["speed"] = speed(args)
        header = ["model", "batch", "method", "images/s", "x exact (wall)", "passes/image", "x fewer passes"]
        header.append("tokens/pass")
        print(markdown_table([*header, "peak RSS MB"], rows))
    if args.part in ("fidelity", "both"):
        rows, payload["fidelity"] = fidelity(args)
        header = ["method", "passes/image", "x fewer passes", "tokens/pass", "images = exact", "tokens = exact"]
        print(markdown_table([*header, "class accuracy", "FD (classifier)"], rows))
        plot(payload, Path(args.out).with_suffix(".png"))
    write_json(args.out, payload)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def plot(payload: dict[str, Any], path: Path) -> None:
    """Step compression against class accuracy on the demo."""
    from nextscale.plot import line_plot

    fid = payload["fidelity"]
    base = fid[0]["forward_passes"]  # exact
    series = {f["method"]: [(base / f["forward_passes"], 100 * f["class_accuracy"])] for f in fid}
    path.parent.mkdir(parents=True, exist_ok=True)
    line_plot(series, path, "speculative decoding (raster demo)", "x fewer forward passes", "class accuracy %")


if __name__ == "__main__":
    sys.exit(main())
