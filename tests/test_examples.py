"""The README's runnable example works end to end (at a small size, to keep it quick)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shortcut_demo.py"


def test_shortcut_demo_plants_trains_and_shows_the_tag(tmp_path):
    figures, work = tmp_path / "figures", tmp_path / "work"
    command = [sys.executable, str(EXAMPLE), "--out", str(figures), "--work", str(work)]
    command += ["--n", "90", "--size", "32", "--epochs", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    for name in ("train_shortcut_cam.png", "train_clean_cam.png"):
        with Image.open(figures / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    summary = json.loads((work / "summary.json").read_text())
    printed = done.stdout[done.stdout.index('{\n  "shortcut"') :]
    assert json.loads(printed) == summary
    shortcut, clean = summary["shortcut"], summary["clean"]
    # Both trained models are CAM networks: the maps decompose the scores exactly.
    assert shortcut["identity_error"] < 1e-4 and clean["identity_error"] < 1e-4
    # The model learned the tag: its square map sits in the tag's quarter (uniform: 0.25),
    # and pasting the tag turns circles and triangles into squares (measured: 0.25 -> 1.0).
    assert shortcut["square_map_mass_in_tag_quarter"] > 0.4
    after, before = (shortcut[f"others_predicted_square_{w}_paste"] for w in ("after", "before"))
    assert after >= before + 0.3
    assert clean["val_images"] == 18 and 0.0 <= clean["maxboxacc"] <= 1.0
    records = [
        json.loads(line)
        for line in (work / "explain_shortcut" / "results.jsonl").read_text().splitlines()
    ]
    assert records and all(r["status"] == "ok" for r in records)


XRAY_STORY = EXAMPLE.parent / "xray_story.py"


def test_xray_story_runs_from_dicom_films_to_the_audit(tmp_path):
    """The x-ray example at a small size: DICOM films written, both models trained, measured
    on the same held-out films, audited, the figure drawn (the numbers it prints at full size
    are the README's; here the models are barely trained)."""
    figures, work = tmp_path / "figures", tmp_path / "work"
    command = [sys.executable, str(XRAY_STORY), "--out", str(figures), "--work", str(work)]
    command += ["--n", "120", "--size", "96", "--epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    findings = sorted(p.suffix for p in (work / "shortcut" / "images" / "finding").iterdir())
    assert findings == [".dcm"] * 60  # 80 % of hospital A's 60 films + 20 % of hospital B's
    summary = json.loads((work / "summary.json").read_text())
    assert summary["validation_films"] == 24  # camlens train holds out 20 % of each class
    for name in ("shortcut", "clean"):
        numbers = summary[name]
        assert numbers["identity_error"] < 1e-4  # CAM models: the maps sum to the logits
        looks = [numbers["finding_maps"], *numbers["predicted_class_maps_by_hospital"].values()]
        assert sorted(numbers["predicted_class_maps_by_hospital"]) == ["A", "B"]
        for where in looks:
            assert 0.05 < where["lung_area_share"] < 0.4
            assert 0.0 <= where["energy_in_lungs"] + where["energy_on_marker"] <= 1.0
    assert (work / "audit" / "audit.json").is_file()
    with Image.open(figures / "xray_maps.png") as image:
        assert image.format == "PNG" and min(image.size) > 200


DENSE_EXAMPLE = EXAMPLE.parent / "detection_segmentation.py"


def test_detection_segmentation_example_trains_explains_and_measures(tmp_path):
    """The detector/segmenter example at a tiny size: both models trained a few steps, loaded
    by name from their weights files, measured and drawn (the README's numbers come from
    the full size; here the models are barely trained, so only the bookkeeping is checked)."""
    figures, work = tmp_path / "figures", tmp_path / "work"
    command = [sys.executable, str(DENSE_EXAMPLE), "--out", str(figures), "--work", str(work)]
    command += ["--n", "12", "--size", "64", "--steps", "3", "--limit", "4"]
    command += ["--repeats", "1", "--masks", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((work / "summary.json").read_text())
    printed = done.stdout[done.stdout.index('{\n  "trained"') :]
    assert json.loads(printed) == summary
    assert (work / "detector.safetensors").is_file() and (work / "labels.txt").is_file()
    for row in summary["segmentation"]:
        assert 0.0 <= row["uniform_map_baseline"] <= 1.0 and row["maps"] <= 8
        assert row["energy_pointing_game"] is None or 0.0 <= row["energy_pointing_game"] <= 1
    for row in summary["detection"]:
        if row["detections"]:
            assert 0.0 <= row["peak_in_own_box"] <= 1.0
    for model in ("detector", "segmenter"):
        timings = summary["seconds_per_image"][model]
        assert set(timings) == {
            "forward",
            "gradcam",
            "gradcam++",
            "hirescam",
            "eigencam",
            "scorecam",
            "ablationcam",
            "drise",
        }
        assert all(value > 0 for value in timings.values())
    for name in ("detection_maps.png", "segmentation_maps.png"):
        with Image.open(figures / name) as image:
            assert image.format == "PNG"
