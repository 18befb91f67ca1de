"""The batch runner: refusing non-empty folders, resume after a kill, torn lines, Ray parity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from camlens.cli import main
from camlens.runner import chunks, prefetched, repair_results, run_explain


def _noise_images(folder: Path, n: int, size: int = 48) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size + i % 5, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _assert_complete(out: Path, inputs: list[Path]) -> None:
    records = _records(out)
    assert [r["input"] for r in records] == [str(p) for p in inputs]  # once each, in order
    for record in records:
        assert record["status"] == "ok"
        with Image.open(out / record["maps"][0]["overlay"]) as image:
            image.load()
        with np.load(out / record["raw"]) as raw:
            assert np.isfinite(raw["raw"]).all()
    assert not list(out.rglob(".*.tmp"))


def test_non_empty_output_folder_is_refused_without_resume_or_overwrite(tmp_path):
    photos = _noise_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["explain", *map(str, photos), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--resume" in result.output and "--overwrite" in result.output
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine"  # overwrite never removes the user's files
    assert CliRunner().invoke(main, [*args, "--overwrite", "--resume"]).exit_code == 2


def test_torn_last_line_is_dropped_and_redone(tmp_path, builtin_model):
    photos = _noise_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    run_explain(builtin_model, photos, out, progress=False)
    complete = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(complete[:2]) + complete[2][:40])  # torn
    assert [r["input"] for r in repair_results(out / "results.jsonl")] == list(map(str, photos[:2]))
    assert (out / "results.jsonl").read_text() == "".join(complete[:2])
    summary = run_explain(builtin_model, photos, out, resume=True, progress=False)
    assert (summary.n_skipped, summary.n_ok) == (2, 3)
    _assert_complete(out, photos)
    redone, original = _records(out)[2], json.loads(complete[2])
    for key in ("input", "raw", "size", "layer"):
        assert redone[key] == original[key]
    assert [(m["class"], m["box"], m["overlay"]) for m in redone["maps"]] == [
        (m["class"], m["box"], m["overlay"]) for m in original["maps"]
    ]


def test_killed_run_resumes_with_nothing_lost_or_duplicated(tmp_path):
    photos = _noise_images(tmp_path / "in", 40)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "camlens.cli", "explain", str(tmp_path / "in"),
        "--out", str(out), "--batch-size", "2",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = results.read_text().count("\n")
    assert 4 <= done_before < 40, "the run must be killed mid-way for this test to mean anything"
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_complete(out, photos)


def test_ray_engine_equals_local_engine(tmp_path, builtin_model):
    ray = pytest.importorskip("ray")
    photos = _noise_images(tmp_path / "in", 6, size=64)
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_explain(builtin_model, photos, local, target="top2", batch_size=4, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_explain(
            "efficientnet_lite0", photos, remote, target="top2", batch_size=4,
            engine="ray", workers=2, progress=False,
        )  # fmt: skip
    finally:
        ray.shutdown()
    ours, theirs = _records(local), _records(remote)
    assert [r["input"] for r in theirs] == [r["input"] for r in ours]
    for a, b in zip(ours, theirs, strict=True):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert [m["box"] for m in a["maps"]] == [m["box"] for m in b["maps"]]
        with np.load(local / a["raw"]) as x, np.load(remote / b["raw"]) as y:
            np.testing.assert_allclose(x["raw"], y["raw"], rtol=1e-4, atol=1e-4)


def test_prefetched_loads_the_next_batch_while_the_current_one_is_used():
    started = {i: threading.Event() for i in range(5)}
    release = threading.Event()

    def load(i: int) -> int:
        started[i].set()
        if i >= 2:  # the second batch waits until the test has seen it start
            assert release.wait(10)
        return i * 10

    batches = prefetched(chunks(range(5), 2), load)
    batch, values = next(batches)
    assert (list(batch), values) == ([0, 1], [0, 10])
    # The second batch is already loading while the caller holds the first.
    assert started[2].wait(10) and started[3].wait(10)
    assert not started[4].is_set()  # ... but not the third: one batch ahead only
    release.set()
    assert [(list(b), v) for b, v in batches] == [([2, 3], [20, 30]), ([4], [40])]
    assert list(prefetched([], load)) == []
