"""The CLI with raster (LlamaGen) models: convert -> info -> generate on the official fixture files, the family read
from a folder's model_index.json or a checkpoint's keys, and one-line refusals of the other family's options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextscale.cli.common import checkpoint_family, load_pipeline, resolve_model
from nextscale.cli.main import main
from nextscale.models.native import bundled_model_dir

from .conftest import tiny_pair

FIXTURES = Path(__file__).parent / "fixtures" / "llamagen-official"
GPT_FILE, VQ_FILE = FIXTURES / "c2i_tiny_256.pt", FIXTURES / "vq_ds16_c2i_tiny.pt"


pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(argv, capsys) -> str:
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nextscale: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    if not GPT_FILE.is_file():
        pytest.fail(f"llamagen-official fixtures missing under {FIXTURES}")
    out = tmp_path_factory.mktemp("raster") / "llamagen-tiny"
    assert main(["convert", str(GPT_FILE), str(VQ_FILE), "-o", str(out), "--n-head", "2"]) == 0
    return out


def test_convert_writes_a_folder_that_needs_no_arguments(converted):
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == "LlamaGenPipeline" and index["vae"] == ["nextscale", "VQModel"]
    cfg = json.loads((converted / "transformer" / "config.json").read_text())
    assert (cfg["n_head"], cfg["image_size"], cfg["vocab_size"]) == (2, 256, 16384)
    assert checkpoint_family(GPT_FILE) == checkpoint_family(VQ_FILE) == "raster"


def test_info_shows_the_family_and_config(converted, capsys):
    code, out, err = run(["info", converted], capsys)
    assert code == 0, err
    assert "family: raster (LlamaGen)" in out and "n_head: 2" in out and "(VQModel)" in out
    info = json.loads(run(["info", converted, "--json"], capsys)[1])
    assert info["family"] == "raster" and info["format"] == "native"
    assert info["transformer"]["config"]["image_size"] == 256 and info["vae"]["kind"] == "VQModel"
    # The official files count the same parameters as the folder made of them.
    gpt = json.loads(run(["info", GPT_FILE, "--n-head", "2", "--json"], capsys)[1])
    vq = json.loads(run(["info", VQ_FILE, "--json"], capsys)[1])
    assert gpt["family"] == vq["family"] == "raster" and gpt["format"] == "official"
    assert gpt["transformer"]["params"] == info["transformer"]["params"] == 1_138_112
    assert vq["vae"]["params"] == info["vae"]["params"]
    assert gpt["transformer"]["config"] == info["transformer"]["config"]


def test_generate_from_the_folder_reproduces_the_greedy_fixture(converted, capsys, tmp_path):
    ref = dict(np.load(FIXTURES / "gpt_sample_greedy.npz"))
    argv = ["generate", "--model", converted, "--class", "207", "--class", "360", "--top-k", "1", "--rng", "official"]
    code, _, err = run([*argv, "--batch-size", "2", "-o", f"{tmp_path}/imgs/"], capsys)
    assert code == 0, err
    files = sorted((tmp_path / "imgs").iterdir())
    assert [p.name for p in files] == ["000_207.png", "001_360.png"]
    # sample_c2i.py's uint8 mapping of the fixture's (unclamped) image crops, within one level of rounding.
    for i, path in enumerate(files):
        got = np.asarray(Image.open(path))[:16, :16].astype(int)
        crop = np.clip((np.clip(ref["image_crop_tl"][i], -1, 1) + 1) / 2 * 255 + 0.5, 0, 255).astype(int)
        assert got.shape == (16, 16, 3) and np.abs(got - crop.transpose(1, 2, 0)).max() <= 1


def test_generate_with_speculative_decoding(converted, capsys, tmp_path):
    out = tmp_path / "spec.png"
    argv = ["generate", "--model", converted, "--class", "207", "--top-k", "1", "--speculative", "sjd:window=8"]
    code, _, err = run([*argv, "-o", out], capsys)
    assert code == 0, err
    assert Image.open(out).size == (256 + 2 * 2, 256 + 2 * 2) and "1 image(s)" in err
    assert "--speculative sjd:window=8 -> sjd:window=8 (as given)" in err.splitlines(), "says what it runs"
    assert "slower than exact" not in err, "batch 1: where speculative decoding pays on a CPU"


def test_speculative_at_a_batch_on_a_cpu_says_it_is_slower(converted, capsys, tmp_path):
    argv = ["generate", "--model", converted, "--class", "207", "--num", "2", "--top-k", "1", "--speculative", "sjd"]
    code, _, err = run([*argv, "-o", tmp_path / "s.png"], capsys)
    assert code == 0, err
    assert (
        "speculative decoding at batch 2 on a CPU: each pass verifies 16 guesses per image, so past batch 1 it is "
        "slower than exact (bundled raster demo: 1.6x faster at batch 1" in err
    )
    code, _, err = run([*argv, "--batch-size", "1", "-o", tmp_path / "t.png"], capsys)
    assert code == 0 and "slower than exact" not in err


def test_generate_from_official_files_with_raster_options(capsys, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["generate", "--checkpoint", GPT_FILE, "--vae", VQ_FILE, "--n-head", "2", "--class", "1", "--num", "2"]
    code, _, err = run([*argv, "--cfg", "2", "--cfg-interval", "10", "--temperature", "0.9", "-o", out], capsys)
    assert code == 0, err
    assert Image.open(out).size == (2 * 256 + 3 * 2, 256 + 2 * 2) and "2 image(s)" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--model", "{m}", "--accel", "fast"],
            "--accel is an option of VAR (next-scale) models; {m} is a",
        ),
        (["generate", "--model", "{m}", "--more-smooth"], "--more-smooth is an option of VAR (next-scale) models"),
        (["generate", "--model", "{m}", "--patch-nums", "1,2"], "--patch-nums is an option of VAR (next-scale) models"),
        (["generate", "--temperature", "0.5"], "--temperature is an option of raster (LlamaGen) models; the bundled"),
        (["generate", "--cfg-interval", "3"], "--cfg-interval is an option of raster (LlamaGen) models"),
        (["generate", "--model", "{m}", "--class", "1000"], "class 1000 is out of range"),
        (["generate", "--model", "{m}", "--class", "dog"], "unknown class 'dog': this model has no class names"),
        (["convert", GPT_FILE, VQ_FILE, "-o", "{t}/x", "--patch-nums", "1,2"], "--patch-nums is an option of VAR"),
        (["info", GPT_FILE, "--patch-nums", "1,2"], "--patch-nums is an option of VAR (next-scale) models"),
        (["convert", VQ_FILE, GPT_FILE, "-o", "{t}/x"], "this is a LlamaGen VQ tokenizer checkpoint, not the GPT"),
        (["convert", GPT_FILE, VQ_FILE, "-o", "{t}/x", "--n-head", "3"], "pass the right n_head"),
        (["generate", "--model", "{m}", "--speculative", "nope"], "unknown speculative method 'nope'; available: "),
    ],
)
def test_options_of_the_other_family_are_refused_in_one_line(converted, capsys, tmp_path, argv, message):
    fill = {"m": converted, "t": tmp_path}
    line = one_line_error([str(a).format(**fill) for a in argv], capsys)
    assert message.format(**fill) in line, line
    assert not (tmp_path / "x").exists()


def test_var_options_on_a_var_model_and_var_folders_are_unchanged(capsys, tmp_path):
    var, vae = tiny_pair(3)
    torch.save(var.state_dict(), tmp_path / "var.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    assert checkpoint_family(tmp_path / "var.pth") == "var"
    assert run(["convert", tmp_path / "var.pth", tmp_path / "vae.pth", "-o", tmp_path / "m"], capsys)[0] == 0
    info = json.loads(run(["info", tmp_path / "m", "--json"], capsys)[1])
    assert info["family"] == "var" and "depth" in info["transformer"]["config"]
    line = one_line_error(["generate", "--model", tmp_path / "m", "--speculative", "sjd"], capsys)
    assert "--speculative is an option of raster (LlamaGen) models" in line
    line = one_line_error(["info", tmp_path / "m", "--n-head", "2"], capsys)
    assert "--n-head is an option of raster (LlamaGen) models" in line


def model_args(**kw) -> argparse.Namespace:
    base = dict(
        model=None,
        checkpoint=None,
        vae=None,
        patch_nums=None,
        n_head=None,
        image_size=None,
        class_names=None,
        device="cpu",
        dtype="float32",
        command="sample-fid",
    )
    return argparse.Namespace(**{**base, **kw})


def test_the_family_comes_from_the_folder_and_commands_say_what_they_support(converted):
    assert resolve_model(model_args(model=str(converted))) == ("raster", converted)
    demo = bundled_model_dir("demo-fmnist")
    assert resolve_model(model_args()) == ("var", demo)  # the default model: the bundled demo, a folder like any
    assert resolve_model(model_args(model="demo-fmnist")) == ("var", demo)
    assert resolve_model(model_args(checkpoint=str(GPT_FILE), vae=str(VQ_FILE))) == ("raster", None)
    with pytest.raises(ValueError, match=r"^nextscale sample-fid supports VAR \(next-scale\) models; .* is a raster"):
        load_pipeline(model_args(model=str(converted)), ("var",))  # sample-fid: VAR only (serve takes all)
    pipe = load_pipeline(model_args(model=str(converted)), families=("var", "raster"))
    assert type(pipe).__name__ == "LlamaGenPipeline" and pipe.image_size == 256
