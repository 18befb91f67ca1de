"""The command line end to end: exit codes, records and files on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens.cli import main
from camlens.io.samples import write_samples
from image_corpus import EXPECTED, EXPECTED_SIZES, make_corpus


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    make_corpus(corpus)
    out = tmp_path_factory.mktemp("out")
    inputs = [str(corpus / name) for name in sorted(EXPECTED)] + [str(corpus / "missing.png")]
    result = CliRunner().invoke(main, ["explain", *inputs, "--out", str(out), "--batch-size", "8"])
    return inputs, out, result


def test_broken_files_become_error_records_and_the_rest_is_processed(corpus_run):
    inputs, out, result = corpus_run
    assert result.exit_code == 1, result.output
    records = _records(out)
    assert [r["input"] for r in records] == inputs  # one record per input, in input order
    expected = {**EXPECTED, "missing.png": "does not exist"}
    for record in records:
        name = Path(record["input"]).name
        if expected[name] is None:
            assert record["status"] == "ok" and record["error"] is None, record
            assert record["size"] == list(EXPECTED_SIZES[name])
        else:
            assert record["status"] == "error"
            assert expected[name] in record["error"].lower() and name in record["error"]
            assert record["maps"] == [] and record["raw"] is None


def test_ok_records_point_to_readable_files_in_original_pixels(corpus_run):
    _, out, _ = corpus_run
    for record in (r for r in _records(out) if r["status"] == "ok"):
        assert len(record["predictions"]) == 5
        probs = [p["prob"] for p in record["predictions"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        (entry,) = record["maps"]
        assert entry["class"] == record["predictions"][0]["class"]
        with Image.open(out / entry["overlay"]) as overlay:
            assert overlay.size == tuple(record["size"])  # the original resolution
        width, height = record["size"]
        x0, y0, x1, y1 = entry["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        with np.load(out / record["raw"]) as raw:
            assert raw["raw"].shape == (1, 7, 7) and raw["targets"].tolist() == [entry["class"]]
    assert not list(out.rglob("*.tmp"))  # nothing half-written
    html = (out / "index.html").read_text()
    assert "failed" in html and "notes.jpg" in html


def test_explain_top5_by_class_name_and_gradcam(tmp_path):
    photos = write_samples(tmp_path / "in", ["chelsea"])
    out = tmp_path / "out"
    args = ["explain", str(photos[0]), "--out", str(out), "--target", "top5", "--method", "gradcam"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (record,) = _records(out)
    assert record["predictions"][0]["class"] == 285 and record["method"] == "gradcam"
    assert [m["class"] for m in record["maps"]] == [p["class"] for p in record["predictions"]]
    out2 = tmp_path / "out2"
    args = ["explain", str(photos[0]), "--out", str(out2), "--target", "tabby"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert _records(out2)[0]["maps"][0]["class"] == 281


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--target", "kitty cat"], "no class is called"),
        (["--layer", "_fcc"], "Closest names: _fc"),
        (["--colormap", "nope"], "unknown colormap"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "cam", "--max-channels", "8"], "does not take the option(s) max_channels"),
        (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(tmp_path, extra, message):
    photo = write_samples(tmp_path, ["coffee"])[0]
    result = CliRunner().invoke(main, ["explain", str(photo), "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2
    assert message in result.output


def test_cam_on_a_model_without_gap_head_exits_2_and_suggests_gradcam(tmp_path):
    pytest.importorskip("torchvision")
    photo = write_samples(tmp_path, ["coffee"])[0]
    args = ["explain", str(photo), "--out", str(tmp_path / "o"), "--model", "torchvision:vgg11"]
    result = CliRunner().invoke(main, [*args, "--random-weights"])
    assert result.exit_code == 2 and "use method='gradcam'" in result.output


def test_empty_folder_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        main, ["explain", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "no images found" in result.output


def test_version_and_help_from_the_installed_script():
    done = subprocess.run(
        [Path(sys.executable).with_name("camlens"), "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and camlens.__version__ in done.stdout
    help_text = CliRunner().invoke(main, ["explain", "--help"]).output
    for option in ("--model", "--method", "--target", "--layer", "--batch-size", "--device"):
        assert option in help_text


def test_demo_writes_topk_figures_and_gallery(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = {Path(r["input"]).stem: r for r in _records(tmp_path)}
    assert records["chelsea"]["predictions"][0]["class"] in range(281, 286)
    assert records["coffee"]["predictions"][0]["class"] == 967
    for record in records.values():
        assert len(record["maps"]) == 5 and (tmp_path / record["figure"]).is_file()
    assert "figures/" in (tmp_path / "index.html").read_text()


@pytest.mark.parametrize(
    ("device", "message"),
    [("banana", "unknown device 'banana'"), ("cuda:99", "cuda:99")],
)
def test_a_bad_device_is_a_usage_error_before_any_work(tmp_path, device, message):
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    result = CliRunner().invoke(
        main, ["explain", str(image), "--out", str(tmp_path / "o"), "--device", device]
    )
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
