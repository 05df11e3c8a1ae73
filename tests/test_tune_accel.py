"""tune-accel: candidates measured on the model, the fastest within the budget stored as its presets."""

from __future__ import annotations

import json

import pytest

from nextscale.cli.main import main
from nextscale.jobs.tune import Budget, _fastest, tune
from nextscale.pipelines.var import VARPipeline

from .conftest import tiny_pair

PNS = (1, 2, 3, 4, 5, 6)


@pytest.fixture
def model_dir(tmp_path):
    var, vae = tiny_pair(4, dict(depth=4, num_classes=3), dict(patch_nums=PNS, ch_mult=(1, 1, 2)))
    VARPipeline(var, vae).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_tuned_presets_are_written_and_then_used(model_dir, capsys):
    code = main(
        [
            "tune-accel",
            "--model",
            str(model_dir),
            "--per-class",
            "2",
            "--min-psnr",
            "0",
            "--fast-min-psnr",
            "0",
            "--json",
            str(model_dir.parent / "r.json"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    index = json.loads((model_dir / "model_index.json").read_text())
    report = json.loads((model_dir.parent / "r.json").read_text())
    fastest = max(report["candidates"], key=lambda r: r["flop_ratio"])["accel"]
    assert index["accel_presets"] == {"balanced": fastest, "fast": fastest}, "any loss allowed: the fastest wins"
    assert index["accel_tuning"]["metric"] == "psnr"
    pipe = VARPipeline.from_pretrained(model_dir)
    assert sorted(pipe.plan("balanced").names) == sorted(fastest)


def test_a_strict_budget_keeps_exact_quality(model_dir, capsys):
    code = main(
        [
            "tune-accel",
            "--model",
            str(model_dir),
            "--per-class",
            "1",
            "--min-psnr",
            "99",
            "--fast-min-psnr",
            "99",
            "--dry-run",
        ]
    )
    assert code == 0
    assert "balanced: none within the budget" in capsys.readouterr().err
    assert "accel_presets" not in json.loads((model_dir / "model_index.json").read_text()), "dry run writes nothing"


def test_a_preset_nothing_meets_is_stored_as_exact(model_dir):
    """The built-in combinations are candidates too: where none is within the budget, the model must not fall back
    to them."""
    report = tune(model_dir, Budget(min_psnr=99, fast_min_psnr=99), per_class=1, candidates=[["cfg-cutoff"]])
    assert report["presets"] == {"balanced": None, "fast": None}
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["accel_presets"] == {"balanced": [], "fast": []}
    pipe = VARPipeline.from_pretrained(model_dir)
    assert pipe.plan("fast") is None
    assert str(pipe.describe_accel("fast")) == "fast -> no acceleration (model's tuned preset)"


def test_budget_by_class_accuracy_points():
    rows = [
        {"accel": ["a"], "flop_ratio": 1.5, "class_accuracy": 0.90, "psnr": 20},
        {"accel": ["b"], "flop_ratio": 2.5, "class_accuracy": 0.85, "psnr": 15},
    ]
    base = {"class_accuracy": 0.905}
    assert _fastest(rows, base, 1.0, 0, by_accuracy=True) == ["a"]
    assert _fastest(rows, base, 6.0, 0, by_accuracy=True) == ["b"]
    assert _fastest(rows, base, 0.1, 0, by_accuracy=True) is None


def test_not_a_model_folder_is_one_line(tmp_path, capsys):
    assert main(["tune-accel", "--model", str(tmp_path)]) == 2
    assert "not a native model folder" in capsys.readouterr().err
