"""Plain helpers shared by test modules: class names, a synthetic image folder to train on, and the HTTP API over a
model of either family (build it, serve it for real, read its images, wait for a server-side condition).

The tiny models and the fixtures are in conftest.py; this module imports nothing from it, so conftest can use it.
No test module imports another: what two of them share lives here or in conftest.py. The app builders import the
engine and the server where they are called, so a module broken there fails the serving tests only.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

if TYPE_CHECKING:
    from nextscale.models.tokenizers.msvq import VQVAE
    from nextscale.models.var import VAR
    from nextscale.pipelines.raster import LlamaGenPipeline

# Fashion-MNIST's classes in label order (the bundled demo models' class names).
FMNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# ---- a training set ------------------------------------------------------------------------------------------------
IMAGE_FOLDER_CLASSES = ("disc", "bars", "checker")


def make_image_folder(root: Path, per_class: int = 24, size: int = 20) -> Path:
    """Three visually distinct classes of small RGB images (any size works: the loader resizes and crops)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c, name in enumerate(IMAGE_FOLDER_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            phase = rng.random()
            if c == 0:
                m = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < (0.2 + 0.1 * phase) ** 2).astype(float)
            elif c == 1:
                m = (np.sin((xx + phase) * 12) > 0).astype(float)
            else:
                m = ((np.floor(xx * 4 + phase) + np.floor(yy * 4)) % 2).astype(float)
            rgb = np.stack([m, 1 - m, 0.5 * np.ones_like(m)], -1) * 255
            Image.fromarray(rgb.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


# ---- the HTTP API ----------------------------------------------------------------------------------------------------
def var_app(var: VAR, vae: VQVAE, **kw) -> FastAPI:
    """The API over a VAR model and its VQ-VAE; ``kw``: ``engine_cfg`` and ServerConfig fields."""
    from nextscale.engine.engine import Engine, EngineConfig
    from nextscale.engine.var.family import VARFamily
    from nextscale.serve.api import ServerConfig, create_app

    engine = Engine(VARFamily(var, vae), kw.pop("engine_cfg", EngineConfig(max_images_per_request=4)))
    return create_app(engine, ServerConfig(model_name="tiny", **kw))


def raster_app(pipe: LlamaGenPipeline, **kw) -> FastAPI:
    """The API over a raster (LlamaGen) pipeline's model, with its class names and sampling defaults; ``kw``:
    ``engine_cfg``, ``plans`` and ServerConfig fields."""
    from nextscale.engine.engine import Engine, EngineConfig
    from nextscale.serve.api import ServerConfig, create_app

    engine = Engine(pipe.engine_family(), kw.pop("engine_cfg", EngineConfig(max_images_per_request=4)))
    plans = kw.pop("plans", None)
    cfg = ServerConfig(model_name="tiny-raster", **kw)
    return create_app(engine, cfg, plans=plans)


INFINITY_FIXTURES = Path(__file__).parent / "fixtures" / "infinity-official"


def tiny_infinity_pipe():
    """The official-format Infinity fixture model (2 blocks, 16 bits, a tiny T5) at its 256 px budget (7 scales)."""
    from nextscale.pipelines.infinity import InfinityPipeline

    fx = INFINITY_FIXTURES
    pipe = InfinityPipeline.from_official(
        fx / "infinity.pth", fx / "vae.pth", text_encoder=str(fx / "text_encoder"), pn="0.06M"
    )
    return pipe


def infinity_app(pipe, **kw) -> FastAPI:
    """The API over an Infinity pipeline's model (prompts, its templates); ``kw``: ``engine_cfg`` and ServerConfig
    fields."""
    from nextscale.engine.engine import Engine, EngineConfig
    from nextscale.serve.api import ServerConfig, create_app
    from nextscale.serve.config import quality_plans

    engine = Engine(pipe.engine_family(), kw.pop("engine_cfg", EngineConfig(max_images_per_request=2)))
    return create_app(engine, ServerConfig(model_name="tiny-t2i", **kw), plans=quality_plans(pipe, None))


def decode(b64: str) -> np.ndarray:
    """A response's ``b64_json`` image as an array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def wait_until(condition: Callable[[], object], timeout: float = 120, what: str = "the condition") -> None:
    """Wait for a condition another thread makes true; ``timeout`` only ends a test that would hang (it is no margin
    the test relies on: on a loaded machine the condition just comes later)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@contextmanager
def live(app) -> Iterator[str]:
    """A real uvicorn server in a thread (client disconnects need a real socket); yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: ready(f"http://127.0.0.1:{port}"), what="the server's /ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def _fashion_installed() -> bool:
    from nextscale.data import builtin
    from nextscale.errors import InvalidInputError

    try:
        builtin.find_fashion_mnist()
    except InvalidInputError:
        return False
    return True


# Tests that read the real Fashion-MNIST files (CI installs them; `.ci/run`).
needs_fashion = pytest.mark.skipif(
    not _fashion_installed(),
    reason="Debian package dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist)",
)
