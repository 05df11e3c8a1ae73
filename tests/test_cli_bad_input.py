"""Every command's numeric, path and device options, given bad values: exit 2, one line, nothing left behind.

The option list is read from the parser itself, so a new option is covered (or fails the construction check)
without anyone adding it here.
"""

import argparse
from pathlib import Path

import pytest

from nextscale.cli.args import Device, ExistingFile, Float, Int, Pattern
from nextscale.cli.common import parse_patch_nums
from nextscale.cli.main import build_parser, main

LLAMAGEN = Path(__file__).parent / "fixtures" / "llamagen-official"
VAR = Path(__file__).parent / "fixtures" / "var-official"

# The smallest command lines each subcommand accepts up to its checks (inputs it needs exist in the test's folder).
BASE = {
    "generate": ["generate", "-o", "out.png"],
    "convert": ["convert", "model.pth", "tok.pth", "-o", "m"],
    "info": ["info", "model.pth"],
    "serve": ["serve"],
    "train-vae": ["train-vae", "--out-dir", "run"],
    "train": ["train", "--out-dir", "run"],
    "sample-fid": ["sample-fid", "--out", "sf"],
    "train-classifier": ["train-classifier", "--out", "clf"],
    "eval": ["eval", "samples.npz", "--ref", "ref.npz"],
    "tune-accel": ["tune-accel", "--model", "m"],
    "calibrate-kv": ["calibrate-kv", "--model", "m"],
}
VALIDATED = (Int, Float, Device, ExistingFile, Pattern)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def typed_options():
    for name, p in subcommands().items():
        for a in p._actions:
            if a.option_strings and a.type is not None:
                yield name, a


def bad_values(kind) -> list[str]:
    if isinstance(kind, Int):
        out = ["abc", "1.5", "", str(kind.lo - 1)]
        return out + ([str(kind.hi + 1)] if kind.hi is not None else ["1" + "0" * 30])
    if isinstance(kind, Float):
        return ["abc", "nan", "inf", "-inf", "1e999", str(kind.lo - 1), str(kind.hi * 10 + 1)]
    if isinstance(kind, Device):
        return ["bogus", "cuda:x", "cpu:1:2"]
    if isinstance(kind, ExistingFile):
        return ["missing.pth", "folder"]
    if kind is parse_patch_nums:
        return ["", "1,x", "0,1", "3,-2"]
    if isinstance(kind, Pattern):
        return ["", "wide", "0x0", "1024x", "16:", "x:9"]
    return []


def test_every_command_has_a_base_command_line():
    assert set(subcommands()) == set(BASE)


def test_every_numeric_device_and_file_option_is_a_validated_type():
    loose = [
        f"{cmd} {'/'.join(a.option_strings)}"
        for cmd, a in typed_options()
        if not isinstance(a.type, VALIDATED) and a.type not in (str, parse_patch_nums) and a.type.__name__ != "parse"
    ]
    assert not loose, f"options with an unchecked type (use nextscale.cli.args): {loose}"
    devices = [f"{cmd} {a.option_strings}" for cmd, a in typed_options() if a.dest == "device"]
    assert devices and all(isinstance(a.type, Device) for cmd, a in typed_options() if a.dest == "device"), devices


def _cases():
    for cmd, a in typed_options():
        for value in bad_values(a.type):
            yield pytest.param(cmd, a.option_strings[-1], value, id=f"{cmd} {a.option_strings[-1]}={value!r}")


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    for name in ("model.pth", "tok.pth", "samples.npz", "ref.npz"):  # the base command lines' inputs
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def one_line_exit_2(argv, capsys, workdir) -> str:
    before = _listing(workdir)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, (argv, err)
    assert "Traceback" not in err
    assert _listing(workdir) == before, (argv, _listing(workdir) - before)
    return lines[0]


@pytest.mark.parametrize(("cmd", "flag", "value"), list(_cases()))
def test_bad_option_value(cmd, flag, value, workdir, capsys):
    line = one_line_exit_2([*BASE[cmd], f"{flag}={value}"], capsys, workdir)
    assert (flag in line and "expected" in line) or "no such file" in line or "is a folder" in line, line


# Values that parse but that the model or the job refuses: still one line, exit 2, before any output appears.
def _text_file(d: Path) -> str:
    (d / "notes.pth").write_text("hello, not a checkpoint\n")
    return str(d / "notes.pth")


LATE = [
    ("text file as --checkpoint", lambda d: ["generate", "--checkpoint", _text_file(d), "--vae", _text_file(d)]),
    ("text file to info", lambda d: ["info", _text_file(d)]),
    (
        "LlamaGen VQ as a VAR model's --vae",
        lambda d: ["generate", "--checkpoint", str(VAR / "var.pth"), "--vae", str(LLAMAGEN / "vq_ds16_c2i_tiny.pt")],
    ),
    (
        "VAR VQ-VAE as a LlamaGen model's --vae",
        lambda d: ["generate", "--checkpoint", str(LLAMAGEN / "c2i_tiny_256.pt"), "--vae", str(VAR / "vae.pth")],
    ),
    (
        "convert with mismatched families",
        lambda d: ["convert", str(VAR / "var.pth"), str(LLAMAGEN / "vq_ds16_c2i_tiny.pt"), "-o", "m"],
    ),
    (
        "calibration batch beyond the KV memory",
        lambda d: ["calibrate-kv", "--model", "demo-fmnist", "--samples", "100000"],
    ),
    ("speculative on a VAR model", lambda d: ["generate", "--speculative", "sjd", "-o", "x.png"]),
    ("unknown class", lambda d: ["generate", "--class", "giraffe", "-o", "x.png"]),
    ("unknown accel", lambda d: ["generate", "--accel", "warp-speed", "-o", "x.png"]),
]


@pytest.mark.parametrize(("what", "argv"), LATE, ids=[c[0] for c in LATE])
def test_bad_input_the_parser_cannot_see(what, argv, workdir, capsys):
    args = argv(workdir)
    one_line_exit_2(args, capsys, workdir)


def test_an_unexpected_error_is_one_line_with_exit_1(workdir, capsys, monkeypatch):
    import nextscale.cli.generate as generate

    def boom(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(generate, "run", boom)  # read when the parser is built
    before = _listing(workdir)
    code = main(["generate"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "nextscale: internal error: ZeroDivisionError: a bug "
        "(rerun with --debug for the traceback, and please report it)"
    ]
    assert _listing(workdir) == before


def _unwritable_cases():
    yield "sample-fid --out in /proc", ["sample-fid", "--out", "/proc/nope/sf"]
    yield "eval --json in /proc", ["eval", "samples.npz", "--ref", "ref.npz", "--json", "/proc/nope.json"]
    yield "eval --json a folder", ["eval", "samples.npz", "--ref", "ref.npz", "--json", "folder"]
    yield "tune-accel --json in /proc", ["tune-accel", "--model", "demo-fmnist", "--json", "/proc/x.json"]
    yield "calibrate-kv -o in /proc", ["calibrate-kv", "--model", "demo-fmnist", "-o", "/proc/kv.json"]
    yield "train-classifier --out a folder of other files", ["train-classifier", "--out", "."]


@pytest.mark.parametrize(("what", "argv"), list(_unwritable_cases()), ids=[c[0] for c in _unwritable_cases()])
def test_outputs_are_checked_before_the_work(what, argv, workdir, capsys, monkeypatch):
    import nextscale.pipelines.var

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(nextscale.pipelines.var.VARPipeline, "from_pretrained", no_loading)
    one_line_exit_2(argv, capsys, workdir)
