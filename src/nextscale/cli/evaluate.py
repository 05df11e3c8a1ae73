"""``nextscale sample-fid`` (class-balanced sample sets, resumable, sharded under torchrun) and
``nextscale eval`` (Fréchet distance, precision/recall, IS-style score, class accuracy)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from nextscale.cli.args import BATCH, CFG, COUNT, PIXELS, SEED, TOP_K, TOP_P, Int
from nextscale.cli.common import add_model_args, load_pipeline

log = logging.getLogger("nextscale")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample-fid",
        help="write N images per class (PNG + ADM .npz) for evaluation",
        description="Image g uses a generator seeded from (seed, g): resumable (existing PNGs are "
        "skipped) and shardable with torchrun.",
    )
    add_model_args(p)
    p.add_argument("--out", required=True, help="folder for the PNGs; the .npz is written next to it")
    p.add_argument("--per-class", type=COUNT, default=50, help="images per class (VAR protocol: 50)")
    p.add_argument("--classes", default="all", help="'all' or comma-separated class indices/names")
    p.add_argument("--cfg", type=CFG, default=None, help="guidance (default: the model's recommended value)")
    p.add_argument("--top-k", type=TOP_K, default=None, help="top-k filter, 0 = off")
    p.add_argument("--top-p", type=TOP_P, default=None, help="top-p filter")
    p.add_argument("--more-smooth", action="store_true")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--batch-size", type=BATCH, default=16)
    p.add_argument("--no-pack", action="store_true", help="only write PNGs")
    p.set_defaults(func=run_sample)

    c = sub.add_parser("train-classifier", help="train the small classifier used as a feature network")
    c.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist5k or an image folder")
    c.add_argument("--data-root", default=None)
    c.add_argument("--image-size", type=PIXELS, default=32)
    c.add_argument("--epochs", type=Int(1, 100_000), default=3)
    c.add_argument("--batch-size", type=BATCH, default=128)
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--out", required=True, help="folder to write (safetensors + config.json)")
    c.set_defaults(func=run_train_classifier)

    q = sub.add_parser("eval", help="score samples against reference images in a feature network's space")
    q.add_argument("samples", help=".npz (arr_0 uint8 NHWC, optional arr_1 labels) or a PNG folder")
    q.add_argument("--ref", required=True, help="reference .npz / PNG folder / dataset split like fashion-mnist:test")
    q.add_argument(
        "--features",
        default=None,
        help="classifier:FOLDER or inception:pt_inception-2015-12-05-6726825d.pth "
        "(default: the bundled demo model's classifier)",
    )
    q.add_argument("--ref-limit", type=COUNT, default=None, help="use only the first N reference images")
    q.add_argument("-k", type=Int(1, 1000), default=3, help="neighbours for precision/recall (default 3)")
    q.add_argument("--json", default=None, help="also write the results to this file")
    q.set_defaults(func=run_eval)


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from nextscale.fileio import check_writable
    from nextscale.jobs.sample_set import SampleSetSpec, generate_set, pack
    from nextscale.train import dist

    check_writable(Path(args.out), f"--out {args.out}")  # the folder, and <out>.npz beside it
    info = dist.init(torch.device(args.device))
    try:
        pipe = load_pipeline(args, ("var",))  # the sample-set job runs VAR sampling settings
        classes = (
            tuple(range(pipe.num_classes))
            if args.classes == "all"
            else tuple(int(pipe.labels(c)[0]) for c in args.classes.split(","))
        )
        params = pipe.sampling_params(
            cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth, seed=args.seed
        )
        spec = SampleSetSpec(classes, args.per_class, params, args.batch_size)
        made = generate_set(pipe, args.out, spec, info.rank, info.world_size, progress=info.is_main)
        dist.barrier(info)
        if info.is_main:
            log.info("%d new images in %s (%d in the set)", made, args.out, len(spec.labels()))
            if not args.no_pack:
                out = pack(args.out, spec, extra={"model": args.model or args.checkpoint or "bundled demo"})
                log.info("packed -> %s", out)
    finally:
        dist.shutdown(info)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from nextscale.eval.evaluate import evaluate, load_feature_net, load_image_set
    from nextscale.fileio import atomic_file, check_file_target
    from nextscale.models.native import bundled_model_dir

    if args.json:
        check_file_target(args.json, f"--json {args.json}")
    features = args.features or f"classifier:{bundled_model_dir() / 'classifier'}"
    name, net = load_feature_net(features)
    samples, labels = load_image_set(args.samples)
    ref, _ = load_image_set(args.ref, image_size=samples.shape[1], limit=args.ref_limit)
    num_classes = getattr(getattr(net, "config", None), "num_classes", None)
    result = evaluate(samples, ref, net, labels, name, args.k, num_classes)
    for key, value in result.items():
        if key != "per_class_accuracy":
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        text = json.dumps(result, indent=2, default=float) + "\n"
        atomic_file(args.json, lambda f: f.write(text.encode()))
    return 0


def run_train_classifier(args: argparse.Namespace) -> int:
    import sys

    from nextscale.data import load_dataset
    from nextscale.eval.classifier import save_classifier, train_classifier
    from nextscale.fileio import folder_target

    folder_target(args.out, force_hint="another --out")  # before training, not after
    train = load_dataset(args.data, "train", args.image_size, root=args.data_root)
    test = load_dataset(args.data, "test", args.image_size, root=args.data_root)
    model, acc = train_classifier(
        train, test, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, progress=sys.stderr.isatty()
    )
    out = save_classifier(
        model,
        args.out,
        {
            "trained_on": args.data,
            "test_accuracy": acc,
            "epochs": args.epochs,
            "seed": args.seed,
            "class_names": list(train.class_names),
        },
    )
    log.info("test accuracy %.4f -> %s", acc, out)
    return 0
