"""``camlens audit`` with an output folder: the stored map pass (``maps.jsonl`` and
``maps/``), resume by whole batches after a kill or a lost part with the result of an
uninterrupted run, refused folders and settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from camlens.api import audit
from camlens.cli import main
from camlens.errors import ConfigError
from camlens.pipeline import RunOptions
from camlens.pipeline.folder import RUN_FILE
from camlens.shortcuts import AuditSettings
from camlens.tasks.audit import AuditTask, AuditWorker
from shapes_models import train_shapes_model

N_IMAGES = 120
BATCH = 2  # 60 parts: a killed run stops mid-way
N_PARTS = N_IMAGES // BATCH
CONFIRM = 40
PARTS_DIR = AuditTask.parts_dir
RECORDS = AuditTask.records_file


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """Shapes with a corner tag on the circles (annotated) and a small CAM model trained on
    them, so that the audit has a hotspot to test."""
    root = tmp_path_factory.mktemp("tagged")
    train_shapes_model(
        root, n=N_IMAGES, epochs=4, shortcut="corner-tag", shortcut_class="circle",
        shortcut_position="top-right",
    )  # fmt: skip
    return root


def _args(root: Path, **options) -> dict:
    return {
        "annotations": str(root / "data" / "annotations.csv"),
        "settings": AuditSettings(confirm_images=CONFIRM),
        "options": RunOptions(**{"batch_size": BATCH, "progress": False, **options}),
    }


def _cli_args(root: Path, out: Path) -> list[str]:
    return [
        "audit", str(root / "data" / "images"), "--model", str(root / "model"),
        "--annotations", str(root / "data" / "annotations.csv"), "--out", str(out),
        "--batch-size", str(BATCH), "--confirm-images", str(CONFIRM),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tagged):
    """An uninterrupted audit with an output folder: its ``audit.json`` and folder."""
    out = tagged / "reference"
    audit(str(tagged / "model"), str(tagged / "data" / "images"), out, **_args(tagged))
    return _audit(out), out


def _audit(out: Path) -> dict:
    result = json.loads((out / "audit.json").read_text())
    result.pop("seconds")
    return result


def _parts(out: Path) -> list[Path]:
    return sorted((out / PARTS_DIR).glob("part-*.npz"))


def _without_figures(value):
    if isinstance(value, dict):
        return {k: _without_figures(v) for k, v in value.items() if k != "figures"}
    if isinstance(value, list):
        return [_without_figures(v) for v in value]
    return value


def test_every_batch_is_stored_and_the_result_does_not_depend_on_it(tagged, reference):
    expected, out = reference
    assert [p.name for p in _parts(out)] == [f"part-{i:09d}.npz" for i in range(0, 120, BATCH)]
    assert sorted(p.name for p in out.iterdir()) == [
        ".camlens", "audit.json", "figures", PARTS_DIR, RECORDS, "report.html"
    ]  # fmt: skip
    assert any(f["class"] == "circle" and f["flip_rate"] is not None for f in expected["flags"])
    run = json.loads((out / RUN_FILE).read_text())
    settings = run["settings"]
    assert run["task"] == "audit-maps"
    assert (settings["n_inputs"], settings["batch_size"], settings["seed"]) == (N_IMAGES, BATCH, 0)
    assert settings["confirm_images"] == CONFIRM and settings["method"] == "cam"
    # Without an output folder nothing is kept and the audit is the same.
    in_memory = audit(
        str(tagged / "model"), str(tagged / "data" / "images"), None, report=False,
        **_args(tagged),
    )  # fmt: skip
    in_memory.pop("seconds")
    assert in_memory == _without_figures(expected)


def test_resume_recomputes_from_the_first_lost_batch(tagged, reference, tmp_path, monkeypatch):
    expected, done = reference
    out = tmp_path / "out"
    shutil.copytree(done, out)
    (out / "audit.json").unlink()  # killed during the map pass: no result yet
    parts = _parts(out)
    parts[20].write_bytes(b"not an npz")  # damaged: its batch and every later one are redone
    leftover = out / PARTS_DIR / f".{parts[30].name}.k3j2.tmp"
    leftover.write_bytes(b"torn write")  # what a write killed mid-way leaves
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts[:20]}
    computed: list[int] = []
    original = AuditWorker.process

    def counting(self, batch, loaded):
        computed.extend(index for index, _ in batch)
        return original(self, batch, loaded)

    monkeypatch.setattr(AuditWorker, "process", counting)
    result = audit(
        str(tagged / "model"), str(tagged / "data" / "images"), out,
        **_args(tagged, resume=True),
    )  # fmt: skip
    assert computed == list(range(20 * BATCH, N_IMAGES))
    assert _audit(out) == expected
    result.pop("seconds")
    assert result == expected
    assert len(_parts(out)) == N_PARTS and not leftover.exists()
    assert all((p.stat().st_mtime_ns, p.read_bytes()) == v for p, v in kept.items())
    # Resuming a finished audit reads everything back: no map is computed again.
    computed.clear()
    audit(
        str(tagged / "model"), str(tagged / "data" / "images"), out,
        **_args(tagged, resume=True),
    )  # fmt: skip
    assert computed == [] and _audit(out) == expected


def test_killed_audit_resumes_with_the_uninterrupted_result(tagged, reference):
    expected, _ = reference
    out = tagged / "killed"
    command = [sys.executable, "-m", "camlens", *_cli_args(tagged, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / PARTS_DIR).is_dir() and len(_parts(out)) >= 4:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(_parts(out))
    assert 4 <= done_before < N_PARTS, "the run must be killed mid-way for this test to mean much"
    assert not (out / "audit.json").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert _audit(out) == expected
    assert len(_parts(out)) == N_PARTS and not list(out.rglob(".*.tmp"))
    assert "Class circle" in (out / "report.html").read_text()


def test_resume_with_ray_computes_the_lost_slices_alike(tagged, reference, tmp_path):
    ray = pytest.importorskip("ray")
    expected, done = reference
    out = tmp_path / "out"
    shutil.copytree(done, out)
    parts = _parts(out)
    for number in (3, 4, 11, N_PARTS - 1):  # the run resumes after batch 2
        parts[number].unlink()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        audit(
            str(tagged / "model"), str(tagged / "data" / "images"), out,
            **_args(tagged, resume=True, engine="ray", workers=1),
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert _audit(out) == expected and len(_parts(out)) == N_PARTS


# --- refusals --------------------------------------------------------------------------------


def test_non_empty_output_folder_is_refused_unless_resume_or_overwrite(tagged, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "audit.json").write_text("{}")
    args = [*_cli_args(tagged, out), "--max-images", "30", "--batch-size", "8"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2
    assert "is not empty" in refused.output and "--resume" in refused.output
    assert "--overwrite" in refused.output
    both = CliRunner().invoke(main, [*args, "--resume", "--overwrite"])
    assert both.exit_code == 2 and "exclude each other" in both.output
    orphan = CliRunner().invoke(main, [*args, "--resume"])  # no run settings to check
    assert orphan.exit_code == 2 and RUN_FILE in orphan.output
    # --overwrite removes only what camlens wrote: an audit.json it did not write is never
    # replaced, and the refusal comes before the map pass, leaving nothing behind.
    foreign = CliRunner().invoke(main, [*args, "--overwrite"])
    assert foreign.exit_code == 2 and "camlens has no record of writing it" in foreign.output
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "notes.txt"]
    (out / "audit.json").unlink()
    replaced = CliRunner().invoke(main, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert (out / "notes.txt").read_text() == "mine"  # never removes the user's files
    assert json.loads((out / "audit.json").read_text())["n_images"] == 30
    assert len(_parts(out)) == 4  # 30 images in slices of 8
    again = CliRunner().invoke(main, [*args, "--overwrite"])  # camlens' own outputs: replaced
    assert again.exit_code == 0, again.output
    assert (out / "notes.txt").read_text() == "mine" and len(_parts(out)) == 4


def test_resume_with_other_settings_is_refused_naming_them(tagged, tmp_path):
    out = tmp_path / "out"
    args = [*_cli_args(tagged, out), "--max-images", "20", "--batch-size", "10"]
    assert CliRunner().invoke(main, args).exit_code == 0
    written = (out / "audit.json").read_bytes()
    seed = CliRunner().invoke(main, [*args, "--resume", "--seed", "1"])
    assert seed.exit_code == 2
    assert "settings differ" in seed.output and "seed: 0 then, 1 now" in seed.output
    method = CliRunner().invoke(main, [*args, "--resume", "--method", "gradcam"])
    assert method.exit_code == 2 and "(method)" in method.output
    assert (out / "audit.json").read_bytes() == written  # nothing was touched
    with pytest.raises(ConfigError, match=r"\(batch_size\)"):
        audit(
            str(tagged / "model"), str(tagged / "data" / "images"), out, max_images=20,
            annotations=str(tagged / "data" / "annotations.csv"),
            settings=AuditSettings(confirm_images=CONFIRM),
            options=RunOptions(resume=True, batch_size=5),
        )  # fmt: skip
    with pytest.raises(ConfigError, match="give out_dir"):
        audit(
            str(tagged / "model"), str(tagged / "data" / "images"), None,
            options=RunOptions(resume=True),
        )  # fmt: skip


def test_unreadable_inputs_are_stored_and_read_back(tagged, tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted((tagged / "data" / "images" / "circle").iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")  # sorted first: alone with one image
    out = tmp_path / "out"
    kwargs = {"report": False, "settings": AuditSettings(min_class_images=2)}
    first = audit(
        str(tagged / "model"), str(folder), out, options=RunOptions(batch_size=2), **kwargs
    )
    assert (first["n_images"], first["n_failed"]) == (3, 1)
    monkeypatch.setattr(AuditWorker, "process", None)  # nothing may be computed again
    again = audit(
        str(tagged / "model"), str(folder), out,
        options=RunOptions(batch_size=2, resume=True), **kwargs,
    )  # fmt: skip
    for result in (first, again):
        result.pop("seconds")
    assert again == first and again["errors"][0]["input"].endswith("broken.png")
