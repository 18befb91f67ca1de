"""The one pipeline: output-folder rules, resume after a kill, torn lines, Ray parity, and the
explain job on it."""

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

from camlens.api.explaining import run_explain
from camlens.cli import main
from camlens.errors import ConfigError
from camlens.pipeline import (
    OutputFolder,
    RunOptions,
    chunks,
    drop_torn_tail,
    iter_jsonl,
    prefetched,
)


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
    options = RunOptions(batch_size=1, progress=False)
    run_explain(builtin_model, photos, out, options=options)
    complete = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(complete[:2]) + complete[2][:40])  # torn
    drop_torn_tail(out / "results.jsonl")
    records = list(iter_jsonl(out / "results.jsonl"))
    assert [r["input"] for r in records] == list(map(str, photos[:2]))
    assert (out / "results.jsonl").read_text() == "".join(complete[:2])
    resumed = RunOptions(batch_size=1, progress=False, resume=True)
    summary = run_explain(builtin_model, photos, out, options=resumed)
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
    run_explain(
        builtin_model,
        photos,
        local,
        target="top2",
        options=RunOptions(batch_size=4, progress=False),
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        options = RunOptions(batch_size=4, engine="ray", workers=2, progress=False)
        run_explain("efficientnet_lite0", photos, remote, target="top2", options=options)
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


# --- the output folder's rules ---------------------------------------------------------------


def _explain_cli(*args: str) -> object:
    return CliRunner().invoke(main, ["explain", *args])


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    photos = _noise_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    base = [str(tmp_path / "in"), "--out", str(out), "--batch-size", "2", "--target", "top2"]
    assert _explain_cli(*base).exit_code == 0
    before = (out / "results.jsonl").read_bytes()
    changed = _explain_cli(
        str(tmp_path / "in"), "--out", str(out), "--batch-size", "2", "--target", "top1",
        "--method", "gradcam", "--resume",
    )  # fmt: skip
    assert changed.exit_code == 2
    assert "settings differ" in changed.output
    assert "method" in changed.output and "target" in changed.output
    assert "--overwrite" in changed.output  # the way out, spelled for the command line
    assert (out / "results.jsonl").read_bytes() == before  # nothing was touched
    assert _explain_cli(*base, "--resume").exit_code == 0  # the same settings resume fine
    assert len(_records(out)) == len(photos)


def test_resume_with_other_inputs_is_refused(tmp_path):
    photos = _noise_images(tmp_path / "in", 4)
    out = tmp_path / "out"
    assert _explain_cli(*map(str, photos), "--out", str(out)).exit_code == 0
    fewer = _explain_cli(*map(str, photos[:2]), "--out", str(out), "--resume")
    assert fewer.exit_code == 2
    assert "n_inputs: 4 then, 2 now" in fewer.output
    assert len(_records(out)) == 4


def test_overwrite_and_demo_remove_only_what_camlens_wrote(tmp_path):
    photos = _noise_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert _explain_cli(*map(str, photos), "--out", str(out)).exit_code == 0
    ours = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    (out / "overlays" / "my_own.png").write_bytes(b"mine")
    (out / "overlays" / "vacation.jpg").write_bytes(b"mine too")
    (out / "notes.txt").write_text("mine")
    again = _explain_cli(str(photos[0]), "--out", str(out), "--overwrite", "--target", "top2")
    assert again.exit_code == 0, again.output
    assert (out / "overlays" / "my_own.png").read_bytes() == b"mine"
    assert (out / "overlays" / "vacation.jpg").read_bytes() == b"mine too"
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["input"] for r in _records(out)] == [str(photos[0])]
    # The second input's files from the first run are gone: they were camlens'.
    assert not list((out / "overlays").glob("00001_*"))
    assert not (out / "raw" / "00001_img001.npz").exists()
    assert len(ours) > 4


def test_a_fresh_run_never_replaces_a_file_it_did_not_write(tmp_path):
    photos = _noise_images(tmp_path / "in", 1)
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "00000_img000_c0.png").write_bytes(b"mine")
    folder = OutputFolder(out)
    folder.prepare(resume=False, overwrite=True)  # nothing of camlens' to remove
    with pytest.raises(ConfigError, match="did not write"):
        folder.path("overlays/00000_img000_c0.png")
    assert (out / "overlays" / "00000_img000_c0.png").read_bytes() == b"mine"
    assert photos


def test_demo_follows_the_folder_rules(tmp_path):
    out = tmp_path / "dm"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "my_own.png").write_bytes(b"mine")
    refused = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert sorted(p.name for p in out.rglob("*")) == ["my_own.png", "overlays"]


def test_a_configuration_error_creates_nothing(tmp_path):
    photos = _noise_images(tmp_path / "in", 1)
    out = tmp_path / "out"
    typo = _explain_cli(str(photos[0]), "--out", str(out), "--target", "Egyptian cta")
    assert typo.exit_code == 2 and "Egyptian cat" in typo.output
    assert not out.exists()
    late = _explain_cli(str(photos[0]), "--out", str(out), "--layer", "no.such.layer")
    assert late.exit_code == 2 and not out.exists()
    fixed = _explain_cli(str(photos[0]), "--out", str(out), "--target", "Egyptian cat")
    assert fixed.exit_code == 0, fixed.output


def test_out_naming_a_file_is_a_usage_error(tmp_path):
    photos = _noise_images(tmp_path / "in", 1)
    target = tmp_path / "results.txt"
    target.write_text("mine")
    result = _explain_cli(str(photos[0]), "--out", str(target))
    assert result.exit_code == 2 and "is a file" in result.output
    assert target.read_text() == "mine"


def test_record_log_keeps_arrays_and_resumes_by_whole_batches(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    folder.open("test", {"a": 1}, resume=False, overwrite=False)
    log = folder.log("records.jsonl", "parts")
    batches = [[0, 1], [2, 3], [4]]
    for batch in batches:
        records = [
            {"index": i, "status": "ok", "arrays": {"map": np.full((2, 2), i, np.float32)}}
            for i in batch
        ]
        records[-1]["status"] = "error"
        records[-1].pop("arrays")  # an error record has no arrays
        log.append(records, batch[0])
    folder.close()
    back = list(log.records())
    assert [r["index"] for r in back] == [0, 1, 2, 3, 4]
    assert [float(r["arrays"]["map"][0, 0]) for r in back if "arrays" in r] == [0.0, 2.0]
    assert "arrays" not in back[1] and back[1]["status"] == "error"
    # A torn last line and a damaged part: the resume keeps the whole batches before them.
    lines = log.path.read_text().splitlines(keepends=True)
    log.path.write_text("".join(lines[:3]) + lines[3][:10])
    assert log.resume_point([0, 2, 4], 5) == 2
    assert [r["index"] for r in log.records()] == [0, 1]
    (folder.root / "parts" / "part-000000000.npz").write_bytes(b"damaged")
    assert log.resume_point([0, 2, 4], 5) == 0
    assert log.path.read_text() == ""


def test_manifest_lists_what_was_written_and_overwrite_removes_exactly_that(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    folder.open("test", {}, resume=False, overwrite=False)
    folder.path("a/b/c.txt").write_text("x")
    folder.path("top.txt").write_text("y")
    folder.close()
    (tmp_path / "out" / "a" / "mine.txt").write_text("mine")
    assert set(folder.written()) >= {"a/", "a/b/", "a/b/c.txt", "top.txt", ".camlens/run.json"}
    again = OutputFolder(tmp_path / "out")
    assert again.remove_previous() == 3
    left = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert left == ["a", "a/mine.txt"]  # a/b/ was camlens' and is empty: removed; a/ is not


def test_ctrl_c_exits_130_and_the_run_resumes(tmp_path):
    photos = _noise_images(tmp_path / "in", 40)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "camlens", "explain", str(tmp_path / "in"),
        "--out", str(out), "--batch-size", "2",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_complete(out, photos)


# --- hostile and large inputs ----------------------------------------------------------------


def test_a_fifo_among_the_inputs_is_an_error_record_and_nothing_hangs(tmp_path):
    photos = _noise_images(tmp_path / "in", 1)
    os.mkfifo(tmp_path / "in" / "b.png")  # reading it would block until a writer comes
    out = tmp_path / "out"
    command = [sys.executable, "-m", "camlens", "explain", str(tmp_path / "in"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # some inputs failed, the rest was processed
    records = {Path(r["input"]).name: r for r in _records(out)}
    assert records["b.png"]["status"] == "error"
    assert "named pipe (FIFO)" in records["b.png"]["error"]
    assert records[photos[0].name]["status"] == "ok"


def test_overlays_are_bounded_and_boxes_stay_in_original_pixels(tmp_path, builtin_model):
    from camlens.tasks.explain import Style

    big = tmp_path / "in" / "big.png"
    big.parent.mkdir()
    Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (1200, 3000, 3), dtype=np.uint8)
    ).save(big)
    options = RunOptions(progress=False)
    bounded, full = tmp_path / "bounded", tmp_path / "full"
    run_explain(builtin_model, [big], bounded, style=Style(overlay_size=1000), options=options)
    run_explain(builtin_model, [big], full, style=Style(overlay_size=0), options=options)
    (small,), (large,) = _records(bounded), _records(full)
    assert small["size"] == large["size"] == [3000, 1200]
    assert small["maps"][0]["box"] == large["maps"][0]["box"]  # in original pixels, both
    with Image.open(bounded / small["maps"][0]["overlay"]) as image:
        assert image.size == (1000, 400)
    with Image.open(full / large["maps"][0]["overlay"]) as image:
        assert image.size == (3000, 1200)


def test_an_image_over_the_pixel_budget_is_an_error_record_naming_the_option(tmp_path):
    photos = _noise_images(tmp_path / "in", 2, size=48)
    out = tmp_path / "out"
    # The images are 48 x 48 (2,304 pixels) and 49 x 48 (2,352): a budget of 2,320 takes one.
    result = _explain_cli(str(tmp_path / "in"), "--out", str(out), "--max-pixels", "2320")
    assert result.exit_code == 1
    first, second = _records(out)
    assert (first["input"], first["status"]) == (str(photos[0]), "ok")
    assert (second["input"], second["status"]) == (str(photos[1]), "error")
    assert "2,352 pixels, above the limit of 2,320" in second["error"]
    assert "--max-pixels on the command line" in second["error"]


def _two_classes(folder: Path) -> Path:
    for label in ("a", "b"):
        _noise_images(folder / label, 3)
    return folder


@pytest.mark.parametrize(
    "command", ["explain", "demo", "evaluate", "audit", "train", "make-dataset"]
)
def test_an_output_folder_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, command):
    photos = _noise_images(tmp_path / "in", 1)
    csv = tmp_path / "boxes.csv"
    csv.write_text(f"image,x0,y0,x1,y1,label\n{photos[0]},0,0,8,8,0\n")
    out = "/proc/camlens-cannot-write-here"  # /proc refuses new entries, even for root
    arguments = {
        "explain": [str(photos[0])],
        "demo": [],
        "evaluate": [str(csv), "--method", "cam"],
        "audit": [str(tmp_path / "in")],
        "train": [str(_two_classes(tmp_path / "classes")), "--epochs", "1"],
        "make-dataset": ["shapes", "--n", "6"],
    }[command]
    result = CliRunner().invoke(main, [command, *arguments, "--out", out])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and out in result.output


def test_outputs_written_in_threads_equal_those_written_one_by_one(
    tmp_path, builtin_model, monkeypatch
):
    """A batch's overlays and raw maps are written from a thread pool; the files and records
    are byte for byte those of a run that writes them one image at a time."""
    import camlens.tasks.explain as explain_task

    photos = _noise_images(tmp_path / "in", 6, size=64)
    options = RunOptions(batch_size=6, progress=False)
    run_explain(builtin_model, photos, tmp_path / "threads", target="top2", options=options)
    monkeypatch.setattr(explain_task, "output_threads", lambda n_images: 1)
    run_explain(builtin_model, photos, tmp_path / "serial", target="top2", options=options)
    threaded, serial = _records(tmp_path / "threads"), _records(tmp_path / "serial")
    assert threaded == serial
    written = [m["overlay"] for r in serial for m in r["maps"]] + [r["raw"] for r in serial]
    assert len(written) == 6 * 3
    for relative in written:
        ours = (tmp_path / "threads" / relative).read_bytes()
        assert ours == (tmp_path / "serial" / relative).read_bytes(), relative


def test_output_threads_use_the_cores_but_never_more_threads_than_images():
    from camlens.tasks.explain import output_threads

    cores = len(os.sched_getaffinity(0))
    assert output_threads(1) == 1
    assert output_threads(0) == 1
    assert output_threads(64) == min(4, cores)


def test_the_manifest_records_each_path_once_when_threads_write_together(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    folder.prepare(resume=False, overwrite=False)
    relatives = [f"overlays/sub{i % 3}/file{i}.png" for i in range(200)]
    barrier = threading.Barrier(8)

    def reserve(chunk: list[str]) -> None:
        barrier.wait()
        for relative in chunk:
            folder.path(relative).write_bytes(b"x")

    threads = [threading.Thread(target=reserve, args=(relatives[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    folder.close()
    written = [path for path in folder.written() if not path.startswith(".camlens")]
    folders = ["overlays/", "overlays/sub0/", "overlays/sub1/", "overlays/sub2/"]
    assert sorted(written) == sorted(relatives + folders)  # each path exactly once


def test_a_resume_removes_the_temporaries_of_unfinished_writes_and_nothing_else(tmp_path):
    """A kill during ``atomic_path`` leaves ``.<name>.<random>.tmp`` beside a recorded file:
    a resume removes it; a file of the user's with a similar name stays."""
    from camlens.pipeline import OutputFolder

    out = tmp_path / "out"
    folder = OutputFolder(out)
    folder.open("explain", {"method": "cam"}, resume=False, overwrite=False)
    recorded = folder.path("overlays/a.png")
    recorded.write_bytes(b"png")
    folder.close()
    stale = out / "overlays" / ".a.png.k3x9_q1z.tmp"
    stale.write_bytes(b"half")
    users = [out / "overlays" / ".b.png.k3x9_q1z.tmp", out / ".mine.abc.tmp"]
    for path in users:
        path.write_bytes(b"mine")

    OutputFolder(out).open("explain", {"method": "cam"}, resume=True, overwrite=False)
    assert not stale.exists()
    assert recorded.read_bytes() == b"png"
    assert all(path.read_bytes() == b"mine" for path in users)
