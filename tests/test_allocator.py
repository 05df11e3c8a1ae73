"""Allocator detection and the re-execution under tcmalloc that `nextscale serve` and bench_serve opt into."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from nextscale import allocator, env

PROBE = (
    "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
    "from nextscale.allocator import use_tcmalloc, loaded_allocator; "
    "print(sys.argv[1:], use_tcmalloc(sys.argv[1]), loaded_allocator(), sep='|')"
)


def _run(choice: str, **extra_env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", env.ALLOCATOR_REEXEC)}
    return subprocess.run(
        [sys.executable, "-c", PROBE, choice], env={**clean, **extra_env}, capture_output=True, text=True, timeout=120
    )


def test_loaded_allocator_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.loaded_allocator(maps) == "system"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator.loaded_allocator(maps) == "tcmalloc"
    maps.write_text("7f02-7f03 r-xp 0 08:01 2 /opt/lib/libjemalloc.so.2\n")
    assert allocator.loaded_allocator(maps) == "jemalloc"
    assert allocator.loaded_allocator(tmp_path / "missing") == "system"


def test_bad_choice_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"auto, tcmalloc, system.*'fast'"):
        allocator.use_tcmalloc("fast")


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="needs libtcmalloc-minimal4 (CI installs it)")
def test_auto_reexecutes_the_command_under_tcmalloc_with_its_arguments():
    r = _run("auto")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().split("|") == ["['auto']", "tcmalloc", "tcmalloc"]  # same argv after the exec, on tcmalloc
    assert "re-executing under" in r.stderr


def test_after_a_reexec_it_never_loops_and_falls_back_to_tuning_glibc():
    r = _run("auto", **{env.ALLOCATOR_REEXEC: "1"})  # as if the preload had silently failed
    assert r.returncode == 0, r.stderr
    # what it reports is what its warning said it uses, not the "system" that loaded_allocator sees
    assert r.stdout.strip().split("|") == ["['auto']", allocator.TUNED_GLIBC, "system"]
    assert f"using {allocator.TUNED_GLIBC} instead" in r.stderr
    r = _run("tcmalloc", **{env.ALLOCATOR_REEXEC: "1"})
    assert r.returncode != 0 and "cannot switch to tcmalloc" in r.stderr


def test_system_leaves_the_process_alone():
    r = _run("system")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().split("|") == ["['system']", "system", "system"] and "re-executing" not in r.stderr


def test_tune_glibc_applies_on_glibc():
    assert allocator.tune_glibc() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
