"""Shared test helpers: tiny random models, fixture paths, deterministic settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from nextscale.config import VARConfig, VQVAEConfig
from nextscale.models.tokenizers.msvq import VQVAE
from nextscale.models.var import VAR

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
