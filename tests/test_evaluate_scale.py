"""``camlens evaluate`` at scale: per-image records folded into the metrics, resume after a
kill (by whole batches), torn lines, refused folders and settings, and the Ray engine's parity
with the local one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from camlens import ConfigError
from camlens.api import evaluate
from camlens.cli import main
from camlens.metrics.localization import PixelPrecisionRecall
from camlens.pipeline import RunOptions
from camlens.tasks.evaluate import RECORDS_FILE
from shapes_models import train_shapes_model
from whitebox import colour_classifier, square_image

#: What the trained-model runs measure: every localisation metric (masks too) and the fast
#: faithfulness metrics, with few deletion/insertion steps.
METRICS = "localization,mask,faithfulness"
STEPS = 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small trained CAM model and 40 annotated shape images with masks (mask folder)."""
    root = tmp_path_factory.mktemp("shapes")
    train_shapes_model(root, n=40, epochs=1)
    return root


@pytest.fixture(scope="module")
def reference(shapes):
    """An uninterrupted local run on the shapes (batches of 2) and its output folder."""
    out = shapes / "reference"
    result = evaluate(
        str(shapes / "model"), str(shapes / "data"), methods="cam", metrics=METRICS,
        steps=STEPS, out_dir=out, options=RunOptions(batch_size=2),
    )  # fmt: skip
    return result, out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RECORDS_FILE).read_text().splitlines()]


def assert_close(actual, expected, tol: float = 0.0, path: str = "") -> None:
    """Equal structure and values; floats within ``tol``."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), path
        for key in expected:
            assert_close(actual[key], expected[key], tol, f"{path}/{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, b, tol, f"{path}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert actual == pytest.approx(expected, abs=tol, rel=0), path
    else:
        assert actual == expected, path


# --- records and folding ---------------------------------------------------------------------

#: Two red squares with annotations covering half and a quarter of them: IoU 0.5 and 0.25 at
#: every map threshold (the map is 1 on the square, 0 elsewhere).
HALF = {"a.png": ((4, 4, 20, 20), (4, 4, 20, 12)), "b.png": ((40, 10, 56, 26), (40, 10, 48, 18))}


def _half_boxes(folder: Path) -> Path:
    rows = ["image,x0,y0,x1,y1,label"]
    for name, (square, box) in HALF.items():
        square_image(folder / name, [("red", square)])
        rows.append(f"{name},{','.join(map(str, box))},red")
    (folder / "boxes.csv").write_text("\n".join(rows) + "\n")
    return folder / "boxes.csv"


def test_metrics_folded_from_the_records_equal_the_in_memory_run(tmp_path):
    csv = _half_boxes(tmp_path)
    kw = {"methods": ["cam", "gradcam"], "steps": 4, "score": "logit"}
    in_memory = evaluate(colour_classifier(), csv, **kw)
    out = tmp_path / "out"
    assert evaluate(colour_classifier(), csv, out_dir=out, **kw) == in_memory
    records = _records(out)
    assert [(r["index"], Path(r["image"]).name, r["status"]) for r in records] == [
        (0, "a.png", "ok"),
        (1, "b.png", "ok"),
    ]
    for record, iou, energy in zip(records, (0.5, 0.25), (0.5, 0.25), strict=True):
        (instance,) = record["methods"]["cam"]["instances"]
        assert instance["ious"] == [iou] * 100 and instance["energy_pointing_game"] == energy
        assert len(record["methods"]["cam"]["deletion"]) == 5
    cam = in_memory["methods"]["cam"]
    assert (cam["maxboxacc"], cam["gt_known_loc"], cam["top1_loc"]) == (0.5, 0.5, 0.5)
    assert cam["pointing_game"] == 1.0 and cam["energy_pointing_game"] == 0.375
    assert [r["iou"] for r in in_memory["per_image"]["cam"]] == [0.5, 0.25]
    # Folding again from the file alone (a resume with nothing left to do) gives the same.
    (out / "metrics.json").unlink()
    resume = RunOptions(resume=True)
    assert evaluate(colour_classifier(), csv, out_dir=out, options=resume, **kw) == in_memory
    assert json.loads((out / "metrics.json").read_text()) == in_memory


def test_pixel_histograms_pool_across_images():
    rng = np.random.default_rng(0)
    maps, masks = rng.random((2, 6, 7)), rng.random((2, 6, 7)) > 0.5
    direct, pooled = PixelPrecisionRecall(), PixelPrecisionRecall()
    for heatmap, mask in zip(maps, masks, strict=True):
        direct.add(heatmap, mask)
        part = PixelPrecisionRecall()
        part.add(heatmap, mask)
        pooled.add_counts(part.object_hist, part.background_hist, part.n_images)
    assert (pooled.pxap, pooled.peak_iou, pooled.n_images) == (
        direct.pxap,
        direct.peak_iou,
        2,
    )
    with pytest.raises(ValueError, match="same thresholds"):
        pooled.add_counts(np.zeros(3), np.zeros(3))


# --- resume ----------------------------------------------------------------------------------


def test_torn_last_line_is_redone_and_done_images_are_skipped(tmp_path):
    csv = _half_boxes(tmp_path)
    square_image(tmp_path / "c.png", [("red", (20, 36, 28, 44))])
    with open(csv, "a") as handle:
        handle.write("c.png,20,36,28,44,red\n")
    kw = {"methods": ["cam"], "metrics": "localization,deletion", "steps": 4}
    out = tmp_path / "out"
    complete = evaluate(
        colour_classifier(), csv, out_dir=out, options=RunOptions(batch_size=2), **kw
    )
    lines = (out / RECORDS_FILE).read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["methods"]["cam"]["instances"][0]["energy_pointing_game"] = 0.125  # a marker
    torn = json.dumps(first) + "\n" + lines[1] + lines[2][:50]
    (out / RECORDS_FILE).write_text(torn)
    resume = RunOptions(batch_size=2, resume=True)
    resumed = evaluate(colour_classifier(), csv, out_dir=out, options=resume, **kw)
    records = _records(out)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[2] == json.loads(lines[2])  # redone
    assert records[0] == first  # skipped: the marker is still there
    energies = [r["energy_pointing_game"] for r in resumed["per_image"]["cam"]]
    assert energies == [
        0.125,
        *(r["energy_pointing_game"] for r in complete["per_image"]["cam"][1:]),
    ]


def test_a_partial_batch_is_dropped_and_redone_whole(tmp_path):
    csv = _half_boxes(tmp_path)
    kw = {"methods": ["cam"], "metrics": "maxboxacc"}
    out = tmp_path / "out"
    complete = evaluate(
        colour_classifier(), csv, out_dir=out, options=RunOptions(batch_size=2), **kw
    )
    lines = (out / RECORDS_FILE).read_text().splitlines(keepends=True)
    partial = json.loads(lines[0])
    partial["methods"]["cam"]["predicted_label"] = "partial"  # a marker
    (out / RECORDS_FILE).write_text(json.dumps(partial) + "\n")  # half of the only batch
    resume = RunOptions(batch_size=2, resume=True)
    resumed = evaluate(colour_classifier(), csv, out_dir=out, options=resume, **kw)
    assert [r["index"] for r in _records(out)] == [0, 1]
    assert _records(out) == [json.loads(line) for line in lines]  # the marker is gone: redone
    assert resumed["methods"] == complete["methods"]


def test_killed_run_resumes_with_nothing_lost_or_duplicated(shapes, reference):
    expected, _ = reference
    out = shapes / "killed"
    command = [
        sys.executable, "-m", "camlens.cli", "evaluate", str(shapes / "data"),
        "--model", str(shapes / "model"), "--out", str(out), "--method", "cam",
        "--metrics", METRICS, "--steps", str(STEPS), "--batch-size", "2", "--gallery", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    records = out / RECORDS_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = records.read_bytes().count(b"\n")
    assert 4 <= done_before < 40, "the run must be killed mid-way for this test to mean anything"
    assert not (out / "metrics.json").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["index"] for r in _records(out)] == list(range(40))
    assert json.loads((out / "metrics.json").read_text()) == expected
    assert "Metrics x methods" in (out / "report.html").read_text()
    assert not list(out.rglob(".*.tmp"))


# --- refusals --------------------------------------------------------------------------------


def test_non_empty_output_folder_is_refused_unless_resume_or_overwrite(shapes, tmp_path):
    lines = (shapes / "data" / "annotations.csv").read_text().splitlines()
    csv = tmp_path / "two.csv"
    csv.write_text("\n".join(lines[:3]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.json").write_text("{}")
    args = [
        "evaluate",
        str(csv),
        "--images",
        str(shapes / "data"),
        "--model",
        str(shapes / "model"),
    ]
    args += ["--out", str(out)]
    args += ["--method", "cam", "--metrics", "localization", "--gallery", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "is not empty" in result.output and "--resume" in result.output
    assert "--overwrite" in result.output
    assert CliRunner().invoke(main, [*args, "--resume", "--overwrite"]).exit_code == 2
    # --overwrite removes only what camlens wrote: the user's metrics.json is in the way, and
    # the run stops before any work, leaving the folder as it was.
    result = CliRunner().invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 2 and "never replaces a file it did not write" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes.txt"]
    (out / "metrics.json").unlink()
    for _ in range(2):  # the second time, --overwrite replaces camlens' own outputs
        result = CliRunner().invoke(main, [*args, "--overwrite"])
        assert result.exit_code == 0, result.output
        assert (out / "notes.txt").read_text() == "mine"  # never removes the user's files
        assert json.loads((out / "metrics.json").read_text())["n_images"] == 2
        assert len(_records(out)) == 2 and (out / "gallery" / "cam").is_dir()


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    csv = _half_boxes(tmp_path)
    out = tmp_path / "out"
    evaluate(colour_classifier(), csv, methods=["cam"], metrics="maxboxacc", out_dir=out)
    resume = RunOptions(resume=True)
    with pytest.raises(ConfigError, match=r"settings differ .*\(methods, metrics, steps\)"):
        evaluate(
            colour_classifier(), csv, methods=["gradcam"], metrics="deletion", steps=7,
            out_dir=out, options=resume,
        )  # fmt: skip
    (out / RECORDS_FILE).write_text((out / RECORDS_FILE).read_text().splitlines()[0] + "\n")
    (out / ".camlens" / "run.json").unlink()
    with pytest.raises(ConfigError, match=r"holds no camlens run settings"):
        evaluate(colour_classifier(), csv, methods=["cam"], out_dir=out, options=resume)
    with pytest.raises(ConfigError, match="give out_dir"):
        evaluate(colour_classifier(), csv, methods=["cam"], options=resume)


# --- Ray -------------------------------------------------------------------------------------


def test_ray_engine_equals_local_engine(shapes, reference):
    ray = pytest.importorskip("ray")
    expected, local = reference
    out = shapes / "ray"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = evaluate(
            str(shapes / "model"), str(shapes / "data"), methods="cam", metrics=METRICS,
            steps=STEPS, out_dir=out,
            options=RunOptions(batch_size=2, engine="ray", workers=2, progress=False),
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert_close(result, expected, tol=1e-6)
    assert expected["methods"]["cam"]["pxap"] is not None  # the pixel histograms went through
    assert_close(_records(out), _records(local), tol=1e-6)
    assert json.loads((out / "metrics.json").read_text()) == result
