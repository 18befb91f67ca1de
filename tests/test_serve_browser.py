"""The explorer page in a real browser: headless Chromium (Debian's package) via Playwright.

Uploads a photo, waits for the overlay, the photo beside it and the top-5 list, changes the
class, the colour map (and its legend) and the opacity, searches a class by name (an unlikely
one gets a note), compares methods and stops comparing, downloads (the JSON as shown, with
or without pictures), and saves a screenshot to tests/artifacts/serve.png. The page's own
drawing is checked pixel for pixel against the server's overlay PNG. A model that waits for
the test shows the rest: a result being recomputed is marked, the elapsed time runs, Cancel
and "Stop comparing" abort their requests (and the server drops the one still queued), and
a failed upload clears the result and disables the downloads.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import camlens
from camlens.io.samples import sample_image
from camlens.methods import METHODS, methods_for
from camlens.render import colormap_table
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

from serving import uvicorn_thread  # noqa: E402


@contextlib.contextmanager
def served(app):
    """``app`` on a free loopback port, in a thread; yields its URL."""
    with uvicorn_thread(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server_url(builtin_model):
    # Few perturbed channels keep Score-CAM and Ablation-CAM quick in "compare methods".
    with served(create_app([builtin_model], max_channels=8)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, server_url: str) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.outside = []  # requests that left this server (the page must work offline)
    page.errors = []
    page.add_init_script(RECORD_ABORTS)
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith((server_url, "data:", "blob:"))
            else (page.outside.append(route.request.url), route.abort())
        ),
    )
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.explains = []  # the explain requests the page made
    page.on(
        "request",
        lambda request: (
            page.explains.append(request) if request.url.endswith("/api/explain") else None
        ),
    )
    return page


#: Records in ``window.cancelled`` the URL of every fetch the page aborts (AbortController)
#: before its answer came. (Playwright's "requestfailed" event does not report every such
#: abort of a routed request, so the page's own fetch is watched.)
RECORD_ABORTS = """
window.cancelled = [];
const pageFetch = window.fetch;
window.fetch = (url, options = {}) => {
  let answered = false;
  const signal = options.signal;
  signal?.addEventListener("abort", () => { if (!answered) window.cancelled.push(String(url)); },
                          { once: true });
  return pageFetch(url, options).then((response) => { answered = true; return response; });
};
"""


def cancelled(page: Page) -> list[str]:
    """The URLs of the requests the page has cancelled so far (see ``RECORD_ABORTS``)."""
    return page.evaluate("window.cancelled")


@pytest.fixture(scope="module")
def page(browser, server_url):
    page = open_page(browser, server_url)
    yield page
    page.context.close()


def canvas_pixels(page: Page, selector: str) -> np.ndarray:
    url = page.eval_on_selector(selector, "canvas => canvas.toDataURL('image/png')")
    return png_pixels(url)


def assert_legend(page: Page, colormap: str) -> None:
    """The colour scale shows ``colormap``'s 256 colours from left (0) to right (maximum)."""
    assert page.get_attribute("#legend", "data-colormap") == colormap
    row = canvas_pixels(page, "#legend")[6]
    np.testing.assert_array_equal(row, colormap_table(colormap))


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
    # the methods that can explain the default CNN: all but the attention methods
    cnn_methods = methods_for(builtin_model.module)
    assert [m for m in METHODS if m not in cnn_methods] == ["rollout", "gradrollout"]
    assert page.locator("#method option").all_inner_texts() == cnn_methods

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
    # The photo itself beside it, and the colour scale of the map.
    np.testing.assert_array_equal(canvas_pixels(page, "#photo"), np.asarray(Image.open(photo)))
    assert_legend(page, "jet")
    assert not page.is_visible("#unlikely")  # p = 0.79

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
    assert_legend(page, "viridis")

    # Any class, searched by name; an unlikely one gets a note on how its map is scaled.
    page.fill("#class-query", "espresso")
    page.press("#class-query", "Enter")
    page.wait_for_selector("#overlay[data-class='967']")
    assert "espresso (967)" in page.inner_text("#caption")
    note = page.inner_text("#unlikely")
    assert page.is_visible("#unlikely") and note.startswith("This class is unlikely (p = ")
    assert "its map is scaled to its own maximum" in note

    # Back to the cat in the default colours; then every method side by side.
    page.select_option("#colormap", "jet")
    page.locator("#opacity").fill("0.5")
    top5.nth(0).click()
    page.wait_for_selector("#overlay[data-class='285']")
    assert not page.is_visible("#unlikely")
    page.click("#compare")
    assert page.get_attribute("#compare", "aria-pressed") == "true"
    for method in cnn_methods:
        page.wait_for_selector(f"#methods canvas[data-method='{method}'][data-class='285']")
    captions = page.locator("#methods figcaption").all_inner_texts()
    assert [c.split(" ")[0] for c in captions] == cnn_methods
    # "Compare methods" is a toggle: off, the grid goes and a new class runs one method only.
    page.click("#compare")
    assert page.get_attribute("#compare", "aria-pressed") == "false"
    assert page.locator("#methods canvas").count() == 0
    before = len(page.explains)
    page.fill("#class-query", "goldfish")
    page.press("#class-query", "Enter")
    page.wait_for_selector("#overlay[data-class='1']")
    assert len(page.explains) == before + 1 and page.locator("#methods canvas").count() == 0
    top5.nth(0).click()
    page.wait_for_selector("#overlay[data-class='285']")
    page.click("#compare")  # on again: the maps computed before come from the page's cache
    for method in cnn_methods:
        page.wait_for_selector(f"#methods canvas[data-method='{method}'][data-class='285']")

    # Downloads: the PNG is the picture on screen, the JSON what the screen shows (colours
    # included) with the maps' numbers, without pictures unless asked for.
    page.select_option("#colormap", "inferno")
    page.locator("#opacity").fill("0.8")
    with page.expect_download() as png_download:
        page.click("#download-png")
    with page.expect_download() as json_download:
        page.click("#download-json")
    saved = np.asarray(Image.open(png_download.value.path()).convert("RGB"))
    np.testing.assert_array_equal(saved, canvas_pixels(page, "#overlay"))
    assert png_download.value.suggested_filename == "chelsea_cam_c285.png"
    text = Path(json_download.value.path()).read_text()
    answer = json.loads(text)
    assert json_download.value.suggested_filename == "chelsea_cam_c285.json"
    assert (answer["colormap"], answer["alpha"], answer["box_shown"]) == ("inferno", 0.8, True)
    assert (answer["method"], answer["shown_class"], answer["image"]) == ("cam", 285, "chelsea.png")
    shown = {m["class"]: m for m in answer["maps"]}
    assert {285, 282, 281, 287, 728, 967, 1} <= set(shown)
    assert shown[285]["label"] == "Egyptian cat" and shown[285]["box"] == [0, 0, 415, 300]
    assert [p["class"] for p in answer["predictions"]] == [285, 282, 281, 287, 728]
    assert "data:" not in text and len(text) < 20_000
    page.check("#json-images")
    with page.expect_download() as pictures_download:
        page.click("#download-json")
    pictures = json.loads(Path(pictures_download.value.path()).read_text())
    np.testing.assert_array_equal(png_pixels(pictures["overlay"]), saved)
    assert pictures["maps"][0]["heatmap"].startswith("data:image/png;base64,")
    page.uncheck("#json-images")

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

    assert page.is_enabled("#download-png") and page.is_enabled("#download-json")

    # A failed upload: the previous result goes, and there is nothing to download.
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    page.set_input_files("#file-input", str(notes))
    page.wait_for_selector("#status.error")
    assert "it is not an image Pillow can decode" in page.inner_text("#status")
    assert_cleared(page)
    page.fill("#class-query", "unicorn")
    page.press("#class-query", "Enter")
    assert page.inner_text("#status") == 'No class is called "unicorn"; pick one from the list.'
    assert page.outside == [] and page.errors == []


def assert_cleared(page: Page) -> None:
    """No result on screen: no picture, caption or top 5, downloads and comparison off."""
    assert page.get_attribute("#overlay", "data-class") is None
    assert page.get_attribute("#photo", "data-class") is None
    assert "empty" in page.get_attribute("#result", "class")
    assert not canvas_pixels(page, "#overlay").any()  # cleared to transparent black
    assert page.inner_text("#caption") == "" and page.locator("#top5 button").count() == 0
    assert page.is_disabled("#download-png") and page.is_disabled("#download-json")
    assert page.is_disabled("#compare") and page.locator("#methods canvas").count() == 0


class GatedNet(nn.Module):
    """A tiny CAM network with six classes whose forward waits while ``gate`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 6)
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate.wait(timeout=120), "the test never opened the gate"
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def gated():
    """A server whose model waits for the test: (page, url, gate)."""
    net = GatedNet().eval()
    labels = ["red", "orange", "yellow", "green", "blue", "violet"]
    classifier = camlens.Classifier(module=net, labels=labels, input_size=(16, 16), name="gated")
    with served(create_app([classifier])) as url:
        yield url, net.gate


def queue_state(url: str) -> dict:
    return httpx.get(f"{url}/healthz").json()["queue"]


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def elapsed(page: Page) -> float:
    text = page.inner_text("#progress-text")
    match = re.fullmatch(r"(\d+\.\d) s elapsed", text)
    assert match, text
    return float(match.group(1))


def test_slow_answers_show_progress_and_can_be_cancelled(browser, gated, tmp_path):
    url, gate = gated
    page = open_page(browser, url)
    photo = tmp_path / "coffee.png"
    sample_image("coffee").save(photo)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector("#overlay[data-class]")
    shown = page.get_attribute("#overlay", "data-class")
    assert page.is_hidden("#progress") and page.is_enabled("#download-png")
    first_class, second_class = (int(b.get_attribute("data-class")) for b in
                                 page.locator("#top5 button").all()[:2])  # fmt: skip
    assert str(first_class) == shown
    try:
        # Another method, slow to come: the picture on screen is marked, downloads are off,
        # and the elapsed time runs beside a Cancel button.
        gate.clear()
        page.select_option("#method", "gradcam")
        page.wait_for_selector("#result.recomputing")
        assert page.is_visible(".main-figure .badge")
        assert page.is_disabled("#download-png") and page.is_disabled("#download-json")
        page.wait_for_selector("#progress:not([hidden])")
        wait_until(lambda: queue_state(url)["active"] == 1)  # running (waiting for the gate)
        start = elapsed(page)
        time.sleep(1.2)
        assert elapsed(page) >= start + 1.0
        # Another class meanwhile: the first request is cancelled, the next one waits.
        page.locator("#top5 button").nth(1).click()
        wait_until(lambda: len(cancelled(page)) == 1)
        wait_until(lambda: queue_state(url)["active"] == 2)
        # Cancel: the request is aborted, and the server drops it from its queue.
        page.click("#cancel")
        page.wait_for_selector("#progress", state="hidden")
        assert page.inner_text("#status").startswith("Cancelled.")
        assert "recomputing" not in page.get_attribute("#result", "class")
        assert page.get_attribute("#overlay", "data-class") == shown  # the old one, unmarked
        wait_until(lambda: len(cancelled(page)) == 2)
        wait_until(lambda: queue_state(url)["active"] == 1)  # only the running one is left
        finished = queue_state(url)["finished"]
        gate.set()
        wait_until(lambda: queue_state(url)["active"] == 0)
        assert queue_state(url)["finished"] == finished + 1  # the dropped one never ran

        # A result for gradcam again; then "Stop comparing" cancels the comparison's request.
        page.locator("#top5 button").nth(1).click()
        page.wait_for_selector(f"#overlay[data-class='{second_class}'][data-method='gradcam']")
        gate.clear()
        page.click("#compare")
        wait_until(lambda: queue_state(url)["active"] == 1)
        page.click("#compare")
        assert page.get_attribute("#compare", "aria-pressed") == "false"
        assert page.locator("#methods canvas").count() == 0
        wait_until(lambda: len(cancelled(page)) == 3)
    finally:
        gate.set()
    wait_until(lambda: queue_state(url)["active"] == 0)
    assert all(url.endswith("/api/explain") for url in cancelled(page))
    assert second_class != first_class
    assert page.outside == [] and page.errors == []
    page.context.close()
