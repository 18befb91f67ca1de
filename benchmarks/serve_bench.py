"""Peak memory of ``camlens serve`` for hostile and large uploads (issue: hostile inputs).

Starts ``camlens serve`` (built-in model, CAM) in its own process on a free loopback port,
answers one small request to load the model and warm up, then posts each upload below, one
at a time. For each it reads the server's resident memory before the request ("idle") and
its peak during the request (the kernel's high-water mark ``VmHWM``, reset before each
request through ``/proc/PID/clear_refs``), and reports the difference with the answer's
status:

* a 9400 x 9400 PNG of about 100 kB (88 Mpx, just under Pillow's own limit): over the
  default pixel budget (40 Mpx), refused with 400;
* an 80,000,000 x 1 PNG: refused alike;
* the same 9400 x 9400 PNG with ``--max-pixels 90000000`` (a second server): decoded;
* a 6300 x 6300 PNG (39.7 Mpx, the largest square the default budget accepts);
* a 4000 x 3000 JPEG (12 MP, a phone photo): decoded at reduced scale (``draft``).

Usage::

    .venv/bin/python benchmarks/serve_bench.py --out benchmarks/results/serve.md
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from camlens.io.samples import sample_image
from section import generated_by, write_section

MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sparse_png(width: int, height: int) -> bytes:
    """A mostly flat grey image with a few dark squares: a tiny file, a large decode."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    step = max(1, min(width, height) // 8)
    for k in range(1, 8):
        x, y = min(k * step, width - 1), min(k * step, height - 1)
        image.paste((40, 40, 40), (x, y, min(width, x + step // 2), min(height, y + step // 2)))
    data = io.BytesIO()
    image.save(data, format="PNG")
    return data.getvalue()


def photo_jpeg(width: int, height: int) -> bytes:
    data = io.BytesIO()
    sample_image("chelsea").resize((width, height), Image.BICUBIC).save(data, "JPEG", quality=90)
    return data.getvalue()


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


class Server:
    """``camlens serve`` in a child process on a free loopback port."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        camlens = Path(sys.executable).with_name("camlens")
        command = [str(camlens), "serve", "--port", str(self.port), "--method", "cam", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.process.stderr.read()!r}")
            time.sleep(0.2)

    def post(self, name: str, data: bytes) -> httpx.Response:
        return httpx.post(
            f"{self.url}/api/explain",
            files={"file": (name, data)},
            data={"target": "top1"},
            timeout=600,
        )

    def measure(self, name: str, data: bytes) -> dict:
        """Post ``data``; the server's idle RSS before it and its peak above idle during it."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # resets VmHWM
        idle = memory_kib(self.process.pid, "VmRSS")
        started = time.perf_counter()
        response = self.post(name, data)
        seconds = time.perf_counter() - started
        peak = memory_kib(self.process.pid, "VmHWM")
        detail = response.json().get("detail", "") if response.status_code != 200 else ""
        return {
            "status": response.status_code,
            "idle_mib": idle / 1024,
            "above_idle_mib": (peak - idle) / 1024,
            "seconds": seconds,
            "detail": detail,
        }

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    args = parser.parse_args()
    warm_up = photo_jpeg(451, 300)
    big_png = sparse_png(9400, 9400)
    cases = [
        ("default", "9400 x 9400 PNG", big_png),
        ("default", "80,000,000 x 1 PNG", sparse_png(80_000_000, 1)),
        ("default", "6300 x 6300 PNG (39.7 Mpx)", sparse_png(6300, 6300)),
        ("default", "4000 x 3000 JPEG (12 MP)", photo_jpeg(4000, 3000)),
        ("--max-pixels 90000000", "9400 x 9400 PNG", big_png),
    ]
    rows = []
    for options in ("default", "--max-pixels 90000000"):
        server = Server(*([] if options == "default" else options.split()))
        try:
            assert server.post("warm.jpg", warm_up).status_code == 200
            assert server.post("warm.jpg", warm_up).status_code == 200
            for case_options, label, data in cases:
                if case_options != options:
                    continue
                result = server.measure("upload.png", data)
                rows.append((options, label, len(data), result))
                print(options, label, len(data), result, flush=True)
        finally:
            server.close()
    lines = [
        "## `camlens serve`: peak memory per upload",
        "",
        f"{generated_by('serve_bench.py')} `camlens serve` (built-in EfficientNet-Lite0, CAM, "
        "top-1), warmed up with two small requests; each upload posted alone. `above idle`: "
        "the server's peak resident memory during the request (VmHWM, reset before it) minus "
        "its resident memory just before.",
        "",
        "| server | upload | file kB | answer | idle MiB | peak above idle MiB | s |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for options, label, size, r in rows:
        answer = str(r["status"]) + (" (over the pixel budget)" if r["status"] == 400 else "")
        lines.append(
            f"| {options} | {label} | {size / 1000:.0f} | {answer} | {r['idle_mib']:.0f} | "
            f"{r['above_idle_mib']:.0f} | {r['seconds']:.2f} |"
        )
    lines.append("")
    write_section(lines, args.out)


if __name__ == "__main__":
    main()
