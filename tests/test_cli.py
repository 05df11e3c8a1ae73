import json
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

from nextscale.cli.main import main

from .conftest import tiny_pair

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]


@pytest.fixture
def official_files(tmp_path):
    var, vae = tiny_pair(3)
    torch.save(var.state_dict(), tmp_path / "var.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    (tmp_path / "empty.pth").touch()
    with (tmp_path / "pickle.pth").open("wb") as f:
        pickle.dump(vae.state_dict(), f)
    return tmp_path


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_from_official_files_grid(official_files, capsys):
    d = official_files
    out = d / "grid.png"
    code, _, err = run(
        [
            "generate",
            "--checkpoint",
            str(d / "var.pth"),
            "--vae",
            str(d / "vae.pth"),
            "--class",
            "1",
            "--class",
            "3",
            "--num",
            "2",
            "--cfg",
            "2",
            "--top-k",
            "10",
            "--top-p",
            "0.9",
            "--seed",
            "0",
            "-o",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    im = Image.open(out)
    assert im.size[0] > 2 * 16 and im.mode == "RGB"
    assert "4 image(s)" in err


def test_convert_info_and_generate_by_class_name(official_files, capsys, tmp_path):
    d = official_files
    model = tmp_path / "native"
    code, _, err = run(
        ["convert", str(d / "var.pth"), str(d / "vae.pth"), "-o", str(model), "--class-names", str(d / "names.txt")],
        capsys,
    )
    assert code == 0, err
    code, out, _ = run(["info", str(model), "--json"], capsys)
    info = json.loads(out)
    assert info["format"] == "native" and info["transformer"]["config"]["class_names"] == NAMES
    code, out, _ = run(["info", str(d / "vae.pth"), "--patch-nums", "1,2,3,4"], capsys)
    assert code == 0 and "vae:" in out and "ch_mult" in out
    code, _, err = run(
        [
            "generate",
            "--model",
            str(model),
            "--class",
            "coat",
            "--class",
            "Trouser",
            "--separate",
            "-o",
            str(tmp_path / "imgs" / "s.png"),
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["s_000_coat.png", "s_001_trouser.png"]


def test_info_counts_parameters_the_same_for_a_file_and_its_converted_folder(official_files, capsys, tmp_path):
    d = official_files
    assert run(["convert", str(d / "var.pth"), str(d / "vae.pth"), "-o", str(tmp_path / "m")], capsys)[0] == 0
    for kind, file in (("transformer", "var.pth"), ("vae", "vae.pth")):
        paths = (str(d / file), str(tmp_path / "m"))
        lines = [
            next(
                line.strip()
                for line in run(["info", p, "--patch-nums", "1,2,3,4"], capsys)[1].splitlines()
                if line.strip().startswith(f"{kind}:")
            )
            for p in paths
        ]
        assert lines[0] == lines[1] and lines[0].endswith(" parameters"), lines
        counts = [
            json.loads(run(["info", p, "--patch-nums", "1,2,3,4", "--json"], capsys)[1])[kind]["params"] for p in paths
        ]
        assert counts[0] == counts[1] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--checkpoint", "{d}/vae.pth", "--vae", "{d}/vae.pth"], "this is a VQ-VAE checkpoint, not a VAR"),
        (["generate", "--checkpoint", "{d}/var.pth"], "--checkpoint and --vae must be given together"),
        (
            ["generate", "--checkpoint", "{d}/var.pth", "--vae", "{d}/vae.pth", "--class", "7"],
            "class 7 is out of range",
        ),
        (["info", "{d}/names.txt"], "not a readable PyTorch checkpoint"),
        (
            ["generate", "--checkpoint", "{d}/empty.pth", "--vae", "{d}/vae.pth"],
            "empty.pth: the file is empty (0 bytes)",
        ),
        (["info", "{d}/empty.pth"], "empty.pth: the file is empty (0 bytes)"),
        (["info", "{d}/pickle.pth"], "pickle.pth: not a readable PyTorch checkpoint (a pickle.dump file"),
    ],
)
def test_errors_are_one_line(official_files, capsys, argv, message):
    with warnings.catch_warnings(record=True) as caught:  # a warning would print lines before the error
        warnings.simplefilter("always")
        code, _, err = run([a.format(d=official_files) for a in argv], capsys)
    assert not caught, [str(w.message) for w in caught]
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nextscale: error: ") and message in lines[0], err


def test_module_entry_point_help():
    res = subprocess.run(
        [sys.executable, "-m", "nextscale", "generate", "--help"], capture_output=True, text=True, check=True
    )
    assert "--top-k" in res.stdout and "--model" in res.stdout


def test_info_takes_a_bundled_models_name_as_every_other_command_does(capsys):
    code, out, _ = run(["info", "demo-fmnist", "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["family"] == "var" and info["format"] == "native"
    assert info["path"].endswith("demo-fmnist")
    code, _, err = run(["info", "no-such-model"], capsys)
    assert code == 2
    assert err.strip() == (
        "nextscale: error: no-such-model: no such file or folder (nor a bundled model's name or a hub id)"
    )
