"""The web app's JSON API: every endpoint, every error, the limits, and parity with the library."""

from __future__ import annotations

import base64
import io
import re
import sys
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

import camlens
from camlens.cli import main
from camlens.io.samples import SAMPLES, sample_image
from camlens.methods import METHODS, ScoreCAM
from camlens.render import colorize, colormap_indices, colormap_table, overlay
from camlens.serve import create_app
from camlens.serve.jobs import PAGE_COLORMAPS, fit_within
from camlens.serve.limits import BodySizeLimit
from camlens.serve.uploads import decode_upload
from image_corpus import bilevel_png_bytes


class TinyNet(nn.Module):
    """conv 3->4 -> ReLU -> global average pooling -> fc 4->3: a CAM network in microseconds.

    ``forward`` waits while ``gate`` is cleared, so a test can hold a worker busy.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def local_client(app, **options) -> TestClient:
    """A test client addressed as ``localhost`` (the server refuses TestClient's default
    Host, ``testserver``: see ``camlens.serve.guard``)."""
    return TestClient(app, base_url="http://localhost", **options)


def tiny_classifier() -> camlens.Classifier:
    return camlens.Classifier(
        module=TinyNet().eval(), labels=["red", "green", "blue"], input_size=(16, 16), name="tiny"
    )


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def client(builtin_model):
    with local_client(create_app([builtin_model, tiny_classifier()])) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def chelsea_png() -> bytes:
    return png_bytes(sample_image("chelsea"))


def post_tiny(client, data=None, files=None):
    fields = {"model": "tiny", **(data or {})}
    if files is None and "sample" not in fields:
        files = {"file": ("noise.png", png_bytes(noise_image(20, 12)), "image/png")}
    return client.post("/api/explain", data=fields, files=files)


# --- what the server offers -------------------------------------------------------------


def test_models_lists_models_methods_colormaps_and_samples(client):
    body = client.get("/api/models").json()
    assert body["models"] == ["efficientnet_lite0", "tiny"]
    assert body["default_model"] == "efficientnet_lite0"
    # every method that can explain the default CNN: all but the attention methods
    assert body["methods"] == [m for m in METHODS if m not in ("rollout", "gradrollout")]
    assert body["colormaps"] == list(PAGE_COLORMAPS)
    assert body["samples"] == list(SAMPLES)
    assert body["max_upload_mb"] == 20


def test_healthz_reports_the_queue(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert body["queue"]["capacity"] == 1 + 8  # one worker, eight waiting by default
    assert body["queue"]["active"] == 0


def test_labels_of_each_model_and_unknown_model(client, builtin_model):
    assert client.get("/api/labels").json()["labels"] == builtin_model.labels
    tiny = client.get("/api/labels", params={"model": "tiny"}).json()
    assert tiny == {"model": "tiny", "labels": ["red", "green", "blue"]}
    response = client.get("/api/labels", params={"model": "resnet9000"})
    assert response.status_code == 400
    assert "unknown model 'resnet9000'" in response.json()["detail"]
    assert "efficientnet_lite0, tiny" in response.json()["detail"]


def test_colormap_tables_reproduce_colorize_exactly(client):
    tables = client.get("/api/colormaps").json()
    assert list(tables) == list(PAGE_COLORMAPS)
    heat = np.random.default_rng(0).random((40, 50))
    heat[0, :4] = [0.0, 1.0, 0.5, 255.5 / 256]  # both ends and bin edges
    for name, table in tables.items():
        table = np.asarray(table, dtype=np.uint8)
        np.testing.assert_array_equal(table, colormap_table(name))
        np.testing.assert_array_equal(table[colormap_indices(heat)], colorize(heat, name))


# --- explaining --------------------------------------------------------------------------


def test_explain_upload_equals_the_library(client, builtin_model, chelsea_png):
    response = client.post(
        "/api/explain",
        files={"file": ("chelsea.png", chelsea_png, "image/png")},
        data={"target": "top5", "colormap": "viridis", "alpha": "0.4"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    image = sample_image("chelsea")
    expected = camlens.explain(builtin_model, [image], method="cam", target="top5")
    assert (body["model"], body["method"], body["layer"]) == ("efficientnet_lite0", "cam", "_swish")
    assert body["size"] == [451, 300] and body["display"]["size"] == [451, 300]
    assert body["identity_error"] < 1e-3
    top = expected.probs[0].topk(5)
    assert (
        [p["class"] for p in body["predictions"]]
        == top.indices.tolist()
        == [285, 282, 281, 287, 728]
    )
    assert [p["prob"] for p in body["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert [m["class"] for m in body["maps"]] == expected.targets[0].tolist()
    boxes = expected.boxes(original=True)[0]
    np.testing.assert_array_equal(decode_data_url(body["display"]["image"]), np.asarray(image))
    for k, entry in enumerate(body["maps"]):
        assert entry["label"] == builtin_model.labels[entry["class"]]
        assert entry["score"] == pytest.approx(float(expected.logits[0, entry["class"]]), abs=1e-5)
        assert entry["box"] == entry["display_box"] == list(boxes[k])
        heat = expected.heatmap(0, k, original=True)
        picture = overlay(image, heat, colormap="viridis", alpha=0.4, box=boxes[k])
        np.testing.assert_array_equal(decode_data_url(entry["overlay"]), np.asarray(picture))
        np.testing.assert_array_equal(decode_data_url(entry["heatmap"]), colormap_indices(heat))


def test_a_sample_by_name_gives_the_same_answer_as_its_upload(client, chelsea_png):
    by_name = client.post("/api/explain", data={"sample": "chelsea", "method": "gradcam"})
    uploaded = client.post(
        "/api/explain",
        data={"method": "gradcam"},
        files={"file": ("c.png", chelsea_png, "image/png")},
    )
    assert by_name.status_code == uploaded.status_code == 200
    assert by_name.json() == uploaded.json()
    assert by_name.json()["identity_error"] is None


@pytest.mark.parametrize("target", ["espresso", "967"])
def test_target_by_class_name_or_id(client, target):
    body = client.post("/api/explain", data={"sample": "coffee", "target": target}).json()
    assert [(m["class"], m["label"]) for m in body["maps"]] == [(967, "espresso")]
    assert body["predictions"][0]["class"] == 967


def test_large_images_come_back_at_display_size_with_boxes_in_original_pixels(client):
    image = noise_image(1500, 1000, seed=3)
    response = post_tiny(
        client, {"target": "top3"}, {"file": ("big.png", png_bytes(image), "image/png")}
    )
    body = response.json()
    assert body["size"] == [1500, 1000] and body["display"]["size"] == [640, 427]
    photo = fit_within(image, 640)
    np.testing.assert_array_equal(decode_data_url(body["display"]["image"]), np.asarray(photo))
    expected = camlens.explain(tiny_classifier(), [image], target="top3")
    original_boxes = expected.boxes(original=True)[0]
    for k, entry in enumerate(body["maps"]):
        assert decode_data_url(entry["overlay"]).shape == (427, 640, 3)
        assert entry["box"] == (list(original_boxes[k]) if original_boxes[k] else None)
        if entry["box"]:  # the display box is the same region, scaled (up to rounding)
            scaled = np.asarray(entry["box"]) * 640 / 1500
            assert np.abs(np.asarray(entry["display_box"]) - scaled).max() <= 1


def test_perturbation_methods_use_the_most_active_channels():
    app = create_app([tiny_classifier()], max_channels=2)
    image = noise_image(20, 12)
    with local_client(app) as client:
        body = post_tiny(
            client,
            {"method": "scorecam"},
            {"file": ("n.png", png_bytes(image), "image/png")},
        ).json()
    assert body["method_options"] == {"max_channels": 2}
    classifier = tiny_classifier()
    method = ScoreCAM(classifier.module, max_channels=2, labels=classifier.labels)
    expected = camlens.explain(classifier, [image], method=method)
    heat = colormap_indices(expected.heatmap(0, 0, original=True))
    np.testing.assert_array_equal(decode_data_url(body["maps"][0]["heatmap"]), heat)


def test_server_method_options_reach_the_methods_that_take_them():
    app = create_app([tiny_classifier()], smooth=3, method="gradcam")
    image = noise_image(20, 12)
    with local_client(app) as client:
        assert client.get("/api/models").json()["default_method"] == "gradcam"
        files = {"file": ("n.png", png_bytes(image), "image/png")}
        default = post_tiny(client, {}, files).json()  # no method: the server's, smoothed
        cam = post_tiny(client, {"method": "cam"}, files).json()  # smooth does not apply
    assert (default["method"], default["method_options"]) == ("gradcam", {"smooth": 3})
    assert (cam["method"], cam["method_options"]) == ("cam", {})


def test_old_server_option_names_still_work_with_a_deprecation_line(monkeypatch):
    with pytest.warns(DeprecationWarning, match="threads"):
        app = create_app([tiny_classifier()], workers=2, perturbation_channels=3)
    assert app.state.queue.workers == 2
    calls = {}

    def fake_build(create, models, settings):
        calls.update(settings)
        raise SystemExit(0)

    monkeypatch.setattr("camlens.cli.serve._build", fake_build)
    result = CliRunner().invoke(
        main, ["serve", "--workers", "3", "--perturbation-channels", "5", "--smooth", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "--workers is deprecated; use --threads" in result.output
    assert "--perturbation-channels is deprecated; use --max-channels" in result.output
    assert (calls["threads"], calls["max_channels"], calls["smooth"]) == (3, 5, 2)
    assert "--perturbation-channels" not in CliRunner().invoke(main, ["serve", "--help"]).output


# --- configuration errors: 400 / 422 with a message -----------------------------------------


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"model": "resnet9000"}, 400, "unknown model 'resnet9000'; this server offers"),
        ({"method": "magic"}, 400, "unknown method 'magic'; choose one of: cam, gradcam"),
        ({"target": "top11"}, 400, "K must be between 1 and 10"),
        ({"target": "purple"}, 400, "no class is called 'purple'"),
        ({"target": "7"}, 400, "class id 7 is out of range 0..2"),
        ({"colormap": "sunset"}, 400, "unknown colormap 'sunset'"),
        ({"sample": "mona-lisa"}, 400, "no sample called 'mona-lisa'; choose one of: chelsea"),
        ({"alpha": "1.5"}, 422, "less than or equal to 1"),
    ],
)
def test_bad_parameters_are_4xx_with_a_message(client, fields, status, message):
    response = post_tiny(client, fields)
    assert response.status_code == status
    assert message in str(response.json()["detail"])


def test_exactly_one_of_file_and_sample(client, chelsea_png):
    neither = client.post("/api/explain", data={"model": "tiny"})
    both = client.post(
        "/api/explain",
        data={"model": "tiny", "sample": "chelsea"},
        files={"file": ("c.png", chelsea_png, "image/png")},
    )
    for response in (neither, both):
        assert response.status_code == 400
        assert response.json()["detail"].startswith("send exactly one of")


# --- bad uploads ----------------------------------------------------------------------------


def truncated_png() -> bytes:
    data = png_bytes(noise_image(64, 64, seed=2))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "data", "status", "message"),
    [
        ("notes.txt", b"These are my notes, not a photo.\n", 415, "not an image Pillow can decode"),
        ("half.png", truncated_png(), 400, "the file is truncated"),
        ("empty.png", b"", 400, "it is empty (0 bytes)"),
        ("bomb.png", bilevel_png_bytes(20_000, 10_000), 400, "200,000,000 pixels"),
        ("bomb2.png", bilevel_png_bytes(10_000, 10_000), 400, "100,000,000 pixels"),
    ],
)
def test_unreadable_uploads_are_4xx_with_a_message(client, name, data, status, message):
    response = post_tiny(client, files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == status
    detail = response.json()["detail"]
    assert message in detail and f"the upload '{name}'" in detail
    if "pixels" in message:
        assert (
            "above the limit of 40,000,000 (the pixel budget: memory and decompression-bomb"
            in detail
        )
        assert "send a smaller image" in detail and "max_pixels=" not in detail


def test_a_client_file_name_is_never_opened(client, tmp_path):
    # A real image on disk, and an upload that names it: the server must decode the bytes
    # it received (a raw PPM, which Pillow would memory-map from a file name if it had one).
    on_disk = tmp_path / "disk.ppm"
    noise_image(20, 12, seed=5).save(on_disk)
    sent = noise_image(20, 12, seed=6)
    buffer = io.BytesIO()
    sent.save(buffer, format="PPM")
    decoded = decode_upload(buffer.getvalue(), str(on_disk))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(sent))
    response = post_tiny(client, files={"file": ("../../etc/passwd", b"root:x:0:0", "text/plain")})
    assert response.status_code == 415
    assert "the upload 'passwd'" in response.json()["detail"]


def test_max_pixels_is_configurable():
    with local_client(create_app([tiny_classifier()], max_pixels=200)) as client:
        small = png_bytes(noise_image(20, 10))
        large = png_bytes(noise_image(20, 11))
        small = post_tiny(client, files={"file": ("s.png", small, "image/png")})
        large = post_tiny(client, files={"file": ("l.png", large, "image/png")})
    assert small.status_code == 200
    assert large.status_code == 400
    assert "it has 220 pixels, above the limit of 200" in large.json()["detail"]


# --- size limit: 413 --------------------------------------------------------------------------


def test_uploads_over_the_limit_get_413():
    limit = 50_000  # bytes
    app = create_app([tiny_classifier()], max_upload_mb=limit / 2**20)
    with local_client(app) as client:

        def upload(size: int):
            return post_tiny(client, files={"file": ("x.bin", b"x" * size, "image/png")})

        at_limit, over, far_over = upload(limit), upload(limit + 1), upload(limit + 2**20)
        healthy = client.get("/healthz").json()
    assert at_limit.status_code == 415  # within the limit: read, and found not to be an image
    for response in (over, far_over):
        assert response.status_code == 413
        assert "larger than this server's limit of 0.0476837 MB" in response.json()["detail"]
    assert healthy["queue"]["active"] == 0


class ChunkedBody:
    """An ASGI ``receive`` that streams ``chunks`` pieces of ``size`` bytes and counts reads."""

    def __init__(self, chunks: int, size: int) -> None:
        self.chunks, self.size, self.reads = chunks, size, 0

    async def __call__(self) -> dict:
        self.reads += 1
        more = self.reads < self.chunks
        return {"type": "http.request", "body": b"x" * self.size, "more_body": more}


def run_asgi(app, headers: list[tuple[bytes, bytes]], receive) -> list[dict]:
    import asyncio

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/explain", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent


async def read_whole_body(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"read"})


def test_body_limit_refuses_without_reading_the_whole_body():
    limited = BodySizeLimit(read_whole_body, max_body_bytes=10_000, message="too big")
    # Declared too large: refused before a single read.
    declared = ChunkedBody(chunks=1000, size=1000)
    sent = run_asgi(limited, [(b"content-length", b"1000000")], declared)
    assert sent[0]["status"] == 413 and declared.reads == 0
    assert sent[1]["body"] == b'{"detail":"too big"}'
    # Streamed without a length: refused at the first chunk past the limit.
    streamed = ChunkedBody(chunks=1000, size=1000)
    sent = run_asgi(limited, [], streamed)
    assert sent[0]["status"] == 413 and streamed.reads == 11
    # Within the limit: untouched.
    small = ChunkedBody(chunks=10, size=1000)
    assert run_asgi(limited, [], small)[0]["status"] == 200 and small.reads == 10


# --- bounded queue: 503 with Retry-After -------------------------------------------------


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after_and_recovers():
    classifier = tiny_classifier()
    classifier.module.gate.clear()  # the worker blocks inside the model until we open it
    app = create_app([classifier], threads=1, max_queue=1)
    results: list = []
    with local_client(app) as client:

        def active() -> int:
            return client.get("/healthz").json()["queue"]["active"]

        threads = [threading.Thread(target=lambda: results.append(post_tiny(client)))]
        threads[0].start()
        wait_for(lambda: active() == 1)  # running (blocked), and the server still answers
        threads.append(threading.Thread(target=lambda: results.append(post_tiny(client))))
        threads[1].start()
        wait_for(lambda: active() == 2)  # waiting
        refused = post_tiny(client)
        classifier.module.gate.set()
        for thread in threads:
            thread.join(timeout=60)
        after = client.get("/healthz").json()["queue"]
        again = post_tiny(client)
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["detail"].startswith("the server is busy; retry in")
    assert [r.status_code for r in results] == [200, 200]
    assert after == {"active": 0, "capacity": 2, "finished": 2}
    assert again.status_code == 200


# --- models, page, docs ---------------------------------------------------------------------


def test_bad_configuration_fails_at_creation(tmp_path):
    with pytest.raises(camlens.ConfigError, match="two models are called 'tiny'"):
        create_app([tiny_classifier(), tiny_classifier()])
    with pytest.raises(camlens.ConfigError, match="missing' does not exist"):
        create_app([tiny_classifier()], models_dir=tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(camlens.ConfigError, match="file' is not a folder"):
        create_app([tiny_classifier()], models_dir=tmp_path / "file")
    with pytest.raises(camlens.ConfigError, match="max_upload_mb must be positive"):
        create_app([tiny_classifier()], max_upload_mb=0)


def test_serve_command_refuses_an_unknown_model_before_starting():
    result = CliRunner().invoke(main, ["serve", "--model", "resnet9000"])
    assert result.exit_code == 2
    assert "Error: unknown model 'resnet9000'" in result.output


def test_page_and_its_assets_are_served_from_this_server_only(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    html = page.text
    assert 'src="/static/app.js"' in html and 'href="/static/style.css"' in html
    assert "http://" not in html and "https://" not in html
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200
        assert "http://" not in response.text and "https://" not in response.text


def test_openapi_schema_lists_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/healthz",
        "/api/models",
        "/api/labels",
        "/api/colormaps",
        "/api/explain",
    }
    fields = paths["/api/explain"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert fields["schema"]["$ref"].endswith("Body_explain_image_api_explain_post")


def test_docs_without_fastapi_offline_is_a_plain_page(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi_offline", None)  # import fails
    with local_client(create_app([tiny_classifier()])) as client:
        docs = client.get("/docs")
    assert docs.status_code == 200
    assert "<code>/api/explain</code>" in docs.text and "/openapi.json" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text


def test_docs_with_fastapi_offline_serve_swagger_ui_locally():
    pytest.importorskip("fastapi_offline", reason="fastapi-offline (camlens[web]) not installed")
    with local_client(create_app([tiny_classifier()])) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        local = [a for a in assets if a.endswith((".js", ".css"))]
        assert local and all(a.startswith("/") for a in local)
        for asset in local:
            assert client.get(asset).status_code == 200
