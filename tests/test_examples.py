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
