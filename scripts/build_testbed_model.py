"""Build the bundled acceleration testbed from scratch: one command, resumable, every step with nextscale's code.

    python scripts/build_testbed_model.py [--precision bf16]

The acceleration methods (token pruning, KV compression, guidance cut-off, collaborative decoding) were designed
for VAR's official 10-scale schedule (final token map 16x16, 680 tokens); the demo model's 6 scales / 130 tokens
leave them nothing to work on, and random weights say nothing about fidelity. This testbed is small enough to
train on a 2-core CPU and has that geometry:

1. tokenizer: multi-scale VQ-VAE on Fashion-MNIST at 32x32 with ONE down-sampling stage (latent 16x16), the
   official scales 1,2,3,4,5,6,8,10,13,16 (codebook 512 x 16);
2. drafter: VAR depth 6, width 192 on that tokenizer, then trained on from those weights with a fresh schedule
   (a warm restart: ``--drafter-more-steps``; the first run alone left exact samples at 86 % class accuracy);
3. refiner: VAR depth 2, width 128 on the same tokenizer (~1/7 of the drafter's per-token cost, as VAR-d16 vs
   VAR-d30 in the CoDe paper) — CoDe's small model for the late scales;
4. quality: class accuracy and Fréchet distance of exact samples with the demo model's bundled classifier;
5. writes ``src/nextscale/assets/testbed-fmnist``: the drafter's folder, whose ``model_index.json`` names the
   refiner (a ``refiner/`` component beside ``transformer/``); transformers stored in float16;
6. calibrates KV compression on the written folder (``nextscale calibrate-kv --samples 40``: ``kv_budgets.json``,
   which scalekv and hack plan with).

Each training step resumes from its checkpoint when the command is run again (e.g. after being killed).
Needs Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from build_demo_model import portable

from nextscale.cli.main import main as cli
from nextscale.config import PATCH_NUMS_256
from nextscale.data import load_dataset
from nextscale.engine.var.params import SamplingParams
from nextscale.eval.classifier import load_classifier
from nextscale.jobs.quality import balanced_subset, conditional_quality
from nextscale.models.native import bundled_model_dir
from nextscale.models.native_var import load_native, save_native
from nextscale.pipelines.var import VARPipeline
from nextscale.train.config import VAETrainConfig, VARTrainConfig
from nextscale.train.runner import run_training

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_SAMPLES = 40


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "testbed"), help="run folders (checkpoints, metrics)")
    p.add_argument("--out", default=str(ROOT / "src" / "nextscale" / "assets" / "testbed-fmnist"))
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--drafter-steps", type=int, default=1000)
    p.add_argument(
        "--drafter-more-steps",
        type=int,
        default=1000,
        help="steps of a second drafter run that starts from the first's weights with a fresh schedule (0: none)",
    )
    p.add_argument("--refiner-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cfg", type=float, default=1.5, help="guidance of the recommended sampling settings")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="training autocast: bf16 pays off only with native bf16 (AVX512-BF16/AMX CPUs, GPUs)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end each training run after so many steps (a time-boxed session; rerun to continue)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work)
    common = dict(data="fashion-mnist", resume=True, precision=args.precision, stop_after=args.stop_after)

    vae_cfg = VAETrainConfig(
        out_dir=str(work / "vae"),
        batch_size=64,
        steps=args.vae_steps,
        lr=2e-3,
        eval_every=500,
        ckpt_every=100,
        log_every=50,
        image_size=32,
        ch_mult=(1, 2),
        patch_nums=PATCH_NUMS_256,
        **common,
    )
    tokenizer = work / "vae" / "tokenizer"
    if not (tokenizer / "model_index.json").is_file() and not _run(vae_cfg):
        return 3

    def var_cfg(name: str, depth: int, width: int, heads: int, steps: int, **kw: str) -> VARTrainConfig:
        return VARTrainConfig(
            tokenizer=str(tokenizer),
            out_dir=str(work / name),
            depth=depth,
            embed_dim=width,
            num_heads=heads,
            batch_size=args.batch_size,
            steps=steps,
            lr=1.5e-3,
            weight_decay=0.05,
            warmup=0.03,
            ema=0.0,
            eval_every=500,
            ckpt_every=50,
            log_every=25,
            **common,
            **kw,
        )

    drafter_cfg = var_cfg("drafter", 6, 192, 3, args.drafter_steps)
    refiner_cfg = var_cfg("refiner", 2, 128, 2, args.refiner_steps)
    stages = {"drafter": drafter_cfg, "refiner": refiner_cfg}
    if args.drafter_more_steps:
        init = str(work / "drafter" / "model")
        stages["drafter_more"] = var_cfg("drafter_more", 6, 192, 3, args.drafter_more_steps, init_from=init)
    for cfg in stages.values():
        if not (Path(cfg.out_dir) / "model" / "model_index.json").is_file() and not _run(cfg):
            return 3

    # Evaluate the weights exactly as they will ship (transformers rounded to float16).
    drafter, vae, _ = load_native(Path(stages.get("drafter_more", drafter_cfg).out_dir) / "model")
    refiner, _, _ = load_native(work / "refiner" / "model")
    staged = work / "staged"
    save_native(staged, drafter, vae, transformer_dtype=torch.float16)
    pipe = VARPipeline.from_pretrained(staged)
    clf = load_classifier(bundled_model_dir() / "classifier")
    train_ds, test_ds = load_dataset("fashion-mnist", "train", 32), load_dataset("fashion-mnist", "test", 32)
    real_train = balanced_subset(train_ds.images, train_ds.labels, args.per_class, 10)
    real_test = balanced_subset(test_ds.images, test_ds.labels, args.per_class, 10)
    settings = [SamplingParams(cfg=args.cfg, top_p=args.top_p, seed=0)]
    report = conditional_quality(pipe, clf, real_train, real_test, settings, args.per_class)
    s = report["settings"][0]
    print(
        f"exact samples (cfg {args.cfg}, top-p {args.top_p}): accuracy {s['class_accuracy']:.3f}, "
        f"FD {s['FD-classifier']:.2f} (real train vs test {report['real_train_vs_test']['FD-classifier']:.2f})"
    )

    defaults = {"cfg": args.cfg, "top_p": args.top_p}
    out = Path(args.out)
    save_native(
        out,
        pipe.transformer,
        pipe.vae,
        {"sampling_defaults": defaults, "trained_on": "fashion-mnist", "classifier": "demo-fmnist"},
        transformer_dtype=torch.float16,
        components={"refiner": refiner},
    )
    (out / "quality.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    if cli(["calibrate-kv", "--model", str(out), "--samples", str(CALIBRATION_SAMPLES)]):
        return 3
    record = {name: portable(c.to_dict(), work) for name, c in {"vae": vae_cfg, **stages}.items()}
    record["command"] = "python scripts/build_testbed_model.py --work WORK"
    record["kv_calibration"] = f"nextscale calibrate-kv --model OUT --samples {CALIBRATION_SAMPLES}"
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MB)")
    return 0


def _run(cfg: VAETrainConfig | VARTrainConfig) -> bool:
    """Train (or resume); False when the run stopped early (``--stop-after``): rerun the script to continue."""
    result = run_training(cfg)
    return result.get("step", cfg.steps) >= cfg.steps


if __name__ == "__main__":
    sys.exit(main())
