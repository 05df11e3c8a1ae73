"""Why a text-to-image model misses held-out pairs: its text encoder's reading, and what the image model draws.

    python benchmarks/bench_t2i_reading.py --part misses            # the bundled demo-fmnist-t2i (~3 min here)
    python benchmarks/bench_t2i_reading.py --part encoder --steps 15000 --every 1000   # ~22 min on 2 cores
    python benchmarks/bench_t2i_reading.py --part guidance --cfgs 1,2,3,6 --taus 0.5,1  # ~1 min a setting

``--part misses`` (a model folder, default the bundled ``demo-fmnist-t2i``, at its sampling defaults): for seen
prompts and held-out pairs, the share of images with both halves right, with the mirror pair drawn, and with only the
left or only the right half wrong (the bundled demo classifier reads each half); a fresh linear reader trained on
the frozen encoder's features (``train_slots(freeze_encoder=True)`` on grammar captions of the training pairs)
and the images' accuracy given that it reads the prompt right or wrong; and the same classifier on real test
canvases of each kind, the ceiling of every pair accuracy.

``--part encoder``: trains a text encoder with the bundled model's recipe (``build_t2i_model``: a 4-layer width-128
T5 and slot heads on ``varied_captions``) on the training pairs *minus* ten validation pairs V = (c, c+4 mod 10),
each class once on each side with its mirror still trained on, as the held-out pairs are. Its slot accuracy on V
every ``--every`` steps chooses a recipe without looking at the held-out pairs; held-out pairs and phrasings are
reported beside it. ``--words``: the encoder also learns to tag each noun with its side and class (``train_slots``'s
``spans``, from ``data.captions.noun_spans``).

``--part guidance``: pair accuracy of every prompt kind and the halves' FD ratio over a grid of guidance (cfg) and
temperature (tau), the build's quality sweep (``jobs.prompt_quality.guidance_sweep``) over any grid: how much of
the held-out pairs guidance trades for seen ones. Results: ``benchmarks/RESULTS.md`` ("Held-out pairs: where the
misses come from").
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from nextscale.bench import machine_info, markdown_table, write_json
from nextscale.data import fashion_mnist, fashion_pairs
from nextscale.data.captions import noun_spans, prompts, varied_captions
from nextscale.eval.classifier import load_classifier
from nextscale.images import to_uint8_nhwc
from nextscale.jobs.prompt_quality import (
    KINDS,
    guidance_sweep,
    prompt_set,
    read_pairs,
    real_item_scale,
    sample_prompts,
)
from nextscale.models.native import bundled_model_dir
from nextscale.train.text_encoder import (
    SlotHeads,
    TinyT5Config,
    caption_tokenizer,
    read_slots,
    slot_accuracy,
    tiny_t5,
    train_slots,
)

VALIDATION_PAIRS = tuple((c, (c + 4) % 10) for c in range(10))


def _training_slots(exclude: tuple[tuple[int, int], ...] = ()) -> tuple[Any, torch.Tensor]:
    """The training canvases' (left, right) classes, less the ``exclude`` pairs."""
    train = fashion_pairs("train", 64, wide=True)
    slots_N2 = torch.stack([train.left_label_N, train.right_label_N], dim=1)
    keep_N = torch.tensor([tuple(p) not in exclude for p in slots_N2.tolist()], dtype=torch.bool)
    return train, slots_N2[keep_N]


def _reading(encoder: Any, heads: SlotHeads, asked: list[tuple[str, int, int]]) -> float:
    return slot_accuracy(encoder, heads, [p for p, _, _ in asked], torch.tensor([[a, b] for _, a, b in asked]))


def part_misses(model: str, images: int, probe_steps: int, seed: int) -> dict[str, Any]:
    from nextscale.pipelines.infinity import InfinityPipeline

    pipe = InfinityPipeline.from_pretrained(model)
    net = load_classifier(bundled_model_dir("demo-fmnist") / "classifier")
    _, slots_N2 = _training_slots()
    captions, said_N2 = varied_captions(slots_N2, seed=seed)
    heads, _ = train_slots(
        pipe.text_encoder, captions, said_N2, [10, 10], steps=probe_steps, lr=3e-3, seed=seed, freeze_encoder=True
    )
    rows, out = [], {"model": str(model), "settings": {**pipe.sampling_defaults, "seed": seed}, "kinds": {}}
    for kind in ("seen", "held-out-pairs"):
        asked = prompt_set(kind, images)
        with torch.no_grad():
            logits = read_slots(pipe.text_encoder, heads, [p for p, _, _ in asked])
        read_l, read_r = (lg.argmax(-1).numpy() for lg in logits)
        want_l, want_r = np.array([a for _, a, _ in asked]), np.array([b for _, _, b in asked])
        read_ok = (read_l == want_l) & (read_r == want_r)
        left, right = read_pairs(net, sample_prompts(pipe, asked, {"seed": seed}))
        ok = (left == want_l) & (right == want_r)
        r = {
            "images": len(asked),
            "both_right": float(ok.mean()),
            "mirror_drawn": float(((left == want_r) & (right == want_l) & (want_l != want_r)).mean()),
            "only_left_wrong": float(((left != want_l) & (right == want_r)).mean()),
            "only_right_wrong": float(((left == want_l) & (right != want_r)).mean()),
            "probe_reads_right": float(read_ok.mean()),
            "right_given_read_right": float(ok[read_ok].mean()) if read_ok.any() else None,
            "right_given_read_wrong": float(ok[~read_ok].mean()) if (~read_ok).any() else None,
        }
        out["kinds"][kind] = r
        rows.append([kind] + [_pct(r[k]) for k in list(r)[1:]])
    print(
        markdown_table(
            [
                "prompts",
                "both right",
                "mirror",
                "only left wrong",
                "only right wrong",
                "probe reads",
                "right if read right",
                "right if read wrong",
            ],
            rows,
        )
    )
    out["real_canvases"] = {}
    for kind in KINDS:
        ds = fashion_pairs("test", 64, seed=seed, kind=kind, num=3000, wide=True)
        canvases = to_uint8_nhwc(torch.stack([ds[i][0] for i in range(len(ds))]).add(1).div(2))
        left, right = read_pairs(net, canvases)
        ok_l, ok_r = left == ds.left_label_N.numpy(), right == ds.right_label_N.numpy()
        out["real_canvases"][kind] = {
            "both": float((ok_l & ok_r).mean()),
            "half": float((ok_l.mean() + ok_r.mean()) / 2),
        }
    print(
        markdown_table(
            ["real canvases", "both halves", "one half"],
            [[k, _pct(v["both"]), _pct(v["half"])] for k, v in out["real_canvases"].items()],
        )
    )
    return out


def part_encoder(steps: int, every: int, layers: int, seed: int, words: bool = False) -> dict[str, Any]:
    train, slots_N2 = _training_slots(VALIDATION_PAIRS)
    captions, said_N2 = varied_captions(slots_N2, seed=seed)
    spans = [noun_spans(c, tuple(s)) for c, s in zip(captions, said_N2.tolist())] if words else None
    encoder = tiny_t5(
        caption_tokenizer(list(dict.fromkeys(train.captions + captions))), TinyT5Config(num_layers=layers), seed
    )
    asked = {"V": prompts("seen", VALIDATION_PAIRS), **{k: prompts(k) for k in KINDS[1:]}}
    curve: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def on_step(done: int, heads: SlotHeads) -> None:
        if done % every and done != steps:
            return
        row = {"step": done, **{k: _reading(encoder, heads, a) for k, a in asked.items()}}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        curve.append(row)
        print(f"step {done}: " + ", ".join(f"{k} {_pct(row[k])}" for k in asked), flush=True)

    train_slots(encoder, captions, said_N2, [10, 10], steps=steps, lr=1e-3, seed=seed, on_step=on_step, spans=spans)
    print(
        markdown_table(
            ["step", *asked, "seconds"], [[r["step"], *(_pct(r[k]) for k in asked), r["seconds"]] for r in curve]
        )
    )
    return {
        "steps": steps,
        "layers": layers,
        "words": words,
        "seed": seed,
        "validation_pairs": VALIDATION_PAIRS,
        "curve": curve,
    }


def part_guidance(model: str, images: int, grid: list[tuple[float, float]], seed: int) -> dict[str, Any]:
    from nextscale.pipelines.infinity import InfinityPipeline

    pipe = InfinityPipeline.from_pretrained(model)
    net = load_classifier(bundled_model_dir("demo-fmnist") / "classifier")
    items_train, items_test = fashion_mnist("train", size=32), fashion_mnist("test", size=32)
    real_test = (items_test.images.permute(0, 2, 3, 1).numpy(), items_test.labels.numpy())
    scale = real_item_scale(net, items_train.images[:10000].permute(0, 2, 3, 1).numpy(), real_test[0])
    t0 = time.perf_counter()
    rows = guidance_sweep(pipe, net, real_test, scale, dict.fromkeys(KINDS, images), grid, seed)
    seconds = time.perf_counter() - t0
    print(
        markdown_table(
            ["cfg", "tau", *KINDS, "FD ratio"],
            [
                [f"{r['settings']['cfg']:g}", f"{r['settings']['tau']:g}"]
                + [_pct(r[k]["pair_accuracy"]) for k in KINDS]
                + [f"{r['fd_ratio']:.0f}x"]
                for r in rows
            ],
        )
    )
    return {"model": str(model), "images": images, "seed": seed, "scale": scale, "rows": rows, "seconds": seconds}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("misses", "encoder", "guidance"), required=True)
    p.add_argument("--model", default=str(bundled_model_dir("demo-fmnist-t2i")), help="misses, guidance: a model")
    p.add_argument("--images", type=int, default=300, help="misses, guidance: images per prompt kind")
    p.add_argument("--cfgs", default="1,2,3,6", help="guidance: cfg values (a grid with --taus)")
    p.add_argument("--taus", default="0.5,1", help="guidance: temperatures")
    p.add_argument("--probe-steps", type=int, default=1500, help="misses: steps of the linear reader")
    p.add_argument("--steps", type=int, default=15000, help="encoder: training steps")
    p.add_argument("--every", type=int, default=1000, help="encoder: evaluate every so many steps")
    p.add_argument("--layers", type=int, default=4, help="encoder: T5 layers")
    p.add_argument(
        "--words", action="store_true", help="encoder: also tag each noun with its side and class (train_slots spans)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/t2i_reading_<part>.json)")
    args = p.parse_args(argv)
    for name in ("images", "probe_steps", "steps", "every", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        grid = [(float(c), float(tt)) for c in args.cfgs.split(",") for tt in args.taus.split(",")]
    except ValueError:
        p.error(f"--cfgs and --taus must be comma-separated numbers, got {args.cfgs!r} and {args.taus!r}")
    if any(c < 0 or tt <= 0 for c, tt in grid):
        p.error(f"cfg must be >= 0 and tau > 0, got --cfgs {args.cfgs} --taus {args.taus}")
    info = machine_info()
    print(f"# machine: {info}")
    if args.part == "misses":
        result = part_misses(args.model, args.images, args.probe_steps, args.seed)
    elif args.part == "guidance":
        result = part_guidance(args.model, args.images, grid, args.seed)
    else:
        result = part_encoder(args.steps, args.every, args.layers, args.seed, args.words)
    write_json(args.out or f"benchmarks/results/t2i_reading_{args.part}.json", {"machine": info, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
