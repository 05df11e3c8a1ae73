"""Writing a model folder never loses a user's files (issue 18, section 1).

``convert -o DIR`` and ``save_pretrained(DIR)`` may replace an earlier model folder (one with model_index.json)
atomically, write into a new or empty folder, and nothing else: a file or a folder with other files in it is
refused in one line before any weights are read, and ``--force`` / ``overwrite=True`` moves it aside to
``<name>.old`` (never deletes it). Unnamed targets (``.``, ``..``, ``/``) are refused cleanly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nextscale import fileio
from nextscale.cli.main import main
from nextscale.errors import InvalidInputError
from nextscale.fileio import atomic_folder
from nextscale.pipelines.raster import LlamaGenPipeline
from nextscale.pipelines.var import VARPipeline

from .conftest import tiny_pair

VAR_FILES = Path(__file__).parent / "fixtures" / "var-official"
RASTER_FILES = Path(__file__).parent / "fixtures" / "llamagen-official"
CONVERT_VAR = ["convert", str(VAR_FILES / "var.pth"), str(VAR_FILES / "vae.pth")]
CONVERT_RASTER = [
    "convert",
    str(RASTER_FILES / "c2i_tiny_256.pt"),
    str(RASTER_FILES / "vq_ds16_c2i_tiny.pt"),
    "--n-head",
    "2",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def var_pipe() -> VARPipeline:
    return VARPipeline(*tiny_pair(0))


def user_docs(folder: Path) -> dict[str, bytes]:
    """A folder a user cares about: a file and a sub-folder with a file."""
    (folder / "sub").mkdir(parents=True)
    (folder / "important.txt").write_bytes(b"my notes\n")
    (folder / "sub" / "draft.txt").write_bytes(b"draft\n")
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def is_model_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and (folder / "transformer").is_dir()


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture
def no_conversion(monkeypatch):
    """Makes reading the official weights a test failure: a refused target must be refused before that."""

    def refuse(*a, **kw):
        raise AssertionError("weights were read for a target that is refused")

    monkeypatch.setattr(VARPipeline, "from_official", refuse)
    monkeypatch.setattr(LlamaGenPipeline, "from_official", refuse)


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


# ---- save_pretrained ------------------------------------------------------------------------------------------------
def test_an_earlier_model_folder_is_replaced_atomically(var_pipe, tmp_path):
    folder = var_pipe.save_pretrained(tmp_path / "m")
    (folder / "model_index.json").write_text('{"_class_name": "VARPipeline", "stale": true}')
    var_pipe.save_pretrained(folder)
    assert "stale" not in (folder / "model_index.json").read_text()
    assert VARPipeline.from_pretrained(folder).transformer.cfg == var_pipe.transformer.cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no temporary or old folders left behind"


def test_a_folder_of_other_files_is_refused_and_kept(var_pipe, tmp_path):
    docs = tmp_path / "mydocs"
    before = user_docs(docs)
    with pytest.raises(InvalidInputError) as err:
        var_pipe.save_pretrained(docs)
    msg = str(err.value)
    assert msg.startswith(f"{docs}: is a folder with files in it and no model_index.json") and "\n" not in msg
    assert "nothing was written" in msg and "overwrite=True" in msg
    assert snapshot(docs) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mydocs"]


def test_overwrite_moves_a_folder_of_other_files_aside_never_deletes_it(var_pipe, tmp_path):
    docs = tmp_path / "mydocs"
    before = user_docs(docs)
    var_pipe.save_pretrained(docs, overwrite=True)
    assert is_model_folder(docs) and snapshot(tmp_path / "mydocs.old") == before
    (tmp_path / "mydocs.old" / "x").mkdir()  # the next one must not land in (or over) the first backup
    user_docs(tmp_path / "again")
    os.replace(docs, tmp_path / "first-model")
    os.replace(tmp_path / "again", docs)
    var_pipe.save_pretrained(docs, overwrite=True)
    assert snapshot(tmp_path / "mydocs.old-2") == before and (tmp_path / "mydocs.old" / "x").is_dir()
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_is_refused_and_with_overwrite_moved_aside(var_pipe, tmp_path, overwrite):
    target = tmp_path / "existing.png"
    target.write_bytes(b"\x89PNG my picture")
    if not overwrite:
        with pytest.raises(InvalidInputError, match=r"existing.png: is an existing file; nothing was written"):
            var_pipe.save_pretrained(target)
        assert target.read_bytes() == b"\x89PNG my picture"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.png"], "the file was not renamed"
        return
    var_pipe.save_pretrained(target, overwrite=True)
    assert is_model_folder(target) and (tmp_path / "existing.png.old").read_bytes() == b"\x89PNG my picture"


def test_an_empty_folder_and_a_trailing_slash_are_written_into(var_pipe, tmp_path):
    (tmp_path / "empty").mkdir()
    var_pipe.save_pretrained(tmp_path / "empty")
    var_pipe.save_pretrained(f"{tmp_path}/new/")
    assert is_model_folder(tmp_path / "empty") and is_model_folder(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


@pytest.mark.parametrize("target", [".", "./", "..", "/", "sub/.."])
def test_unnamed_targets_are_refused_cleanly(var_pipe, tmp_path, monkeypatch, target):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(InvalidInputError, match=r"the current folder or one above it.*name a folder to create"):
        var_pipe.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and [p.name for p in work.iterdir()] == ["sub"]


def test_the_raster_pipeline_follows_the_same_rules(tmp_path):
    pipe = LlamaGenPipeline.from_official(
        RASTER_FILES / "c2i_tiny_256.pt", RASTER_FILES / "vq_ds16_c2i_tiny.pt", n_head=2
    )
    docs = tmp_path / "mydocs"
    before = user_docs(docs)
    with pytest.raises(InvalidInputError, match=r"mydocs: is a folder with files in it and no model_index.json"):
        pipe.save_pretrained(docs)
    assert snapshot(docs) == before
    pipe.save_pretrained(docs, overwrite=True)
    pipe.save_pretrained(docs)  # now a model folder: replaced
    assert is_model_folder(docs) and snapshot(tmp_path / "mydocs.old") == before
    assert LlamaGenPipeline.from_pretrained(docs).config == pipe.config


# ---- atomic_folder: the target is looked at again just before the rename --------------------------------------------
def test_files_that_appear_while_the_folder_is_built_are_not_replaced(tmp_path):
    target = tmp_path / "out"

    def fill(tmp: Path) -> None:
        (tmp / "model_index.json").write_text("{}")
        target.mkdir()  # e.g. the user saves something there meanwhile
        (target / "notes.txt").write_text("mine")

    with pytest.raises(InvalidInputError, match=r"out: is a folder with files in it"):
        atomic_folder(target, fill, ("model_index.json",))
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and hidden(tmp_path) == []


def test_a_failed_rename_puts_the_users_folder_back(tmp_path, monkeypatch):
    docs = tmp_path / "mydocs"
    before = user_docs(docs)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".mydocs."):  # the new folder moving into place
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        atomic_folder(docs, lambda tmp: (tmp / "model_index.json").write_text("{}"), overwrite=True)
    assert snapshot(docs) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mydocs"]


# ---- nextscale convert -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [CONVERT_VAR, CONVERT_RASTER], ids=["var", "raster"])
def test_convert_refuses_a_folder_of_other_files_before_reading_weights(tmp_path, capsys, no_conversion, argv):
    docs = tmp_path / "mydocs"
    before = user_docs(docs)
    code, lines = run([*argv, "-o", str(docs)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"nextscale: error: {docs}: is a folder with files in it and no model_index.json")
    assert "pass --force to move it aside to mydocs.old" in lines[0]
    assert snapshot(docs) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mydocs"]


def test_convert_never_renames_an_existing_file(tmp_path, capsys, no_conversion):
    picture = tmp_path / "existing.png"
    picture.write_bytes(b"\x89PNG my picture")
    code, lines = run([*CONVERT_VAR, "-o", str(picture)], capsys)
    assert code == 2 and len(lines) == 1 and f"{picture}: is an existing file; nothing was written" in lines[0]
    assert picture.read_bytes() == b"\x89PNG my picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.png"], "no .existing.png.old-NNNN"


@pytest.mark.parametrize("target", [".", "./", "..", "/"])
def test_convert_to_an_unnamed_target_is_one_line(tmp_path, capsys, monkeypatch, no_conversion, target):
    monkeypatch.chdir(tmp_path)
    code, lines = run([*CONVERT_VAR, "-o", target], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"nextscale: error: {target}: is ") and "the current folder or one above it" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_convert_to_an_unwritable_place_is_one_line_without_temp_names(capsys, no_conversion):
    code, lines = run([*CONVERT_VAR, "-o", "/proc/nextscale-model"], capsys)
    assert code == 2 and lines == [
        "nextscale: error: /proc/nextscale-model: cannot write in /proc: No such file or directory"
    ]


def test_convert_force_keeps_the_users_files_and_says_where(tmp_path, capsys):
    docs = tmp_path / "mydocs"
    before = user_docs(docs)
    code, lines = run([*CONVERT_VAR, "-o", str(docs), "--force"], capsys)
    assert code == 0, lines
    assert lines[0] == f"moved what was at {docs} aside to {tmp_path / 'mydocs.old'} (nothing was deleted)"
    assert is_model_folder(docs) and snapshot(tmp_path / "mydocs.old") == before


def test_convert_replaces_an_earlier_model_folder_even_of_the_other_family(tmp_path, capsys):
    model = tmp_path / "model"
    assert run([*CONVERT_VAR, "-o", str(model)], capsys)[0] == 0
    code, lines = run([*CONVERT_RASTER, "-o", f"{model}/"], capsys)
    assert code == 0 and lines[-1].startswith(f"wrote {model} (raster (LlamaGen): transformer"), lines
    assert LlamaGenPipeline.from_pretrained(model).config.image_size == 256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
