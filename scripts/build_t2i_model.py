"""Build the bundled text-to-image model ``demo-fmnist-t2i`` from scratch: one command, resumable, every step with
nextscale's own code.

    python scripts/build_t2i_model.py

Data: ``fashion-pairs``, two Fashion-MNIST train items side by side on a 32 x 64 canvas, captioned in six phrasings
("a sneaker on the left and a bag on the right", "bag to the right of sneaker", ...); ten ordered pairs and two
phrasings never appear in training (``data.captions``).

1. text encoder: a 4-layer, width-128 T5 encoder and a byte-pair tokenizer, trained to read which item a caption puts
   on each side (``train.text_encoder.train_slots``) from captions of the training pairs drawn from a phrasing
   grammar that has the six seen phrasings as instances (``data.captions.varied_captions``: never a held-out
   phrasing or a word only those have), and to tag each noun with its side and class (``noun_spans``; off with
   ``--no-text-words``), then frozen;
2. tokenizer: Infinity's bitwise BSQ-VAE (16 bits per latent pixel, 4 px per token: Infinity's "0.04M" grids,
   1x1 .. 8x16, are the 32 x 64 canvas) with ``train-vae --arch bsq``;
3. transformer: an Infinity of depth 6, width 192 with ``train --arch infinity`` (bit labels, Bitwise
   Self-Correction, 10 % of captions dropped to the learned null text);
4. quality: pair accuracy of seen prompts, held-out pairs and held-out phrasings, read by the bundled demo
   classifier on each half, and the halves' Fréchet distance to real test items, for a grid of guidance settings;
   of the settings within one standard error of the best seen-pair accuracy, the one with the lowest FD becomes
   the model's default (``jobs.prompt_quality.choose_setting``; the sweep is in ``quality.json``);
5. writes ``src/nextscale/assets/demo-fmnist-t2i`` (transformer stored in float16).

Each training step resumes from its checkpoint if the command is run again; the text encoder is rebuilt only if
its folder is missing. ``--init-from src/nextscale/assets/demo-fmnist-t2i`` trains on from the shipped model
instead of from scratch (its tokenizer kept; ``--text-steps 0`` keeps its encoder too). Needs Debian's
``dataset-fashion-mnist``. Runtime on 2 AVX512-BF16 cores: see the README.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from build_demo_model import portable, shown

from nextscale.data import fashion_mnist, fashion_pairs
from nextscale.data.captions import noun_spans, prompts, varied_captions
from nextscale.eval.classifier import load_classifier
from nextscale.fileio import atomic_folder
from nextscale.jobs.prompt_quality import KINDS, choose_setting, guidance_sweep, real_item_scale
from nextscale.models.native import bundled_model_dir
from nextscale.models.text_encoder import TextEncoder, save_tokenizer
from nextscale.pipelines.infinity import InfinityPipeline
from nextscale.train.config import BSQTrainConfig, InfinityTrainConfig
from nextscale.train.runner import run_training
from nextscale.train.text_encoder import TinyT5Config, caption_tokenizer, slot_accuracy, tiny_t5, train_slots

ROOT = Path(__file__).resolve().parents[1]
TEXT_ENCODER = TinyT5Config(num_layers=4)
# The model's own presets: the fastest setting measured within each preset's budget (balanced 2, fast 5 points of
# pair accuracy; bench_infinity.py --part fidelity, benchmarks/RESULTS.md). On its 6 scales the last two hold 85 % of
# the tokens: every method that saves time there costs 8-75 points, and those within 5 (hack, int8) save none on a
# CPU, so both presets run exact.
ACCEL_PRESETS: dict[str, list[str]] = {"balanced": [], "fast": []}
log = logging.getLogger("build_t2i")


def build_text_encoder(folder: Path, steps: int, seed: int, init: Path | None = None, words: bool = False) -> dict:
    """Step 1: tokenizer + tiny T5 trained to read the slots of grammar captions of the training pairs, saved to
    ``folder``. ``init``: a t2i model folder whose encoder and tokenizer are trained on for ``steps`` more (0: kept
    as they are, with that model's report). ``words``: also tag each noun with its side and class (``train_slots``'s
    ``spans``)."""
    report_path = folder / "slots.json"
    if report_path.is_file():
        return json.loads(report_path.read_text())
    train = fashion_pairs("train", 64, wide=True)
    slots = torch.stack([train.left_label_N, train.right_label_N], dim=1)
    captions, said = varied_captions(slots, seed=seed)
    if init is not None:
        encoder = TextEncoder.from_pretrained(init / "text_encoder")
        tok = encoder.tokenizer
        earlier = json.loads((init / "quality.json").read_text())["text_encoder"]
        report = {"init_from": shown(init), "init_report": earlier}
    else:
        tok = caption_tokenizer(list(dict.fromkeys(train.captions + captions)))
        encoder = tiny_t5(tok, TEXT_ENCODER, seed=seed)
        report = {}
    if steps:
        t0 = time.perf_counter()
        spans = [noun_spans(c, tuple(s)) for c, s in zip(captions, said.tolist())] if words else None
        heads, last = train_slots(encoder, captions, said, [10, 10], steps=steps, lr=1e-3, seed=seed, spans=spans)
        report.update(
            {"steps": steps, "words": words, "seconds": round(time.perf_counter() - t0, 1), "train_last_step": last}
        )
        for kind in KINDS:
            ps = prompts(kind)
            truth = torch.tensor([[a, b] for _, a, b in ps])
            report[f"slot_accuracy_{kind}"] = slot_accuracy(encoder, heads, [p for p, _, _ in ps], truth)
    elif init is None:
        raise SystemExit("--text-steps 0 keeps an encoder: it needs --init-from")
    log.info("text encoder: %s", report)

    def fill(tmp: Path) -> None:
        encoder.encoder.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, tmp)
        (tmp / "slots.json").write_text(json.dumps(report, indent=2) + "\n")

    atomic_folder(folder, fill, ("slots.json",), overwrite=False)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "t2i"), help="run folders (checkpoints, metrics)")
    p.add_argument("--out", default=str(bundled_model_dir("demo-fmnist-t2i")))
    p.add_argument("--text-steps", type=int, default=5000)
    p.add_argument(
        "--text-words",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the text encoder also learns to tag each noun with its side and class (default; it reads held-out "
        "pairs better and the image model draws them better: benchmarks/RESULTS.md)",
    )
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--steps", type=int, default=2000, help="transformer steps (64 canvases each)")
    p.add_argument("--cfgs", default="3,4,5,6", help="guidance values to evaluate")
    p.add_argument("--taus", default="0.5,1.0", help="temperatures to evaluate (grid with --cfgs)")
    p.add_argument("--images", type=int, default=300, help="images per prompt kind for each setting")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-from",
        type=Path,
        help="a t2i model folder (e.g. the shipped demo) to train on from: its tokenizer is kept as it is (new "
        "tokens would void what the transformer learned), its text encoder trained --text-steps more (0: kept) and "
        "its transformer --steps more",
    )
    args = p.parse_args(argv)
    if args.init_from is not None and not (args.init_from / "model_index.json").is_file():
        p.error(f"--init-from {args.init_from}: not a model folder (no model_index.json)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    text_folder = work / "text_encoder"
    text_report = build_text_encoder(text_folder, args.text_steps, args.seed, args.init_from, args.text_words)
    times["text_encoder_s"] = round(time.perf_counter() - t0, 1)

    vae_cfg = BSQTrainConfig(
        out_dir=str(work / "vae"),
        steps=args.vae_steps,
        batch_size=32,
        lr=1e-3,
        eval_every=500,
        ckpt_every=200,
        log_every=50,
        resume=True,
        precision=args.precision,
        seed=args.seed,
    )
    tokenizer = work / "vae" / "tokenizer" if args.init_from is None else args.init_from
    t0 = time.perf_counter()
    if not (tokenizer / "model_index.json").is_file():
        run_training(vae_cfg)
    times["tokenizer_s"] = round(time.perf_counter() - t0, 1)

    inf_cfg = InfinityTrainConfig(
        out_dir=str(work / "infinity"),
        tokenizer=str(tokenizer),
        text_encoder=str(text_folder),
        init_from=None if args.init_from is None else str(args.init_from),
        steps=args.steps,
        batch_size=64,
        lr=1e-3,
        warmup=0.03,
        eval_every=250,
        ckpt_every=50,
        log_every=25,
        resume=True,
        precision=args.precision,
        seed=args.seed,
    )
    model_dir = work / "infinity" / "model"
    t0 = time.perf_counter()
    if not (model_dir / "model_index.json").is_file():
        run_training(inf_cfg)
    times["transformer_s"] = round(time.perf_counter() - t0, 1)

    # ---- quality sweep ---------------------------------------------------------------------------------------
    pipe = InfinityPipeline.from_pretrained(model_dir)
    net = load_classifier(bundled_model_dir("demo-fmnist") / "classifier")
    items_train, items_test = fashion_mnist("train", size=32), fashion_mnist("test", size=32)
    real_test = (items_test.images.permute(0, 2, 3, 1).numpy(), items_test.labels.numpy())
    scale = real_item_scale(net, items_train.images[:10000].permute(0, 2, 3, 1).numpy(), real_test[0])
    counts = dict.fromkeys(KINDS, args.images)
    grid = [(float(c), float(t)) for c in args.cfgs.split(",") for t in args.taus.split(",")]

    def logged(r: dict) -> None:
        s = r["settings"]
        log.info(
            "cfg %.1f tau %.2f: pairs seen %.3f, held-out pairs %.3f, held-out phrasings %.3f, FD ratio %.1f",
            s["cfg"],
            s["tau"],
            r["seen"]["pair_accuracy"],
            r["held-out-pairs"]["pair_accuracy"],
            r["held-out-phrasings"]["pair_accuracy"],
            r["fd_ratio"],
        )

    t0 = time.perf_counter()
    rows = guidance_sweep(pipe, net, real_test, scale, counts, grid, args.seed, on_row=logged)
    times["quality_s"] = round(time.perf_counter() - t0, 1)
    best = choose_setting(rows)
    defaults = {k: best["settings"][k] for k in ("cfg", "tau")}
    pipe.sampling_defaults.update(defaults)  # pn and size: the training schedule's, from the export
    pipe.accel_presets = dict(ACCEL_PRESETS)
    quality = {"real_train_vs_test": scale, "chosen": defaults, "settings": rows, "text_encoder": text_report}

    out = Path(args.out)
    tmp_out = work / "asset"
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    pipe.save_pretrained(tmp_out, transformer_dtype=torch.float16)
    build = {
        "command": "python scripts/build_t2i_model.py " + " ".join(sys.argv[1:]),
        "text_encoder": {"steps": args.text_steps, "words": args.text_words, "config": TEXT_ENCODER.__dict__},
        "init_from": shown(args.init_from),
        "tokenizer": portable(vae_cfg.to_dict(), work) if args.init_from is None else shown(args.init_from),
        "transformer": portable(inf_cfg.to_dict(), work),
        "seconds": times,
        "torch": torch.__version__,
    }
    (tmp_out / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    (tmp_out / "quality.json").write_text(json.dumps(quality, indent=2, default=float) + "\n")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tmp_out, out)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"wrote {out} ({size_mb:.1f} MB); defaults {defaults}")
    print(json.dumps({k: best[k] for k in KINDS}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
