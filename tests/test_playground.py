"""The playground page end to end in real headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import base64
import json
import os
import shutil

import pytest

from .conftest import RASTER_GRID, tiny_raster_pipe
from .helpers import infinity_app, live, raster_app, tiny_infinity_pipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without these, Chromium tries to reach Google services and the sandbox needs privileges CI lacks.
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page():
    if CHROMIUM is None:
        need = "Debian's chromium is not installed: apt-get install chromium (.ci/run installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(need)  # CI installs the browser: a missing one there is a broken setup, not a skip
        pytest.skip(need)
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page()
        yield pg
        browser.close()


def test_pick_a_class_watch_it_sharpen_and_download(live_server, page, tmp_path):
    url, _ = live_server
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    sent: list[dict] = []
    page.on("request", lambda rq: sent.append(json.loads(rq.post_data)) if rq.method == "POST" else None)
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#class option').length === 5")
    # the API's quality levels, each saying what it runs on this model (the test server's are all exact)
    options = page.eval_on_selector_all("#quality option", "els => els.map(e => [e.value, e.textContent])")
    assert [v for v, _ in options] == ["auto", "high", "medium", "low"]
    assert dict(options)["high"] == "high · exact"
    page.select_option("#quality", "high")
    assert page.inner_text("#quality-note") == "runs exact"
    page.select_option("#class", "Dress")
    page.fill("#cfg", "3")
    page.fill("#seed", "42")
    page.fill("#count", "2")
    page.click("#generate")
    # coarse-to-fine: the preview captions walk through the scales before the images land in the gallery
    page.wait_for_function("document.querySelectorAll('#gallery figure.item').length === 2", timeout=60_000)
    captions = page.locator("#previews figcaption").all_inner_texts()
    assert captions == ["scale 4/4", "scale 4/4"]
    assert "done in" in page.inner_text("#status") and "quality high: exact" in page.inner_text("#status")
    assert [b["quality"] for b in sent] == ["high"]
    assert "4 scales" in page.inner_text("#model")
    sizes = page.eval_on_selector_all("#gallery img", "els => els.map(e => [e.naturalWidth, e.complete])")
    assert sizes == [[8, True], [8, True]]
    assert page.inner_text("#gallery figure.item figcaption >> nth=0").startswith("Dress · seed 42")
    with page.expect_download() as dl:
        page.click("#gallery a.download >> nth=0")
    path = tmp_path / dl.value.suggested_filename
    dl.value.save_as(path)
    assert path.name.startswith("dress-seed42-") and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same request through the API gives the same image (the page shows what the API returns)
    import httpx

    api = httpx.post(url + "/v1/images/generations", json={"prompt": "Dress", "n": 2, "seed": 42, "cfg": 3}).json()
    shown = page.eval_on_selector_all("#gallery img", "els => els.map(e => e.src.split(',')[1])")
    assert sorted(shown) == sorted(d["b64_json"] for d in api["data"])
    assert base64.b64decode(shown[0])[:4] == b"\x89PNG"
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert not console_errors, f"console errors: {console_errors}"


def test_errors_are_shown_not_swallowed(live_server, page):
    url, _ = live_server
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#class option').length === 5")
    page.fill("#count", "9")  # more than the server allows
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').classList.contains('error')", timeout=30_000)
    assert "n=9 is too large" in page.inner_text("#status")


def test_a_raster_model_is_shown_row_by_row(page):
    """A raster model's previews are rows of its token grid, not scales; /v1/models says which."""
    pipe = tiny_raster_pipe()
    pipe.set_class_names(tuple(f"class-{i}" for i in range(10)))
    with live(raster_app(pipe)) as url:
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#class option').length === 10")
        assert f"{RASTER_GRID} rows" in page.inner_text("#model") and page.inner_text("#progress-title") == "Row by row"
        page.fill("#count", "1")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery figure.item').length === 1", timeout=60_000)
        assert page.locator("#previews figcaption").all_inner_texts() == [f"row {RASTER_GRID}/{RASTER_GRID}"]
        assert "scale" not in page.inner_text("#status")


def test_a_text_to_image_model_gets_a_prompt_box(page):
    """No class list: a prompt and a negative prompt; the model's own sampling defaults hold unless a control moves."""
    with live(infinity_app(tiny_infinity_pipe())) as url:
        page.goto(url + "/")
        page.wait_for_function("!document.querySelector('#prompt-box').hidden")
        assert page.locator("#class-box").is_hidden() and "text-to-image" in page.inner_text("#model")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').classList.contains('error')")
        assert "write a prompt first" in page.inner_text("#status")
        page.fill("#prompt", "a red fox sitting in the snow")
        page.fill("#negative", "blurry, dark")
        page.fill("#count", "1")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery figure.item').length === 1", timeout=60_000)
        assert page.locator("#previews figcaption").all_inner_texts() == ["scale 7/7"]
        assert "a red fox sitting in the snow" in page.inner_text("#gallery")
