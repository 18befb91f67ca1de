"""Load on loopback: `camlens serve` (a real process) under 50 concurrent uploads.

Every upload is answered (200, or 503 with Retry-After when the bounded queue is full), the
server stays healthy, and its memory stays bounded: the peak resident memory during the
burst stays within what the admitted requests and the uploads still arriving (their shared
budget) can hold, not what 50 uploads would. Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

CONCURRENT_UPLOADS = 50
MAX_QUEUE = 4  # with one worker: at most 5 requests admitted at once
MAX_UPLOAD_MB = 5  # uploads still arriving share 5 x (5 MB + 64 KB of form) of memory
MEGABYTE = 2**20


def proc_status(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


@pytest.fixture(scope="module")
def server():
    if not Path("/proc/self/status").exists():
        pytest.skip("the memory check reads /proc (Linux)")
    command = [sys.executable, "-c", "from camlens.cli import main; main()", "serve"]
    options = ["--port", "0", "--max-queue", str(MAX_QUEUE), "--threads", "1"]
    options += ["--max-upload-mb", str(MAX_UPLOAD_MB)]
    process = subprocess.Popen(
        command + options, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    found = threading.Event()
    url: list[str] = []

    def read_log() -> None:  # also keeps the pipe drained while the server runs
        for line in process.stderr:
            if match := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read_log, daemon=True).start()
    try:
        assert found.wait(timeout=120), "camlens serve did not start"
        yield url[0], process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def noise_png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def upload_all(url: str, data: bytes, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def upload(i: int) -> httpx.Response:
            files = {"file": (f"noise{i}.png", data, "image/png")}
            return await client.post("/api/explain", files=files, data={"target": "top5"})

        return await asyncio.gather(*(upload(i) for i in range(count)))


def test_concurrent_uploads_are_all_answered_and_memory_stays_bounded(server):
    url, pid = server
    data = noise_png(1200, 1200)  # about 4.3 MB each
    warm = httpx.post(f"{url}/api/explain", files={"file": ("w.png", data)}, timeout=300)
    assert warm.status_code == 200, warm.text
    baseline = proc_status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from now

    responses = asyncio.run(upload_all(url, data, CONCURRENT_UPLOADS))

    peak = proc_status(pid, "VmHWM")
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    ok = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 503]
    assert ok, "no upload was served"
    for response in ok:
        assert response.json()["maps"][0]["label"] == warm.json()["maps"][0]["label"]
    for response in busy:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["detail"].startswith("the server is busy")

    health = httpx.get(f"{url}/healthz").json()
    assert health["status"] == "ok"
    assert health["queue"]["active"] == 0
    assert health["queue"]["finished"] == 1 + len(ok)
    again = httpx.post(f"{url}/api/explain", files={"file": ("a.png", data)}, timeout=300)
    assert again.status_code == 200

    # At most 1 + MAX_QUEUE requests are admitted, each holding its upload once, besides one
    # job's decoding and rendering; the uploads still arriving share a budget of
    # (1 + MAX_QUEUE) x (MAX_UPLOAD_MB + 64 KB). Measured: about +60 MB; with every upload
    # admitted (MAX_QUEUE = 49) about +250 MB.
    growth = peak - baseline
    arriving = (1 + MAX_QUEUE) * (MAX_UPLOAD_MB * MEGABYTE + 64 * 1024)
    bound = 100 * MEGABYTE + (1 + MAX_QUEUE) * len(data) + arriving
    print(
        f"\n{len(ok)} served, {len(busy)} refused; RSS {baseline / MEGABYTE:.0f} MB before, "
        f"peak +{growth / MEGABYTE:.0f} MB during the burst (bound {bound / MEGABYTE:.0f} MB)"
    )
    assert growth < bound
    assert os.path.exists(f"/proc/{pid}")  # still running
