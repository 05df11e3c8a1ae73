"""Package layering: no module of src/nextscale imports a layer above it or beside it.

Read from the source with ``ast`` (imports inside functions and under ``TYPE_CHECKING`` count: a lazy import is
still a dependency), so a circle between layers fails here before it fails as an ImportError at some call site.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "nextscale"

# The layer order, written down once (shared/design/ARCHITECTURE.md): each layer names the layers it may import
# directly; what those may import, it may too. Layers not connected either way (data/eval/train, engine/eval,
# serve/jobs) are beside each other and must not import each other.
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "base": (),  # errors, env, fileio, config, allocator, plot, bench, and the root package's __version__
    "models": ("base",),
    "data": ("base",),
    "eval": ("models", "data"),  # Inception weights load through models.weights; reference images come from data
    "engine": ("models",),
    "accel": ("engine",),  # plug-ins produce the plans the engine consumes; the engine never imports them
    "pipelines": ("accel",),
    "train": ("models", "data"),
    "serve": ("pipelines",),
    "jobs": ("pipelines", "eval"),  # batch work that drives a pipeline: FID sample sets, quality reports
    "cli": ("serve", "jobs", "train"),
}
# Top-level modules of nextscale/ (sub-packages are layers of their own name).
TOP_LEVEL: dict[str, str] = {
    "errors": "base",
    "env": "base",
    "fileio": "base",
    "config": "base",
    "allocator": "base",
    "plot": "base",
    "bench": "base",
    "hardware": "base",
    "editing": "pipelines",
    "images": "pipelines",
    "labels": "pipelines",
    "__main__": "cli",
}
# The root package re-exports the public API lazily (by name, through importlib), so importing it for
# ``__version__`` never pulls in the pipeline; its own TYPE_CHECKING imports are exempt for that reason.
FACADE = PACKAGE / "__init__.py"
MODULES = [p for p in sorted(PACKAGE.rglob("*.py")) if p != FACADE]


def _reachable(layer: str) -> set[str]:
    seen, todo = set(), list(MAY_IMPORT[layer])
    while todo:
        if (low := todo.pop()) not in seen:
            seen.add(low)
            todo.extend(MAY_IMPORT[low])
    return seen


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """``nextscale.x.y`` -> the layer of ``x``; the root package itself (``__version__``) is base."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    head = parts[1]
    if head in MAY_IMPORT and (PACKAGE / head).is_dir():
        return head
    if head in TOP_LEVEL:
        return TOP_LEVEL[head]
    raise AssertionError(
        f"{module}: no layer; add it to MAY_IMPORT (a package) or TOP_LEVEL (a module) in {Path(__file__).name}"
    )


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported nextscale module) for every import in the file, at any depth."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            for a in node.names:  # `from nextscale import env` imports a module; `... import __version__` does not
                sub = f"{module}.{a.name}"
                is_module = any(p.exists() for p in (SRC / f"{sub.replace('.', '/')}.py", SRC / sub.replace(".", "/")))
                found.append((node.lineno, sub if is_module else module))
    return [(line, m) for line, m in found if m == "nextscale" or m.startswith("nextscale.")]


def test_layer_map_is_a_dag():
    for layer in MAY_IMPORT:
        assert layer not in _reachable(layer), f"layer {layer!r} can reach itself: the order has a circle"


def test_every_module_has_a_layer():
    for path in sorted(PACKAGE.rglob("*.py")):
        _layer(_module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_or_beside_it(path: Path):
    own = _layer(_module_name(path))
    allowed = {own} | _reachable(own)
    bad = [f"line {line}: {m} (layer {_layer(m)})" for line, m in _imports(path) if _layer(m) not in allowed]
    assert not bad, (
        f"{path.relative_to(SRC)} is in layer {own!r}, which may import only "
        f"{sorted(allowed)}; it imports " + "; ".join(bad)
    )


# ---- the family seam -------------------------------------------------------------------------------------------------
# The family-agnostic machinery talks to a model family only through ``engine.family`` (and the pipeline registry):
# adding a family is a folder per layer plus a registration, with no edit to these modules.
FAMILY_AGNOSTIC = [
    PACKAGE / "engine" / "engine.py",
    PACKAGE / "engine" / "scheduler.py",
    PACKAGE / "engine" / "family.py",
    *sorted((PACKAGE / "serve").glob("*.py")),
    PACKAGE / "cli" / "common.py",  # the CLI's model dispatch
    PACKAGE / "cli" / "serve.py",
    PACKAGE / "cli" / "generate.py",  # a family's own flags come from its pipeline class (sampling_options)
    PACKAGE / "cli" / "convert.py",  # convert and info: from_official and describe_model of the family's class
    PACKAGE / "pipelines" / "registry.py",
    PACKAGE / "pipelines" / "base.py",
    PACKAGE / "models" / "native.py",  # the folder format; each family's components are in native_<family>.py
]
# What belongs to one family: its engine folder, its pipeline, its models and official-file readers, and the
# acceleration plug-ins (whose plans are one family's).
FAMILY_SPECIFIC = (
    "nextscale.engine.var",
    "nextscale.engine.raster",
    "nextscale.pipelines.var",
    "nextscale.pipelines.raster",
    "nextscale.models.var",
    "nextscale.models.llamagen",
    "nextscale.models.llamagen_weights",
    "nextscale.models.weights",
    "nextscale.models.native_var",
    "nextscale.models.native_raster",
    "nextscale.models.native_infinity",
    "nextscale.engine.infinity",
    "nextscale.pipelines.infinity",
    "nextscale.models.infinity",
    "nextscale.models.infinity_scales",
    "nextscale.models.infinity_weights",
    "nextscale.models.tokenizers.bsq",
    "nextscale.models.tokenizers.msvq",
    "nextscale.models.tokenizers.vq",
    "nextscale.models.tokenizers.raster",
    "nextscale.accel",
)


def test_the_seam_modules_exist():
    assert all(p.is_file() for p in FAMILY_AGNOSTIC), [str(p) for p in FAMILY_AGNOSTIC if not p.is_file()]


@pytest.mark.parametrize("path", FAMILY_AGNOSTIC, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_family_agnostic_modules_import_no_family(path: Path):
    bad = [
        f"line {line}: {m}"
        for line, m in _imports(path)
        if any(m == f or m.startswith(f + ".") for f in FAMILY_SPECIFIC)
    ]
    assert not bad, f"{path.relative_to(SRC)} is family-agnostic but imports " + "; ".join(bad)
