"""Every ``bash`` and ``python`` block of README.md runs, in order, in one fresh folder.

Which blocks run: the fenced blocks whose info string is exactly ``bash`` or ``python``; other
fences (``json``, ``text``, none) show data or output and are not code. A ``bash``/``python``
block directly preceded by a line ``<!-- not run: REASON -->`` is not run (an install, a make
target of the clone, a server, a cluster, data we do not have); the README shows the marker to
its readers too, and ``NOT_RUN`` below is the exact list the test expects, so a block cannot
quietly stop running.

How they run: in a fresh temporary folder that holds a copy of the repository's ``data/`` (the
README's commands are written for a clone's root, and ``data/sample_boxes.csv`` is the one
repository file they read). ``bash`` blocks run with ``bash -e -o pipefail`` (every command must
succeed), with this interpreter's ``bin`` first on ``PATH``, so that ``camlens`` is this
environment's. ``python`` blocks run in one namespace in this process, one after the other,
like a Python session that follows the README.

Small sizes: the README's sizes take many minutes on 2 cores (two 600-image data sets, 40 + 8 +
40 training epochs). ``SMALL`` rewrites a few numbers before a block runs: generated data sets
get 60 images of 32 px, every training run 1 epoch, deletion/insertion curves 2 steps. Each
rewrite must apply somewhere (a stale one fails the test). Set ``CAMLENS_README_FULL=1`` to run
the blocks exactly as written (about 15 minutes on this project's 2-core machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FULL = os.environ.get("CAMLENS_README_FULL", "") not in ("", "0")

#: The first command of every block marked ``<!-- not run: ... -->``, in README order.
NOT_RUN = [
    "make demo",  # make targets of the clone; make test runs this test
    'pip install "/path/to/camlens[web]"',  # installs packages
    ".venv/bin/python examples/shortcut_demo.py --out docs/images",  # redraws docs/images
    "python examples/detection_segmentation.py --out docs/images --work dense",  # trains
    "ray start --head",  # needs a Ray cluster
    "camlens evaluate instances_val2017.json --images val2017/ --out eval_coco --metrics all",
    "camlens explain scan.nii.gz ct_series/ --model torchvision:r3d_18 --weights r3d.safetensors "
    "--out ct_explain",  # needs a trained 3-D model
    "camlens serve",  # runs until Ctrl-C
    "curl -F file=@demo/samples/chelsea.png -F target=top5 -F method=gradcam "
    "http://127.0.0.1:8000/api/explain",  # needs that server
    "make test",  # the Development section's make targets
]

#: (language, pattern, replacement): the small sizes (see the module docstring).
SMALL = [
    ("bash", r"(camlens make-dataset shapes)", r"\1 --n 60 --size 32"),
    ("bash", r"(camlens make-dataset xray)", r"\1 --n 40 --size 64"),
    ("bash", r"(camlens train \S+[^\n#]*?) --epochs \d+", r"\1"),
    ("bash", r"(camlens train \S+)", r"\1 --epochs 1"),
    ("bash", r"(camlens evaluate \S+)", r"\1 --steps 2"),
    ("python", r"ShapesConfig\(n=600, size=64", "ShapesConfig(n=60, size=32"),
    ("python", r"epochs=40", "epochs=1"),
    ("python", r"(methods=\[\"cam\", \"gradcam\", \"random\"\])", r"\1, steps=2"),
]

_FENCE = re.compile(r"^```(\S*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    language: str
    code: str
    line: int  # 1-based line of the opening fence
    not_run: str | None  # the reason, for a block marked not run

    @property
    def first_command(self) -> str:
        first = next(line for line in self.code.splitlines() if line.strip())
        return first.split("  #")[0].strip()


def readme_blocks(text: str) -> list[Block]:
    """The README's ``bash`` and ``python`` blocks, in order, with their not-run reasons."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in ("bash", "python"):
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _NOT_RUN.match(previous)
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(fence.group(1), code, i + 1, marker and marker.group(1)))
        i = end + 1
    return blocks


def shrink(block: Block, used: set[int]) -> str:
    """The block's code with the ``SMALL`` rewrites of its language (unless FULL)."""
    code = block.code
    if FULL:
        return code
    for k, (language, pattern, replacement) in enumerate(SMALL):
        if language == block.language:
            code, count = re.subn(pattern, replacement, code)
            if count:
                used.add(k)
    return code


def test_the_readme_marks_exactly_the_expected_blocks_not_run():
    text = README.read_text(encoding="utf-8")
    blocks = readme_blocks(text)
    skipped = [b for b in blocks if b.not_run is not None]
    assert [b.first_command for b in skipped] == NOT_RUN
    assert all(b.not_run for b in skipped), "every not-run marker gives its reason"
    # A marker anywhere else would mark nothing: each one stands right before a code block.
    assert sum(bool(_NOT_RUN.match(line)) for line in text.splitlines()) == len(skipped)
    assert len(blocks) - len(skipped) >= 15


def test_no_readme_command_reuses_an_output_folder_by_accident():
    """Top to bottom, each ``--out`` folder is new, unless the command passes ``--resume`` or
    ``--overwrite`` on purpose (the folder rules refuse anything else)."""
    seen: dict[str, int] = {}
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        if block.language != "bash" or block.not_run is not None:
            continue
        for command in re.split(r"[;\n]", block.code):
            command = command.split("  #")[0]
            out = re.search(r"--out (\S+)", command)
            if not out:
                continue
            on_purpose = "--resume" in command or "--overwrite" in command
            assert on_purpose or out.group(1) not in seen, (
                f"README.md:{block.line}: --out {out.group(1)} was written by the block at "
                f"line {seen.get(out.group(1))}"
            )
            seen.setdefault(out.group(1), block.line)


def test_every_readme_block_runs_top_to_bottom_in_a_fresh_folder(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    namespace: dict = {"__name__": "__readme__"}
    used: set[int] = set()
    ran = 0
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        if block.not_run is not None:
            continue
        code = shrink(block, used)
        where = f"README.md:{block.line}"
        started = time.perf_counter()
        if block.language == "bash":
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", code],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            assert done.returncode == 0, (
                f"{where} exited {done.returncode}:\n{code}\n{done.stdout[-3000:]}\n"
                f"{done.stderr[-3000:]}"
            )
        else:
            exec(compile(code, where, "exec"), namespace)
        ran += 1
        print(f"{where} ({block.language}): {time.perf_counter() - started:.1f} s")  # with -s
    assert FULL or used == set(range(len(SMALL))), (
        f"SMALL rewrites that matched nothing: {[SMALL[k] for k in set(range(len(SMALL))) - used]}"
    )

    # What the README says these blocks leave behind.
    records = [json.loads(line) for line in Path("results/results.jsonl").read_text().splitlines()]
    assert [Path(r["input"]).name for r in records] == sorted(
        ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle.png", "rocket.png"]
    )
    assert all(r["status"] == "ok" and len(r["maps"]) == 1 for r in records)
    assert Path("batch/notes.txt").read_text() == "my notes\n"  # --overwrite kept it
    batch = Path("batch/results.jsonl").read_text().splitlines()
    assert len(batch) == 5 and all(len(json.loads(line)["maps"]) == 5 for line in batch)
    assert json.loads(Path("batch/.camlens/run.json").read_text())["settings"]["target"] == "top5"
    for path in ("toy_model/model.safetensors", "eval_out/metrics.json", "tagged_audit/audit.json"):
        assert Path(path).is_file(), path
    assert namespace["result"]["flags"] is not None  # the last Python block: the audit
    assert ran >= 15
