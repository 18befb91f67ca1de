"""The explorer page in a real browser: headless Chromium (Debian's package) via Playwright.

Uploads a photo, waits for the overlay and the top-5 list, changes the class, the colour
map and the opacity, searches a class by name, compares methods, downloads, and saves a
screenshot to tests/artifacts/serve.png. The page's own drawing is checked pixel for pixel
against the server's overlay PNG.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from camlens.io.samples import sample_image
from camlens.methods import METHODS
from camlens.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
TIMEOUT_MS = 120_000

if not CHROMIUM.exists():
    pytest.skip(
        f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install chromium) "
        "to run the browser test",
        allow_module_level=True,
    )

from playwright.sync_api import Page, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def server_url(builtin_model):
    # Few perturbed channels keep Score-CAM and Ablation-CAM quick in "compare methods".
    app = create_app([builtin_model], max_channels=8)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def page(server_url):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(
            viewport={"width": 1280, "height": 860}, accept_downloads=True
        )
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.outside = []  # requests that left this server (the page must work offline)
        page.errors = []
        page.route(
            "**/*",
            lambda route: (
                route.continue_()
                if route.request.url.startswith((server_url, "data:", "blob:"))
                else (page.outside.append(route.request.url), route.abort())
            ),
        )
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        yield page
        browser.close()


def canvas_pixels(page: Page, selector: str) -> np.ndarray:
    url = page.eval_on_selector(selector, "canvas => canvas.toDataURL('image/png')")
    return png_pixels(url)


def png_pixels(data_url: str) -> np.ndarray:
    data = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def server_overlay(server_url: str, photo: Path, target: int, colormap: str, alpha: str):
    response = httpx.post(
        f"{server_url}/api/explain",
        files={"file": (photo.name, photo.read_bytes(), "image/png")},
        data={"target": str(target), "colormap": colormap, "alpha": alpha},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return png_pixels(response.json()["maps"][0]["overlay"])


def test_explore_a_photo_in_the_browser(page, server_url, builtin_model, tmp_path):
    photo = tmp_path / "chelsea.png"
    sample_image("chelsea").save(photo)
    page.goto(server_url)
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#method option").all_inner_texts() == list(METHODS)

    # Upload: the overlay of the top class and the top-5 list appear.
    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector("#overlay[data-class='285']")
    top5 = page.locator("#top5 button")
    assert top5.count() == 5
    labels = [text.split("\n")[0] for text in top5.all_inner_texts()]
    assert labels == ["Egyptian cat", "tiger cat", "tabby", "lynx", "plastic bag"]
    assert "Egyptian cat (285)" in page.inner_text("#caption")
    first = canvas_pixels(page, "#overlay")
    # The page draws exactly what the server renders (same colour table, blend and box).
    np.testing.assert_array_equal(first, server_overlay(server_url, photo, 285, "jet", "0.5"))

    # Another class from the top-5 list: a different overlay.
    top5.nth(1).click()
    page.wait_for_selector("#overlay[data-class='282']")
    assert "tiger cat (282)" in page.inner_text("#caption")
    second = canvas_pixels(page, "#overlay")
    assert np.abs(second.astype(int) - first.astype(int)).mean() > 1.0

    # Colour map and opacity redraw in the page, still equal to the server's rendering.
    page.select_option("#colormap", "viridis")
    page.locator("#opacity").fill("0.8")
    assert page.inner_text("#opacity-value") == "0.80"
    np.testing.assert_array_equal(
        canvas_pixels(page, "#overlay"), server_overlay(server_url, photo, 282, "viridis", "0.8")
    )

    # Any class, searched by name.
    page.fill("#class-query", "espresso")
    page.press("#class-query", "Enter")
    page.wait_for_selector("#overlay[data-class='967']")
    assert "espresso (967)" in page.inner_text("#caption")

    # Back to the cat in the default colours; then every method side by side.
    page.select_option("#colormap", "jet")
    page.locator("#opacity").fill("0.5")
    top5.nth(0).click()
    page.wait_for_selector("#overlay[data-class='285']")
    page.click("#compare")
    for method in METHODS:
        page.wait_for_selector(f"#methods canvas[data-method='{method}'][data-class='285']")
    captions = page.locator("#methods figcaption").all_inner_texts()
    assert [c.split(" ")[0] for c in captions] == list(METHODS)

    # Downloads: the PNG is the picture on screen, the JSON the API's answer.
    with page.expect_download() as png_download:
        page.click("#download-png")
    with page.expect_download() as json_download:
        page.click("#download-json")
    saved = np.asarray(Image.open(png_download.value.path()).convert("RGB"))
    np.testing.assert_array_equal(saved, canvas_pixels(page, "#overlay"))
    assert png_download.value.suggested_filename == "chelsea_cam_c285.png"
    answer = json.loads(Path(json_download.value.path()).read_text())
    assert answer["method"] == "cam" and 285 in [m["class"] for m in answer["maps"]]

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)
    assert page.outside == [] and page.errors == []
    assert "error" not in page.get_attribute("#status", "class")


def test_drop_a_photo_pick_a_sample_and_see_errors(page, server_url, tmp_path):
    page.goto(server_url)
    page.wait_for_selector("body[data-ready=true]")
    coffee = io.BytesIO()
    sample_image("coffee").save(coffee, format="PNG")
    dropped = page.evaluate_handle(
        """base64 => {
            const bytes = Uint8Array.from(atob(base64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "coffee.png", { type: "image/png" }));
            return transfer;
        }""",
        base64.b64encode(coffee.getvalue()).decode("ascii"),
    )
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dropped})
    page.wait_for_selector("#overlay[data-class='967']")  # espresso
    assert page.inner_text("#status") == "Image: coffee.png"

    page.select_option("#sample", "chelsea")
    page.click("#use-sample")
    page.wait_for_selector("#overlay[data-class='285']")
    assert page.inner_text("#status") == "Sample: chelsea"

    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    page.set_input_files("#file-input", str(notes))
    page.wait_for_selector("#status.error")
    assert "it is not an image Pillow can decode" in page.inner_text("#status")
    page.fill("#class-query", "unicorn")
    page.press("#class-query", "Enter")
    assert page.inner_text("#status") == 'No class is called "unicorn"; pick one from the list.'
    assert page.outside == [] and page.errors == []
