"""Shared test fixtures and tiny random models of both families: VAR (``tiny_pair``) and raster LlamaGen
(``tiny_llamagen``, ``tiny_raster_pipe``); fixture paths, servers, deterministic settings. Plain helpers that are not
models (serving, class names, image folders) are in helpers.py.

At the top this module imports only configs and models: the fixtures that need a pipeline, the engine or the server
import them where they are used, so a module broken there fails the tests that use it, not the whole collection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from nextscale.config import VARConfig, VQVAEConfig
from nextscale.models.llamagen import LlamaGen, LlamaGenConfig
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR

if TYPE_CHECKING:
    from nextscale.pipelines.raster import LlamaGenPipeline

FIXTURES = Path(__file__).parent / "fixtures" / "var-official"


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with non-degenerate random values, like the official fixtures do (the
    official init makes blocks ~identity and leaves the VQ-VAE uninitialised)."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("class_emb.weight", "pos_1LC", "pos_start", "lvl_embed.weight")):
                p.copy_(randn(p.shape, 0.5))
            elif name == "quantize.embedding.weight":
                p.copy_(randn(p.shape, 1.0))
            elif "scale_mul" in name:
                p.copy_(torch.log(torch.tensor(4.0)) + randn(p.shape, 0.5))
            elif p.ndim >= 2:
                p.copy_(randn(p.shape, p[0].numel() ** -0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + randn(p.shape, 0.1))
            else:
                p.copy_(randn(p.shape, 0.1))
    return model.eval()


def tiny_vae_config(**kw) -> VQVAEConfig:
    base = dict(
        vocab_size=64,
        z_channels=8,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        patch_nums=(1, 2, 3, 4),
        using_sa=True,
        using_mid_sa=True,
    )
    base.update(kw)
    return VQVAEConfig(**base)


def tiny_var_config(**kw) -> VARConfig:
    base = dict(
        depth=2,
        embed_dim=64,
        num_heads=2,
        num_classes=5,
        vocab_size=64,
        z_channels=8,
        patch_nums=(1, 2, 3, 4),
        drop_path_rate=0.0,
    )
    base.update(kw)
    return VARConfig(**base)


def tiny_pair(seed: int = 0, var_kw: dict | None = None, vae_kw: dict | None = None) -> tuple[VAR, VQVAE]:
    torch.manual_seed(seed)
    vae_cfg = tiny_vae_config(**(vae_kw or {}))
    var_cfg = tiny_var_config(
        patch_nums=vae_cfg.patch_nums, vocab_size=vae_cfg.vocab_size, z_channels=vae_cfg.z_channels, **(var_kw or {})
    )
    return randomize_(VAR(var_cfg), seed), randomize_(VQVAE(vae_cfg), seed + 1)


# ---- tiny raster (LlamaGen) models ---------------------------------------------------------------------------------
def randomize_llamagen_(model: LlamaGen, seed: int) -> LlamaGen:
    """Non-degenerate weights like the official fixtures' (the official init zeroes the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.startswith(("cls_embedding", "tok_embeddings")):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                std = (9 if name == "output.weight" else 1) / p.shape[1]
                p.copy_(std**0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_llamagen(seed: int = 0, **kw) -> LlamaGen:
    """dim 32, 2 layers, 512 codes, 6x6 grid (image 96 / downsample 16) unless overridden: 36 tokens per image."""
    base = dict(dim=32, n_layer=2, n_head=2, vocab_size=512, num_classes=10, image_size=96, downsample=16)
    base.update(kw)
    return randomize_llamagen_(LlamaGen(LlamaGenConfig(**base)), seed)


RASTER_GRID = 4  # tokens per side of tiny_raster_pipe's images


def single_scale_vae_config(grid: int = RASTER_GRID, **kw) -> VQVAEConfig:
    """A plain VQ-VAE (a raster tokenizer): ``patch_nums=(grid,)``, one (shared) Phi."""
    return tiny_vae_config(patch_nums=(grid,), share_quant_resi=1, **kw)


def tiny_raster_pipe(seed: int = 4, **gpt_kw) -> LlamaGenPipeline:
    """A 4x4-token raster model (10 classes, 64 codes, 8x8 images) with nextscale's single-scale VQ-VAE as its
    tokenizer."""
    from nextscale.pipelines.raster import LlamaGenPipeline

    vae = randomize_(VQVAE(single_scale_vae_config()), 5)
    image_size = RASTER_GRID * vae.cfg.downsample
    return LlamaGenPipeline(
        tiny_llamagen(seed, vocab_size=vae.cfg.vocab_size, image_size=image_size, downsample=2, **gpt_kw), vae
    )


@pytest.fixture(scope="session", autouse=True)
def _private_nextscale_cache(tmp_path_factory):
    """The suite never writes to the user's ``~/.cache/nextscale``: every test (and every command it starts, which
    inherits the environment) uses a cache folder of its session. A test that needs its own sets the variable."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEXTSCALE_CACHE", str(tmp_path_factory.mktemp("nextscale-cache")))
        yield


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "var.pth").is_file():
        pytest.fail(f"official fixtures missing under {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def official_pair(fixtures_dir):
    from nextscale.models.weights import load_official_pair

    return load_official_pair(fixtures_dir / "var.pth", fixtures_dir / "vae.pth")


@pytest.fixture
def tiny():
    return tiny_pair(0)


# ---- servers -------------------------------------------------------------------------------------------------------
@pytest.fixture
def live_server():
    """The API over a tiny VAR model (the first 5 Fashion-MNIST classes) on a real uvicorn server, its KV cache 8
    tokens; yields (url, app)."""
    from nextscale.engine.engine import EngineConfig
    from nextscale.engine.scheduler import SchedulerConfig

    from .helpers import FMNIST, live, var_app

    var, vae = tiny_pair(5, dict(class_names=FMNIST[:5]))
    app = var_app(var, vae, engine_cfg=EngineConfig(scheduler=SchedulerConfig(max_tokens=8), max_images_per_request=4))
    with live(app) as url:
        yield url, app


@pytest.fixture
def serve_cli_env(monkeypatch):
    """`nextscale serve` in this process: on glibc without tcmalloc (never re-executing pytest), the server stubbed:
    each run appends (app, drain_timeout, the bound address). Give ``--port 0``: the socket is bound for real."""
    from nextscale import allocator
    from nextscale.serve import server as serve_runner

    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "system")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(allocator, "tune_glibc", lambda: True)
    served: list = []
    monkeypatch.setattr(
        serve_runner,
        "serve",
        lambda app, sock, drain_timeout: served.append((app, drain_timeout, sock.getsockname())) or 0,
    )
    return served


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): a
    second thread only adds synchronisation there, and on a shared 2-core CPU it oversubscribes (measured ~10x
    slower under load). The LlamaGen fixtures were also made with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_LOGGER_AT_START = (
    logging.getLogger("nextscale").handlers[:],
    logging.getLogger("nextscale").level,
    logging.getLogger("nextscale").propagate,
)


def _reset_nextscale_logger() -> None:
    logger = logging.getLogger("nextscale")
    logger.handlers[:] = _LOGGER_AT_START[0]
    logger.setLevel(_LOGGER_AT_START[1])
    logger.propagate, logger.disabled = _LOGGER_AT_START[2], False


@pytest.fixture(autouse=True)
def _nextscale_logging_reset():
    """Every test starts and ends with the "nextscale" logger as the package left it: anything that changed it (the
    training runner lowers its level; a module- or session-scoped fixture may run the CLI) cannot make a
    log-capturing test depend on which tests ran before it."""
    _reset_nextscale_logger()
    yield
    _reset_nextscale_logger()
