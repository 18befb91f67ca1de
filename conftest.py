"""What the docstring examples of ``src/camlens`` run with (``--doctest-modules``).

Each example runs in a fresh temporary working directory (nothing is written into the
checkout) that holds the files the examples name:

- ``cat.jpg``: scikit-image's ``chelsea`` photo (the built-in model says "Egyptian cat");
- ``photos/``: ``cat.jpg``, ``coffee.jpg`` and ``astronaut.jpg`` (bundled samples);
- ``boxes.csv``: ground-truth boxes of ``photos/`` (``image,x0,y0,x1,y1,label``);
- ``shapes/``: ``camlens make-dataset``'s shapes, 60 images of 32 px, squares with a corner tag;
- ``runs/shapes``: the ``simple`` CAM network trained on them for 2 epochs (``camlens train``).

They are made once per session, before the first example runs (a run of tests alone never
makes them), and copied for each example. ``doctest_namespace`` adds ``np``, ``torch`` and
``camlens``. Each example runs with torch's global RNG seeded with 0 and on one torch thread.
Under ``CI=true`` an example skipped as a whole (every line ``# doctest: +SKIP``) fails, as a
skipped test does (``tests/conftest.py``, whose fixtures and hook are the tests' own).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _pytest.doctest import DoctestItem

#: Ground-truth boxes of the photos in ``photos/`` (those of ``data/sample_boxes.csv``).
BOXES_CSV = """image,x0,y0,x1,y1,label
photos/cat.jpg,0,0,398,300,Egyptian cat
photos/coffee.jpg,172,17,409,305,espresso
photos/astronaut.jpg,352,0,460,250,space shuttle
photos/astronaut.jpg,275,343,508,512,crash helmet
"""


@pytest.fixture(scope="session")
def doctest_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every docstring example's working directory is a copy of."""
    import camlens
    from camlens.data.shapes import ShapesConfig, make_shapes_dataset
    from camlens.io.samples import sample_image

    root = tmp_path_factory.mktemp("doctest-files")
    sample_image("chelsea").save(root / "cat.jpg", quality=95)
    (root / "photos").mkdir()
    for file, sample in (("cat", "chelsea"), ("coffee", "coffee"), ("astronaut", "astronaut")):
        sample_image(sample).save(root / "photos" / f"{file}.jpg", quality=95)
    (root / "boxes.csv").write_text(BOXES_CSV, encoding="utf-8")
    shapes = ShapesConfig(
        n=60, size=32, seed=0, shortcut="corner-tag", shortcut_class="square", shortcut_rate=0.9
    )
    make_shapes_dataset(root / "shapes", shapes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on any machine, and faster for a tiny model
    try:
        camlens.train(
            root / "shapes" / "images",
            root / "runs" / "shapes",
            epochs=2,
            image_size=32,
            seed=0,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="session", autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    import camlens

    doctest_namespace.update(np=np, torch=torch, camlens=camlens)


@pytest.fixture(autouse=True)
def _doctest_workdir(request: pytest.FixtureRequest):
    """Run each docstring example in a fresh copy of ``doctest_files``, torch seeded and on
    one thread (the printed numbers are then the same on any machine)."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    files = request.getfixturevalue("doctest_files")
    workdir = request.getfixturevalue("tmp_path")
    shutil.copytree(files, workdir, dirs_exist_ok=True)
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(workdir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under ``CI=true`` a docstring example of ``src/`` that is skipped as a whole fails: an
    example that does not run proves nothing (``tests/conftest.py`` rules the tests)."""
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("CI", "").lower() == "true"
        and report.skipped
        and isinstance(item, DoctestItem)
        and item.path.is_relative_to(item.config.rootpath / "src")
    ):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"docstring example skipped under CI=true: {reason}"
