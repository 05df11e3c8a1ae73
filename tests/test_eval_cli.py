"""sample-fid (balanced, per-image seeds, resumable, ADM .npz) and eval (metrics against a reference)."""

from __future__ import annotations

import json

import numpy as np
import torch

from nextscale.engine.var.params import SamplingParams
from nextscale.eval.classifier import SmallClassifier, save_classifier
from nextscale.eval.evaluate import evaluate, load_image_set
from nextscale.jobs.sample_set import SampleSetSpec, generate_set, pack
from nextscale.pipelines.var import VARPipeline

from .conftest import tiny_pair


def test_sample_set_is_balanced_resumable_and_shard_independent(tmp_path):
    pipe = VARPipeline(*tiny_pair(2))
    spec = SampleSetSpec(classes=(0, 3), per_class=3, params=SamplingParams(cfg=2.0, top_k=10, seed=5), batch_size=2)
    assert spec.labels() == [0, 0, 0, 3, 3, 3]
    full = tmp_path / "full"
    assert generate_set(pipe, full, spec) == 6
    # two "ranks" writing into one folder make the same images as one process
    shard = tmp_path / "shard"
    assert generate_set(pipe, shard, spec, rank=1, world_size=2) == 3
    assert generate_set(pipe, shard, spec, rank=0, world_size=2) == 3
    for g in range(6):
        assert (full / f"{g:06d}.png").read_bytes() == (shard / f"{g:06d}.png").read_bytes()
    # resume: delete one image, only it is made again
    (full / "000004.png").unlink()
    assert generate_set(pipe, full, spec) == 1
    npz = pack(full, spec)
    with np.load(npz) as z:
        assert z["arr_0"].shape == (6, 8, 8, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [0, 0, 0, 3, 3, 3]
    protocol = json.loads((full / "protocol.json").read_text())
    assert protocol["sampling"]["cfg"] == 2.0 and protocol["per_class"] == 3


def test_eval_cli_end_to_end(tmp_path, capsys):
    from nextscale.cli.main import main

    var, vae = tiny_pair(2)
    model = tmp_path / "model"
    VARPipeline(var, vae).save_pretrained(model)
    assert (
        main(
            [
                "sample-fid",
                "--model",
                str(model),
                "--out",
                str(tmp_path / "s"),
                "--per-class",
                "4",
                "--classes",
                "0,1",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    clf = SmallClassifier(in_channels=3, num_classes=5, image_size=8)
    save_classifier(clf, tmp_path / "clf")
    assert (
        main(
            [
                "eval",
                str(tmp_path / "s.npz"),
                "--ref",
                str(tmp_path / "s"),
                "--features",
                f"classifier:{tmp_path / 'clf'}",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["samples"] == 8 and abs(result["FD-classifier(clf)"]) < 1e-6, "a set against itself: FD 0"
    assert result["precision"] == 1.0 and result["recall"] == 1.0 and "class_accuracy" in result
    assert "FD-classifier(clf):" in capsys.readouterr().out


def test_evaluate_separates_sets():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 60, (40, 8, 8, 1), dtype=np.uint8)
    b = rng.integers(190, 255, (40, 8, 8, 1), dtype=np.uint8)
    torch.manual_seed(0)
    clf = SmallClassifier(in_channels=1, num_classes=3, image_size=8).eval()
    same = evaluate(a[:20], a[20:], clf, net_name="c")
    diff = evaluate(a, b, clf, net_name="c")
    assert diff["FD-c"] > 10 * same["FD-c"] and diff["precision"] < same["precision"]


def test_load_image_set_from_builtin_split():
    imgs, labels = load_image_set("fashion-mnist:test", image_size=32, limit=5)
    assert imgs.shape == (5, 32, 32, 1) and imgs.dtype == np.uint8 and labels.shape == (5,)


def test_sample_fid_under_torchrun_matches_one_process(tmp_path):
    import subprocess
    import sys

    var, vae = tiny_pair(2)
    model = tmp_path / "model"
    VARPipeline(var, vae).save_pretrained(model)
    args = ["sample-fid", "--model", str(model), "--per-class", "3", "--classes", "0,1,2", "--seed", "4"]
    subprocess.run(
        [sys.executable, "-m", "nextscale", *args, "--out", str(tmp_path / "one")], check=True, capture_output=True
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29531",
            "-m",
            "nextscale",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
