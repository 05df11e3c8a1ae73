"""Build the bundled demo model from scratch: one command, resumable, every step with nextscale's own code.

    python scripts/build_demo_model.py

1. tokenizer: multi-scale VQ-VAE on Fashion-MNIST at 32x32 (codebook 512 x 16, scales 1,2,3,4,6,8);
2. transformer: VAR, depth 6, width 192, on the frozen tokenizer's tokens (the raw weights are exported: an
   EMA with decay 0.998 lags a 1,300-step run — its samples scored FD 76 vs 59 and 91 % vs 96 % accuracy
   at cfg 1.5, top-p 0.9);
3. classifier: the small CNN used as the evaluation feature network;
4. quality: class accuracy and Fréchet distance (classifier features) of 150 samples per class for several
   guidance settings; the best setting that meets both targets becomes the model's recommended default;
5. writes ``src/nextscale/assets/demo-fmnist`` (transformer stored in float16 to stay under 20 MB);
6. acceleration presets: ``tune-accel`` on the folder as written (``--tune-per-class`` images per class, the same
   seeds for exact and every candidate, class accuracy with the bundled classifier): the fastest candidates within
   1 and 5 points of exact become its ``balanced`` / ``fast`` (``model_index.json`` ``accel_presets``). The built-in
   presets are made for VAR's 10 scales; on 6 scales each late scale is a large share of the tokens.

``--init-from FOLDER`` (e.g. ``src/nextscale/assets/demo-fmnist``) starts both trainings from that model's weights
with a fresh schedule (a warm restart: a longer run without repeating the first) and reuses its classifier, so the
figures stay comparable with every other bundled model's; with ``--vae-steps 0`` its tokenizer is kept as it is and
only the transformer trains on. Each training step resumes from its checkpoint if the
command is run again (e.g. after being killed), and the tuning report is reused while the weights, defaults and
candidates are the same (``WORK/accel.json``). The quality report also holds what the tokenizer alone costs
(``tokenizer_reconstructions``: its reconstructions scored as samples are). Needs Debian's
``dataset-fashion-mnist``. Runtime on a 2-core CPU: see README (about 1.5-2 hours).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from nextscale.data import load_dataset
from nextscale.engine.var.params import SamplingParams
from nextscale.eval.classifier import load_classifier, save_classifier, train_classifier
from nextscale.jobs.quality import balanced_subset, choose_defaults, conditional_quality, reconstruction_quality
from nextscale.jobs.tune import CANDIDATES, Budget, tune, write_presets
from nextscale.models.native_var import load_tokenizer, save_native, save_tokenizer
from nextscale.pipelines.var import VARPipeline
from nextscale.train.config import VAETrainConfig, VARTrainConfig
from nextscale.train.runner import run_training

ROOT = Path(__file__).resolve().parents[1]
ACC_TARGET, FD_RATIO_TARGET = 0.95, 5.0


def portable(cfg: dict, work: Path) -> dict:
    """The config with run folders written relative to the ``--work`` folder (``WORK/...``) and repository paths
    (an ``init_from`` model) relative to the repository, so the shipped build record names no path of the machine
    that built it."""

    def rel(v: object) -> object:
        if isinstance(v, str) and Path(v).is_relative_to(work):
            return str(Path("WORK") / Path(v).relative_to(work))
        if isinstance(v, str) and Path(v).is_absolute():
            return shown(Path(v))
        return v

    return {k: rel(v) for k, v in cfg.items()}


def shown(path: Path | None) -> str | None:
    """A path as the build record shows it: relative to the repository when inside it (no machine's paths)."""
    if path is None:
        return None
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def tune_presets(out: Path, cache: Path, defaults: dict, per_class: int) -> dict:
    """``tune-accel`` on the written folder, its report cached in ``cache`` while the weights, defaults, candidates
    and budget are the same; writes the chosen presets into ``out/model_index.json``."""
    weights = hashlib.sha256((out / "transformer" / "model.safetensors").read_bytes()).hexdigest()[:16]
    budget = Budget()
    key = {"transformer": weights, "defaults": defaults, "per_class": per_class, "candidates": CANDIDATES}
    key["budget"] = budget.__dict__
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") == key:
        report = cached["report"]
    else:
        report = tune(out, budget, per_class, write=False)
        cache.write_text(json.dumps({"key": key, "report": report}, indent=2) + "\n")
    write_presets(out, report["presets"], report)
    for name, specs in report["presets"].items():
        print(f"{name} preset: {' + '.join(specs) if specs else 'exact (nothing within the budget)'}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "demo"), help="run folders (checkpoints, metrics)")
    p.add_argument("--out", default=str(ROOT / "src" / "nextscale" / "assets" / "demo-fmnist"))
    p.add_argument(
        "--vae-steps", type=int, default=2400, help="tokenizer steps; 0 (with --init-from) keeps that model's tokenizer"
    )
    p.add_argument("--var-steps", type=int, default=1300)
    p.add_argument("--cfgs", default="1.0,1.5,2.0,3.0", help="guidance values to evaluate")
    p.add_argument("--top-ps", default="0,0.9", help="top-p values to evaluate (grid with --cfgs)")
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument(
        "--tune-per-class", type=int, default=50, help="images per class to tune the acceleration presets (0: skip)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="training autocast: bf16 pays off only with native bf16 (AVX512-BF16/AMX CPUs, GPUs)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="a model folder (e.g. the shipped demo) both trainings start from: a longer run without starting over; "
        "its classifier is reused as the evaluation network, so the figures stay comparable",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work)
    init = Path(args.init_from).resolve() if args.init_from else None
    if init is not None and not (init / "model_index.json").is_file():
        p.error(f"--init-from {init}: not a model folder (no model_index.json)")
    # The build record of the model trained on, read now: --out may be that folder, replaced at the end. Kept in
    # the new record, so a model trained on in several runs says every run that made it.
    init_build = json.loads((init / "build.json").read_text()) if init and (init / "build.json").is_file() else None

    if args.vae_steps < 0 or args.var_steps < 1:
        p.error(f"--vae-steps {args.vae_steps} --var-steps {args.var_steps}: need --vae-steps >= 0, --var-steps >= 1")
    if args.vae_steps == 0 and init is None:
        p.error("--vae-steps 0 keeps the tokenizer of --init-from FOLDER: give one (from scratch it must be trained)")
    vae_cfg = (
        VAETrainConfig(
            data="fashion-mnist",
            out_dir=str(work / "vae"),
            batch_size=64,
            steps=args.vae_steps,
            lr=2e-3,
            eval_every=400,
            ckpt_every=100,
            log_every=50,
            resume=True,
            precision=args.precision,
            init_from=str(init) if init else None,
        )
        if args.vae_steps > 0
        else None
    )
    tokenizer = work / "vae" / "tokenizer"
    if not (tokenizer / "model_index.json").is_file():
        if vae_cfg is None:
            # The transformer alone trains on: its tokens stay the ones it was trained on (a retrained tokenizer
            # moves every code under it, and its reconstructions already score far better than the samples).
            assert init is not None  # checked with the arguments
            save_tokenizer(tokenizer, load_tokenizer(init))
        else:
            run_training(vae_cfg)

    var_cfg = VARTrainConfig(
        data="fashion-mnist",
        tokenizer=str(tokenizer),
        out_dir=str(work / "var"),
        depth=6,
        embed_dim=192,
        num_heads=3,
        batch_size=128,
        steps=args.var_steps,
        lr=1.5e-3,
        weight_decay=0.05,
        warmup=0.03,
        ema=0.0,
        eval_every=250,
        ckpt_every=50,
        log_every=25,
        resume=True,
        compile=True,
        precision=args.precision,
        init_from=str(init) if init else None,
    )
    model_dir = work / "var" / "model"
    if not (model_dir / "model_index.json").is_file():
        run_training(var_cfg)

    clf_dir = work / "classifier"
    train_ds, test_ds = load_dataset("fashion-mnist", "train", 32), load_dataset("fashion-mnist", "test", 32)
    if init is not None and (init / "classifier" / "config.json").is_file() and not clf_dir.exists():
        shutil.copytree(init / "classifier", clf_dir)
    if not (clf_dir / "config.json").is_file():
        clf, acc = train_classifier(train_ds, test_ds, epochs=3, seed=0)
        save_classifier(
            clf,
            clf_dir,
            {
                "trained_on": "fashion-mnist",
                "test_accuracy": acc,
                "epochs": 3,
                "class_names": list(train_ds.class_names),
            },
        )
    clf = load_classifier(clf_dir)

    # Evaluate the weights exactly as they will ship (transformer rounded to float16).
    staged = work / "staged"
    src = VARPipeline.from_pretrained(model_dir)
    save_native(staged, src.transformer, src.vae, transformer_dtype=torch.float16)
    pipe = VARPipeline.from_pretrained(staged)
    settings = [
        SamplingParams(cfg=float(c), top_p=float(tp), seed=0)
        for tp in args.top_ps.split(",")
        for c in args.cfgs.split(",")
    ]
    real_train = balanced_subset(train_ds.images, train_ds.labels, args.per_class, 10)
    real_test = balanced_subset(test_ds.images, test_ds.labels, args.per_class, 10)
    report = conditional_quality(pipe, clf, real_train, real_test, settings, args.per_class)
    real_fd = report["real_train_vs_test"]["FD-classifier"]
    report["tokenizer_reconstructions"] = reconstruction_quality(pipe.vae, clf, real_train, real_test, real_fd=real_fd)
    defaults, best = choose_defaults(report["settings"], ACC_TARGET)
    ok = best["class_accuracy"] >= ACC_TARGET and best["fd_ratio"] <= FD_RATIO_TARGET
    report.update(
        {
            "chosen_defaults": defaults,
            "targets_met": ok,
            "targets": {"class_accuracy": ACC_TARGET, "fd_ratio": FD_RATIO_TARGET},
        }
    )
    for s in report["settings"]:
        print(
            f"cfg {s['cfg']:.1f} top_p {s['top_p']}: accuracy {s['class_accuracy']:.3f}, "
            f"FD {s['FD-classifier']:.2f} (ratio {s['fd_ratio']:.2f})"
        )
    rec = report["tokenizer_reconstructions"]
    print(f"tokenizer reconstructions: FD ratio {rec['fd_ratio']:.2f}, accuracy {rec['class_accuracy']:.3f}")
    print(
        f"real train vs test FD {report['real_train_vs_test']['FD-classifier']:.2f}; defaults {defaults}; "
        f"targets met: {ok}"
    )

    out = Path(args.out)
    save_native(
        out,
        pipe.transformer,
        pipe.vae,
        {"sampling_defaults": defaults, "trained_on": "fashion-mnist"},
        transformer_dtype=torch.float16,
    )
    shutil.copytree(clf_dir, out / "classifier")
    if args.tune_per_class > 0:
        report["accel"] = tune_presets(out, work / "accel.json", defaults, args.tune_per_class)
    (out / "quality.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / "build.json").write_text(
        json.dumps(
            {
                # init_from included, shown relative to the repository
                "vae": {"kept_from": shown(init)} if vae_cfg is None else portable(vae_cfg.to_dict(), work),
                "var": portable(var_cfg.to_dict(), work),
                "command": "python scripts/build_demo_model.py --work WORK"
                + (f" --init-from {shown(init)}" if init else "")
                + (f" --precision {args.precision}" if args.precision != "fp32" else "")
                + f" --vae-steps {args.vae_steps} --var-steps {args.var_steps}",
                **({"init_build": init_build} if init_build is not None else {}),
            },
            indent=2,
        )
        + "\n"
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
