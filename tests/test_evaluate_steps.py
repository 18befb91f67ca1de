"""How many deletion/insertion steps evaluate uses: one default everywhere, and the report and
the command line's summary say how many a run used."""

from __future__ import annotations

import inspect
import json

import pytest
from click.testing import CliRunner

from camlens.api import evaluate
from camlens.cli import main
from camlens.cli.common import ModelChoice
from camlens.cli.evaluate import _summary_table
from camlens.cli.evaluate import evaluate as evaluate_command
from camlens.metrics import faithfulness as faith
from camlens.metrics.registry import MetricSettings, make_settings
from camlens.report.evaluate import curve_steps_note
from whitebox import colour_classifier, square_image


def test_one_default_number_of_steps_everywhere():
    default = faith.DEFAULT_STEPS
    assert MetricSettings(metrics=[]).steps == default == make_settings().steps
    assert inspect.signature(evaluate).parameters["steps"].default == default
    for curve in (faith.deletion_curve, faith.insertion_curve):
        assert inspect.signature(curve).parameters["steps"].default == default
    option = next(p for p in evaluate_command.params if p.name == "steps")
    assert option.default == default  # the command line does not import the registry
    assert f"{default}" in (option.help or "") or option.show_default


@pytest.fixture
def squares_csv(tmp_path):
    rows = ["image,x0,y0,x1,y1,label"]
    for name, box in {"a.png": (4, 4, 20, 20), "b.png": (40, 10, 56, 26)}.items():
        square_image(tmp_path / name, [("red", box)])
        rows.append(f"{name},{','.join(map(str, box))},red")
    csv = tmp_path / "boxes.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_the_report_states_the_steps_the_run_used(squares_csv, tmp_path):
    steps = 7  # not the default
    assert steps != faith.DEFAULT_STEPS
    out = tmp_path / "out"
    result = evaluate(
        colour_classifier(), squares_csv, methods=["cam"], metrics="deletion,insertion",
        steps=steps, out_dir=out, gallery=0,
    )  # fmt: skip
    assert result["settings"]["steps"] == steps
    assert len(result["curves"]["cam"]["deletion"]) == steps + 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["steps"] == steps  # metrics.json's contract: the settings
    html = (out / "report.html").read_text()
    assert "deletion/insertion: 7 steps (8 points per curve)" in html
    # The note sits in the curves' section, before the figures.
    curves = html.index("<h2>Curves</h2>")
    assert curves < html.index("deletion/insertion: 7 steps") < html.index("curves/deletion.png")
    assert "7 steps" in _summary_table(result).splitlines()[0]


def test_no_steps_note_without_deletion_or_insertion(squares_csv, tmp_path):
    out = tmp_path / "out"
    result = evaluate(
        colour_classifier(), squares_csv, methods=["cam"], metrics="maxboxacc", out_dir=out,
        gallery=0,
    )  # fmt: skip
    assert curve_steps_note(result) is None
    assert "deletion/insertion:" not in (out / "report.html").read_text()
    assert "steps" not in _summary_table(result)
    # Read from the settings when no curve was stored (every image failed).
    failed = {"metrics": ["deletion_auc"], "settings": {"steps": 12}, "curves": {}}
    assert curve_steps_note(failed) == "deletion/insertion: 12 steps (13 points per curve)"


def test_the_command_line_summary_states_the_steps(squares_csv, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [
        "evaluate", str(squares_csv), "--out", str(out), "--metrics", "deletion",
        "--method", "cam", "--steps", "5", "--gallery", "0",
    ]  # fmt: skip
    # The white-box network instead of --model's built-in one.
    monkeypatch.setattr(ModelChoice, "load", lambda self, device: colour_classifier())
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "deletion/insertion: 5 steps" in result.output
    assert "deletion/insertion: 5 steps (6 points per curve)" in (out / "report.html").read_text()
