"""The web app with a detector or a segmenter: ``task``, ``objects`` and a map per object.

A fake detector (a 1x1 convolution, then each channel kept only inside one fixed box; a
detection's score is the sigmoid of its channel's mean inside its box) makes every number
checkable: its boxes, its scores, and Grad-CAM maps that are zero outside each box.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

import camlens
from camlens.dense import explain_dense
from camlens.localize import scale_box
from camlens.serve import create_app
from camlens.serve.jobs import DISPLAY_MAX_SIDE

INPUT = 32
BOXES = ((4, 4, 16, 16), (18, 10, 30, 28))  # input pixels, [x0, y0, x1, y1) each
CLASSES = (1, 2)
LABELS = ["background", "cat", "dog"]


class BoxMask(nn.Module):
    """Channel k of the features kept inside box k only."""

    def __init__(self) -> None:
        super().__init__()
        masks = torch.zeros((len(BOXES), INPUT, INPUT))
        for k, (x0, y0, x1, y1) in enumerate(BOXES):
            masks[k, y0:y1, x0:x1] = 1.0
        self.register_buffer("masks", masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.masks


class FakeDetector(nn.Module):
    """torchvision's detector interface: a list of (3, H, W) images in, a list of dicts with
    ``boxes``, ``labels`` and ``scores`` out; score k = sigmoid(mean of channel k in box k),
    differentiable through ``backbone`` (whose last stage is the default layer)."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, len(BOXES), 1)
        with torch.no_grad():
            conv.weight.copy_(
                torch.tensor([[[[0.05]], [[0.1]], [[0.0]]], [[[0.0]], [[-0.05]], [[0.1]]]])
            )
            conv.bias.fill_(1.0)  # the features stay positive on any normalised image
        self.backbone = nn.Sequential(conv, BoxMask())

    def forward(self, images) -> list[dict[str, torch.Tensor]]:
        results = []
        for image in images:
            features = self.backbone(image[None])[0]
            scores = torch.stack(
                [
                    features[k, y0:y1, x0:x1].mean().sigmoid()
                    for k, (x0, y0, x1, y1) in enumerate(BOXES)
                ]
            )
            results.append(
                {
                    "boxes": torch.tensor(BOXES, dtype=torch.float32),
                    "labels": torch.tensor(CLASSES),
                    "scores": scores,
                }
            )
        return results


def detector() -> camlens.Classifier:
    return camlens.Classifier(
        module=FakeDetector().eval(), labels=LABELS, input_size=(INPUT, INPUT), name="fakedet"
    )


def segmenter() -> camlens.Classifier:
    torch.manual_seed(3)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    return camlens.load_model(module, labels=["background", "sky", "tree"], input_size=INPUT)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny_classifier() -> camlens.Classifier:
    return camlens.Classifier(
        module=TinyNet().eval(), labels=["red", "green", "blue"], input_size=(16, 16), name="tiny"
    )


def local_client(app) -> TestClient:
    return TestClient(app, base_url="http://localhost")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))))


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def post(client: TestClient, image: Image.Image, **data) -> dict:
    files = {"file": ("photo.png", png_bytes(image), "image/png")}
    response = client.post("/api/explain", files=files, data=data)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def client():
    with local_client(create_app([detector(), segmenter(), tiny_classifier()])) as test_client:
        yield test_client


def test_a_detector_answers_its_detections_with_their_boxes_scores_and_maps(client):
    image = photo(96, 64)
    body = post(client, image, model="fakedet")  # the page sends the server's default "cam"
    assert body["task"] == "detection"
    assert body["method"] == "gradcam" and body["layer"] == "backbone.1"
    assert body["predictions"] == [] and body["maps"] == []
    assert body["size"] == [96, 64] and body["display"]["size"] == [96, 64]
    classifier = detector()
    x = classifier.preprocess(image)
    with torch.no_grad():
        expected = classifier.module(list(x))[0]["scores"].tolist()
    objects = body["objects"]
    assert [o["index"] for o in objects] == [0, 1]
    assert [o["class"] for o in objects] == list(CLASSES)
    assert [o["label"] for o in objects] == ["cat", "dog"]
    assert [o["score"] for o in objects] == pytest.approx(expected, abs=1e-6)
    for o, box in zip(objects, BOXES, strict=True):
        assert o["box"] == list(scale_box(box, (INPUT, INPUT), (96, 64)))
        assert o["display_box"] == o["box"]  # the display is the original here
        assert o["pixels"] is None and o["mask"] is None
        heat = decode_data_url(o["heatmap"])
        assert heat.shape == (64, 96) and heat.dtype == np.uint8
        x0, y0, x1, y1 = o["box"]
        inside = np.zeros_like(heat, dtype=bool)
        inside[y0:y1, x0:x1] = True
        row, column = np.unravel_index(np.argmax(heat), heat.shape)
        assert inside[row, column], "the map peaks outside its detection's box"
        assert heat[inside].mean() > 4 * max(1.0, heat[~inside].mean())
        picture = decode_data_url(o["overlay"])
        assert picture.shape == (64, 96, 3)
        assert (picture[y0, x0:x1] == 255).all()  # the box's top edge, drawn in white


def test_the_score_threshold_leaves_detections_out(client):
    image = photo(40, 40, seed=1)
    scores = [o["score"] for o in post(client, image, model="fakedet")["objects"]]
    between = (min(scores) + max(scores)) / 2
    assert min(scores) < between < max(scores)
    kept = post(client, image, model="fakedet", score_threshold=str(between))["objects"]
    assert [o["score"] for o in kept] == [max(scores)]
    none = post(client, image, model="fakedet", score_threshold="1.0")
    assert none["task"] == "detection" and none["objects"] == []
    bad = client.post(
        "/api/explain", data={"sample": "chelsea", "model": "fakedet", "score_threshold": "2"}
    )
    assert bad.status_code == 422


def test_a_segmenter_answers_its_class_regions_like_the_library(client):
    image = photo(48, 32, seed=2)
    body = post(client, image, model="Sequential", method="gradcam")  # load_model's name
    assert body["task"] == "segmentation"
    classifier = segmenter()
    reference = explain_dense(classifier, classifier.preprocess(image), task="segmentation")
    assert reference.objects, "the seeded segmenter predicts no class but the background"
    objects = body["objects"]
    assert [o["class"] for o in objects] == [o["class"] for o in reference.objects]
    assert [o["label"] for o in objects] == [o["label"] for o in reference.objects]
    for o, r, region in zip(objects, reference.objects, reference.regions, strict=True):
        assert o["pixels"] == r["pixels"] and o["mean_prob"] == r["mean_prob"]
        assert o["score"] == pytest.approx(r["score"], abs=1e-4)
        assert o["fraction"] == pytest.approx(r["pixels"] / INPUT**2)
        assert o["box"] is None and o["region"] == "predicted"
        mask = decode_data_url(o["mask"])
        assert mask.shape == (32, 48) and set(np.unique(mask)) <= {0, 255}
        resized = Image.fromarray(region.astype(np.uint8) * 255).resize((48, 32), 0)
        assert np.array_equal(mask, np.asarray(resized))
        assert decode_data_url(o["heatmap"]).shape == (32, 48)


def test_cam_is_refused_for_a_detector_unless_it_is_the_servers_default():
    with local_client(create_app([detector()], method="gradcam")) as client:
        models = client.get("/api/models").json()
        assert models["default_task"] == "detection" and models["tasks"] == {"fakedet": "detection"}
        assert "cam" not in models["methods"] and models["default_method"] == "gradcam"
        files = {"file": ("p.png", png_bytes(photo(32, 32)), "image/png")}
        refused = client.post("/api/explain", files=files, data={"method": "cam"})
        assert refused.status_code == 400
        assert "cam needs a classifier's global average pooling" in refused.json()["detail"]
        eigen = client.post("/api/explain", files=files, data={"method": "eigencam"})
        assert eigen.status_code == 200 and eigen.json()["method"] == "eigencam"


def test_the_models_list_reports_tasks(client):
    body = client.get("/api/models").json()
    assert body["default_task"] == "detection"
    assert body["tasks"]["fakedet"] == "detection"
    assert "cam" not in body["methods"] and body["default_method"] == "gradcam"


def test_large_photos_are_shown_at_display_size_with_boxes_in_original_pixels(client):
    image = photo(1280, 960, seed=4)
    body = post(client, image, model="fakedet")
    assert body["size"] == [1280, 960]
    assert body["display"]["size"] == [DISPLAY_MAX_SIDE, 480]
    for o, box in zip(body["objects"], BOXES, strict=True):
        assert o["box"] == list(scale_box(box, (INPUT, INPUT), (1280, 960)))
        assert o["display_box"] == list(scale_box(box, (INPUT, INPUT), (DISPLAY_MAX_SIDE, 480)))
        assert decode_data_url(o["heatmap"]).shape == (480, DISPLAY_MAX_SIDE)


def test_a_classifier_beside_them_answers_as_before(client):
    image = photo(20, 12, seed=5)
    mixed = post(client, image, model="tiny", target="top2")
    with local_client(create_app([tiny_classifier()])) as alone:
        plain = post(alone, image, target="top2")
        assert alone.get("/api/models").json()["default_task"] == "classification"
    assert mixed == plain
    assert mixed["task"] == "classification" and mixed["objects"] == []
    assert [m["class"] for m in mixed["maps"]] == [p["class"] for p in mixed["predictions"][:2]]


def test_the_page_lists_detections_and_segments_and_draws_their_maps(tmp_path):
    """In headless Chromium (skipped without it): the objects list, each object's map drawn
    by the page exactly as the server's overlay (the box, or the region's outline)."""
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    playwright_api = pytest.importorskip("playwright.sync_api")
    from serving import uvicorn_thread

    image = tmp_path / "noise.png"
    photo(96, 64, seed=6).save(image)
    with (
        uvicorn_thread(create_app([detector(), segmenter()])) as port,
        playwright_api.sync_playwright() as playwright,
    ):
        url = f"http://127.0.0.1:{port}"
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        methods = page.locator("#method option").all_inner_texts()
        assert "cam" not in methods and page.input_value("#method") == "gradcam"

        page.set_input_files("#file-input", str(image))
        page.wait_for_selector("#overlay[data-class='o0']")
        assert page.text_content("#list-title") == "Detections"
        assert page.is_visible("#score-threshold")
        items = page.locator("#top5 button").all_inner_texts()
        server = server_answer(url, image, "fakedet")
        assert [text.split("\n")[0] for text in items] == ["cat", "dog"]
        for text, found in zip(items, server["objects"], strict=True):
            assert f"[{', '.join(map(str, found['box']))}] px" in text
        assert "cat (1)" in page.inner_text("#caption")
        assert_page_draws(page, server["objects"][0]["overlay"])
        page.locator("#top5 button").nth(1).click()
        page.wait_for_selector("#overlay[data-class='o1']")
        assert "dog (2)" in page.inner_text("#caption")
        assert_page_draws(page, server["objects"][1]["overlay"])

        page.select_option("#model", "Sequential")
        segments = server_answer(url, image, "Sequential")["objects"]
        first = f"{segments[0]['label']} ({segments[0]['class']})"
        wait_until(lambda: first in page.inner_text("#caption"))  # (the CSP forbids eval)
        assert page.text_content("#list-title") == "Segments"
        assert page.get_attribute("#overlay", "data-class") == "o0"
        assert not page.is_visible("#score-threshold")
        labels = [t.split("\n")[0] for t in page.locator("#top5 button").all_inner_texts()]
        assert labels == [o["label"] for o in segments]
        assert_page_draws(page, segments[0]["overlay"])
        assert errors == []
        browser.close()


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run"]


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def server_answer(url: str, image: Path, model: str) -> dict:
    files = {"file": (image.name, image.read_bytes(), "image/png")}
    data = {"model": model, "method": "gradcam"}
    response = httpx.post(f"{url}/api/explain", files=files, data=data, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def assert_page_draws(page, overlay_url: str) -> None:
    drawn = page.eval_on_selector("#overlay", "canvas => canvas.toDataURL('image/png')")
    np.testing.assert_array_equal(
        decode_data_url(drawn)[..., :3], decode_data_url(overlay_url)[..., :3]
    )
