"""The web server under hostile input (issue 13): slow clients, fuzzed forms and images,
foreign Host and Origin headers, model folders and pickles, bad command lines.

Each test here failed before the fix it checks: slow clients took every queue place (the
request after them got 503), ``target=²`` gave 500 and Arabic-Indic digits a class id, any
Host and any Origin were answered, ``--models-dir`` listed pickles and showed server paths,
uploads over 1 MB were spooled to a temporary file, a raw pickle was "not a PyTorch file",
and bad ``serve`` paths printed usage blocks or hung on a FIFO.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import camlens
from camlens.cli import main
from camlens.io.samples import SAMPLES
from camlens.methods import METHODS
from camlens.serve import create_app
from camlens.serve.jobs import PAGE_COLORMAPS, parse_target
from camlens.serve.limits import Admission, ReadBudget, WorkQueue
from image_corpus import bilevel_png_bytes
from serving import uvicorn_thread
from test_serve_api import local_client, noise_image, png_bytes, tiny_classifier

SLOW_CLIENTS = 20


def start_slow_upload(port: int, length: int = 10_000) -> socket.socket:
    """A connection that has sent the headers of a ``length``-byte upload and one byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /api/explain HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{port}\r\nContent-Length: {length}\r\n".encode()
        + b"Content-Type: multipart/form-data; boundary=slow\r\n\r\n-"
    )
    return sock


def drip(sockets: list[socket.socket], stop: threading.Event) -> None:
    """Send one more byte on every socket each second until ``stop``."""
    while not stop.wait(1.0):
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.sendall(b"-")


def multipart_upload(port: int, data: bytes) -> httpx.Response:
    files = {"file": ("noise.png", data, "image/png")}
    return httpx.post(f"http://127.0.0.1:{port}/api/explain", files=files, timeout=30)


# --- item 3: the body is read (in time) before a queue place is taken ------------------------


def test_slow_clients_take_no_queue_place_and_a_normal_request_is_answered():
    app = create_app([tiny_classifier()])  # the defaults: 1 thread, 8 waiting, 30 s per body
    stop = threading.Event()
    with uvicorn_thread(app) as port:
        sockets = [start_slow_upload(port) for _ in range(SLOW_CLIENTS)]
        dripper = threading.Thread(target=drip, args=(sockets, stop), daemon=True)
        dripper.start()
        try:
            time.sleep(1.5)  # every slow client is in: headers and a few bytes sent
            queue = httpx.get(f"http://127.0.0.1:{port}/healthz").json()["queue"]
            started = time.monotonic()
            response = multipart_upload(port, png_bytes(noise_image(20, 12)))
            seconds = time.monotonic() - started
        finally:
            stop.set()
            dripper.join(timeout=10)
            for sock in sockets:
                sock.close()
    assert queue["active"] == 0, queue  # 20 uploads arriving, none holds a place
    assert response.status_code == 200, response.text
    assert response.json()["maps"][0]["label"] in ("red", "green", "blue")
    assert seconds < 10


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_is_closed():
    app = create_app([tiny_classifier()], body_timeout=1.5)
    with uvicorn_thread(app) as port:
        sock = start_slow_upload(port)
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(4):  # a byte every 0.5 s: too slow for the whole body
                time.sleep(0.5)
                sock.sendall(b"-")
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        seconds = time.monotonic() - started
        sock.close()
        after = multipart_upload(port, png_bytes(noise_image(20, 12)))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in head.lower()
    assert "did not arrive within 1.5 s" in json.loads(body)["detail"]
    assert 1.4 < seconds < 8  # cut off at the limit, and the socket closed (recv gave b"")
    assert after.status_code == 200


class Chunks:
    """An ASGI ``receive``: ``count`` chunks of ``size`` bytes, each after ``pause`` s."""

    def __init__(self, count: int, size: int, pause: float = 0.0) -> None:
        self.count, self.size, self.pause, self.reads = count, size, pause, 0

    async def __call__(self) -> dict:
        import asyncio

        await asyncio.sleep(self.pause)
        self.reads += 1
        more = self.reads < self.count
        return {"type": "http.request", "body": b"x" * self.size, "more_body": more}


def test_bodies_being_received_share_a_memory_budget_and_hold_no_queue_place():
    import asyncio

    queue = WorkQueue(workers=1, max_waiting=0)
    budget = ReadBudget(10_000)
    seen: list[int] = []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(len(body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    admission = Admission(app, queue, frozenset({"/x"}), body_timeout=5.0, budget=budget)

    async def request(receive) -> int:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
        await admission(scope, receive, send)
        return sent[0]["status"]

    async def both():
        slow = asyncio.create_task(request(Chunks(12, 700, pause=0.02)))  # 8,400 bytes
        await asyncio.sleep(0.1)
        assert queue.active == 0 and 0 < budget.held < 10_000  # reading: no place taken
        over = await request(Chunks(4, 2500))  # 10,000 more bytes do not fit meanwhile
        return await slow, over, budget.held

    slow, over, held = asyncio.run(both())
    queue.shutdown()
    assert (slow, over, held) == (200, 503, 0)
    assert seen == [8400]  # the body the app read is the one sent, replayed from memory


# --- item 4: no input makes the API answer 500 ----------------------------------------------


@pytest.fixture(scope="module")
def fuzz_client():
    with local_client(create_app([tiny_classifier()]), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("target", ["²", "٢", "１", "top٢", "³4", "٣٤"])
def test_unicode_digits_are_class_names_never_ids(fuzz_client, target):
    assert parse_target(target) == target  # not an int: a name, looked up as a name
    response = fuzz_client.post("/api/explain", data={"target": target, "sample": "chelsea"})
    assert response.status_code == 400
    assert response.json()["detail"] == f"no class is called {target!r}."


def seed_images() -> list[bytes]:
    """Small valid images of many formats and modes, to be sent as they are or mutated."""
    rgb = noise_image(24, 16, seed=4)
    seeds = [bilevel_png_bytes(3000, 1), bilevel_png_bytes(1, 3000)]
    for image, kind, options in [
        (rgb, "PNG", {}),
        (rgb, "JPEG", {"quality": 80}),
        (rgb, "GIF", {}),
        (rgb, "BMP", {}),
        (rgb, "TIFF", {"compression": "tiff_lzw"}),
        (rgb, "WEBP", {}),
        (rgb.convert("P"), "PNG", {"transparency": 0}),
        (rgb.convert("LA"), "PNG", {}),
        (rgb.convert("CMYK"), "JPEG", {}),
        (Image.new("I;16", (5, 3), 40000), "PNG", {}),
        (Image.new("RGB", (1, 1)), "PNG", {}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, format=kind, **options)
        seeds.append(buffer.getvalue())
    return seeds


SEEDS = seed_images()


@st.composite
def image_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["seed", "mutated", "truncated", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=3000))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    if kind == "truncated":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 12))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
    return bytes(data)


TRICKY = [
    "", " ", "\x00", "²", "٢", "１", "top٢", "top0", "top00003", "top99999999999", "-1", "1e3",
    "nan", "inf", "-inf", "0x10", "99999999999999999999999", "../../etc/passwd", "jet_r",
    "Egyptian cat", "RED", "red", "efficientnet_lite0", "\u202e", "a" * 2000, "é", "𝟙",
]  # fmt: skip


#: Characters str.isdigit() accepts but int() does not: superscript, circled... digits.
DIGITS_NOT_DECIMAL = [ch for ch in map(chr, range(0x110000)) if ch.isdigit() and not ch.isdecimal()]
#: Those, and the decimal digits of other scripts (int() reads them: "٢" is 2).
UNICODE_DIGITS = st.one_of(
    st.text(st.sampled_from(DIGITS_NOT_DECIMAL), min_size=1, max_size=3),
    st.text(st.characters(categories=("Nd", "No"), min_codepoint=128), min_size=1, max_size=3),
)


def field(valid: list[str]):
    """Mostly a valid value (so that the other fields get checked too), else absent, a tricky
    value, Unicode digits or any text."""
    choices = [st.none(), st.sampled_from(TRICKY), UNICODE_DIGITS, st.text(max_size=40)]
    choices += [st.sampled_from(valid)] * len(choices)  # valid half of the time
    return st.integers(0, len(choices) - 1).flatmap(lambda i: choices[i])


EXPLAIN_FIELDS = {
    "model": field(["tiny"]),
    "method": field(list(METHODS)),
    "target": field(["top1", "top3", "top10", "red", "0", "2", "3"]),
    "colormap": field([*PAGE_COLORMAPS, "twilight", "jet_r"]),
    "alpha": field(["0", "0.25", "1", "1.0001", "-0"]),
}


VALID_FIELDS = {
    "model": "tiny",
    "method": "cam",
    "target": "top1",
    "colormap": "jet",
    "alpha": "0.5",
}


def assert_answered(response: httpx.Response) -> None:
    """A 2xx or 4xx (never 5xx) with a JSON body; an error has a ``detail``."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    body = response.json()
    if response.status_code >= 400:
        assert body["detail"], body


FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(
    fields=st.fixed_dictionaries(EXPLAIN_FIELDS),
    source=st.sampled_from(["file", "file", "sample", "both", "neither", "file as text"]),
    sample=field(list(SAMPLES)),
    upload=image_bytes(),
    filename=st.text(max_size=60),
    content_type=st.sampled_from(["image/png", "application/octet-stream", "text/plain"]),
)
@example(  # the bug of issue 13, found by this test: int("²") raised, a 500
    fields={"target": "²"}, source="sample", sample="chelsea", upload=b"", filename="",
    content_type="image/png",
)  # fmt: skip
def test_fuzzed_explain_requests_are_never_a_500(
    fuzz_client, fields, source, sample, upload, filename, content_type
):
    data = {name: value for name, value in fields.items() if value is not None}
    files = None
    if source in ("sample", "both") and sample is not None:
        data["sample"] = sample
    if source in ("file", "both"):
        files = {"file": (filename, upload, content_type)}
    elif source == "file as text":
        data["file"] = upload.decode("latin-1")  # a plain field where a file belongs
    requests = [(data, files)]
    # And each drawn value alone among valid ones, so that it is not refused for another.
    small = {"file": ("small.png", SEEDS[2], "image/png")}  # a 24 x 16 PNG: quick
    for name, value in fields.items():
        alone = dict(VALID_FIELDS)
        alone.pop(name) if value is None else alone.update({name: value})
        requests.append((alone, small))
    requests.append((VALID_FIELDS, {"file": (filename, upload, content_type)}))
    for data, files in requests:
        response = fuzz_client.post("/api/explain", data=data, files=files)
        assert_answered(response)
        if response.status_code == 200:
            assert response.json()["maps"]


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=2000),
        st.builds(
            lambda head, tail: head + tail,
            st.sampled_from([b"--b\r\n", b"--b\r\nContent-Disposition: form-data; name=file; "]),
            st.binary(max_size=500),
        ),
    ),
    content_type=st.sampled_from(
        [
            None,
            "multipart/form-data; boundary=b",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "application/x-www-form-urlencoded",
            "application/json",
            "text/plain; charset=utf-99",
            "multipart/form-data; boundary=b; charset=klingon",
        ]
    ),
)
def test_fuzzed_raw_bodies_are_never_a_500(fuzz_client, body, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    assert_answered(fuzz_client.post("/api/explain", content=body, headers=headers))


@FUZZ
@given(
    path=st.sampled_from(
        ["/api/labels", "/api/models", "/api/colormaps", "/healthz", "/api/explain", "/"]
    ),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    params=st.dictionaries(st.sampled_from(["model", "x", "target"]), field(["tiny"]), max_size=2),
)
def test_fuzzed_queries_to_every_endpoint_are_never_a_500(fuzz_client, path, method, params):
    response = fuzz_client.request(method, path, params=params)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if path != "/" or response.status_code >= 400:
        assert_answered(response)


# --- item 7: Host and Origin ------------------------------------------------------------------


def at_port_8000(app) -> TestClient:
    """A test client of ``app`` served at http://localhost:8000 (it listens on port 8000)."""
    return TestClient(app, base_url="http://localhost:8000")


@pytest.fixture(scope="module")
def guarded():
    with at_port_8000(create_app([tiny_classifier()])) as client:
        yield client


def post_sample(client, headers: dict[str, str]) -> httpx.Response:
    return client.post("/api/explain", data={"sample": "chelsea"}, headers=headers)


@pytest.mark.parametrize(
    "host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST:8000", "localhost.:8000"]
)
def test_the_served_addresses_are_answered(guarded, host):
    assert post_sample(guarded, {"Host": host}).status_code == 200
    assert guarded.get("/api/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8000",
        "localhost:8001",  # another port: not this server
        "127.0.0.1",  # port 80
        "localhost.evil.example:8000",
        "10.0.0.7:8000",  # an address this server does not listen on
        "localhost:80000",
        "[::1",
    ],
)
def test_other_hosts_get_400_with_a_message(guarded, host):
    for response in (
        post_sample(guarded, {"Host": host}),
        guarded.get("/", headers={"Host": host}),
    ):
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert detail.startswith("this server answers requests addressed to 127.0.0.1:8000, ")
        assert "DNS rebinding" in detail and "--allow-host" in detail


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "http://localhost:3000"},  # same host, another port: another origin
        {"Origin": "https://localhost:8000"},  # another scheme
        {"Origin": "null"},  # a sandboxed frame or a file:// page
        {"Sec-Fetch-Site": "cross-site"},  # a browser request without Origin
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_cross_origin_posts_get_403(guarded, headers):
    response = post_sample(guarded, headers)
    assert response.status_code == 403
    detail = response.json()["detail"]
    assert detail.startswith("cross-origin request refused: this server accepts requests from")
    assert "(http://localhost:8000)" in detail and "--allow-origin" in detail


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl and scripts send no Origin
        {"Origin": "http://localhost:8000"},
        {"Origin": "http://localhost:8000", "Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed in the address bar
    ],
)
def test_same_origin_posts_and_tools_are_answered(guarded, headers):
    assert post_sample(guarded, headers).status_code == 200


def test_cross_origin_gets_are_answered_but_not_readable(guarded):
    response = guarded.get("/api/models", headers={"Origin": "http://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_allowed_origins_and_hosts_open_the_server_deliberately():
    app = create_app(
        [tiny_classifier()],
        allowed_origins=["http://localhost:3000"],
        allowed_hosts=["mybox.local", "proxy.example:443"],
    )
    with at_port_8000(app) as client:
        allowed = post_sample(client, {"Origin": "http://localhost:3000"})
        other = post_sample(client, {"Origin": "http://evil.example"})
        preflight = client.options(
            "/api/explain",
            headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
        )
        named = post_sample(client, {"Host": "mybox.local:8000"})
        proxied = post_sample(client, {"Host": "proxy.example:443"})
        wrong_port = post_sample(client, {"Host": "mybox.local:9000"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert other.status_code == 403
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert (named.status_code, proxied.status_code, wrong_port.status_code) == (200, 200, 400)
    with at_port_8000(create_app([tiny_classifier()], allowed_origins=["*"])) as client:
        assert post_sample(client, {"Origin": "http://anywhere.example"}).status_code == 200


def test_listening_on_every_address_accepts_ip_addresses_but_not_names():
    app = create_app([tiny_classifier()], allowed_hosts=["0.0.0.0"])
    with at_port_8000(app) as client:
        ip = post_sample(
            client, {"Host": "192.168.1.20:8000", "Origin": "http://192.168.1.20:8000"}
        )
        name = post_sample(client, {"Host": "rebind.evil.example:8000"})
    assert (ip.status_code, name.status_code) == (200, 400)


def test_bad_allowed_names_are_configuration_errors():
    with pytest.raises(camlens.ConfigError, match="not an origin: 'localhost:3000'"):
        create_app([tiny_classifier()], allowed_origins=["localhost:3000"])
    with pytest.raises(camlens.ConfigError, match="not a host name or address"):
        create_app([tiny_classifier()], allowed_hosts=["host:port"])


def test_serve_passes_allow_origin_allow_host_and_host_to_the_app(monkeypatch):
    calls = {}

    def fake_build(create, models, settings):
        calls.update(settings)
        raise SystemExit(0)

    monkeypatch.setattr("camlens.cli.serve._build", fake_build)
    options = ["--allow-origin", "http://localhost:3000", "--allow-origin", "https://a.example"]
    options += ["--allow-host", "mybox.local", "--host", "127.0.0.1", "--port", "0"]
    result = CliRunner().invoke(main, ["serve", *options, "--body-timeout", "12"])
    assert result.exit_code == 0, result.output
    assert calls["allowed_origins"] == ["http://localhost:3000", "https://a.example"]
    assert calls["allowed_hosts"] == ["127.0.0.1", "mybox.local"]
    assert calls["body_timeout"] == 12


# --- item 8: models folder, uploads in memory, pickles ---------------------------------------


def write_trained_folder(folder: Path, labels=("circle", "square"), fit: bool = True) -> None:
    """A model folder as ``camlens train`` writes it (a small SimpleCNN, untrained)."""
    from safetensors.torch import save_file

    from camlens.models.trained import FORMAT, build_network

    architecture = {"backbone": "simple", "recipe": "simple", "num_classes": len(labels)}
    architecture["widths"] = [4, 8]
    module = build_network(architecture)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if not fit:
        state.pop(next(iter(state)))
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    config = {
        "format": FORMAT,
        "format_version": 1,
        "architecture": architecture,
        "labels": list(labels),
        "input_size": [16, 16],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    (folder / "config.json").write_text(json.dumps(config))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo camlens-test-pwned",))


def test_models_dir_offers_only_trained_model_folders(tmp_path):
    write_trained_folder(tmp_path / "shapes")
    write_trained_folder(tmp_path / "broken", fit=False)  # loads only to fail
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil(), protocol=4))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1))
    torch.save(net, tmp_path / "whole.pt")
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    (tmp_path / "notes.txt").write_text("not a model")
    os.mkfifo(tmp_path / "pipe")
    app = create_app([tiny_classifier()], models_dir=tmp_path)
    skipped = dict(app.state.store.skipped)
    with local_client(app) as client:
        offered = client.get("/api/models").json()["models"]
        shapes = client.post("/api/explain", data={"model": "shapes", "sample": "chelsea"})
        broken = client.post("/api/explain", data={"model": "broken", "sample": "chelsea"})
        labels = client.get("/api/labels", params={"model": "broken"})
        pickled = client.post("/api/explain", data={"model": "evil.pt", "sample": "chelsea"})
    assert offered == ["tiny", "broken", "shapes"]
    assert sorted(skipped) == ["empty", "evil.pkl", "evil.pt", "notes.txt", "pipe", "weights.pth", "whole.pt"]  # fmt: skip
    assert skipped["pipe"] == "not a regular file or folder"
    assert skipped["empty"].startswith("not a model folder written by camlens train")
    assert shapes.status_code == 200 and shapes.json()["predictions"][0]["label"] in (
        "circle",
        "square",
    )
    for response in (broken, labels):
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert detail.startswith("the server cannot load model 'broken' (its log says why)")
        assert str(tmp_path) not in detail and "--trust-model" not in detail
    assert pickled.status_code == 400
    assert "unknown model 'evil.pt'" in pickled.json()["detail"]
    assert str(tmp_path) not in pickled.json()["detail"]


def test_serve_lists_skipped_models_dir_entries(tmp_path, monkeypatch):
    (tmp_path / "whole.pt").write_bytes(pickle.dumps(Evil(), protocol=4))
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: None)
    result = CliRunner().invoke(
        main, ["serve", "--model", "efficientnet_lite0", "--models-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "--models-dir: skipping whole.pt: a model file: weights need" in result.output


def test_uploads_are_never_spooled_to_disk(monkeypatch, fuzz_client):
    spooled: list = []
    real = tempfile.TemporaryFile

    def recording(*args, **kwargs):
        spooled.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    data = png_bytes(noise_image(700, 700, seed=9))
    assert len(data) > 1024 * 1024  # Starlette spools file parts over 1 MB
    response = fuzz_client.post(
        "/api/explain", data={"model": "tiny"}, files={"file": ("big.png", data, "image/png")}
    )
    assert response.status_code == 200
    assert response.json()["size"] == [700, 700]
    assert spooled == []


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_raw_pickle_gets_the_trust_model_explanation_and_no_torch_warning(
    tmp_path, capfd, protocol
):
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(Evil(), protocol=protocol))
    with pytest.raises(camlens.ConfigError) as error:
        camlens.load_model(path)
    message = str(error.value)
    assert "holds pickled Python objects (it refers to posix.system)" in message
    assert "--trust-model" in message
    out, err = capfd.readouterr()
    assert err == "" and "camlens-test-pwned" not in out


def test_an_unreadable_file_is_still_not_a_pytorch_file(tmp_path):
    path = tmp_path / "data.pt"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=4))  # a pickle importing nothing
    with pytest.raises(camlens.ConfigError, match=r"not a PyTorch file, or damaged"):
        camlens.load_model(path)


# --- item 5: bad serve command lines: exit 2, one line -----------------------------------------


def one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_bad_models_dir_is_one_line_and_exit_2(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    runner = CliRunner()
    missing = one_line_error(runner.invoke(main, ["serve", "--models-dir", str(tmp_path / "no")]))
    a_file = one_line_error(runner.invoke(main, ["serve", "--models-dir", str(tmp_path / "file")]))
    assert missing.endswith("no' does not exist") and a_file.endswith("file' is not a folder")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    unreadable = one_line_error(runner.invoke(main, ["serve", "--models-dir", str(tmp_path)]))
    assert unreadable.endswith("cannot be read: Permission denied")


def test_an_address_that_cannot_be_served_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--port", str(port)])
    line = one_line_error(result)
    assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in line.lower()
    bad_host = one_line_error(CliRunner().invoke(main, ["serve", "--host", "no-such-host.invalid"]))
    assert bad_host.startswith("Error: cannot listen on no-such-host.invalid:8000")


def test_a_fifo_as_labels_is_refused_instead_of_hanging(tmp_path):
    fifo = tmp_path / "labels.txt"
    os.mkfifo(fifo)
    command = [sys.executable, "-c", "from camlens.cli import main; main()", "serve"]
    command += ["--port", "0", "--labels", str(fifo)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("camlens serve --labels FIFO hung")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"Error: --labels '{fifo}' is not a regular file"


def test_a_request_whose_client_left_leaves_the_queue_without_running():
    classifier = tiny_classifier()
    classifier.module.gate.clear()  # the worker blocks inside the model until we open it
    app = create_app([classifier], threads=1, max_queue=4)
    data = png_bytes(noise_image(20, 12))
    with uvicorn_thread(app) as port:
        health = f"http://127.0.0.1:{port}/healthz"
        first = threading.Thread(target=lambda: multipart_upload(port, data), daemon=True)
        first.start()
        wait_until(lambda: httpx.get(health).json()["queue"]["active"] == 1)
        errors: list[Exception] = []

        def impatient() -> None:  # gives up after 3 s and closes its connection
            files = {"file": ("noise.png", data, "image/png")}
            try:
                httpx.post(f"http://127.0.0.1:{port}/api/explain", files=files, timeout=3.0)
            except httpx.ReadTimeout as error:
                errors.append(error)

        second = threading.Thread(target=impatient, daemon=True)
        second.start()
        wait_until(lambda: httpx.get(health).json()["queue"]["active"] == 2)  # waiting
        second.join(timeout=30)
        assert errors, "the second request was answered"
        wait_until(lambda: httpx.get(health).json()["queue"]["active"] == 1)  # it left
        classifier.module.gate.set()
        first.join(timeout=30)
        queue = httpx.get(health).json()["queue"]
    assert queue == {"active": 0, "capacity": 5, "finished": 1}  # only the first one ran


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
