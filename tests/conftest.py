from __future__ import annotations

import os

import pytest
import torch

import camlens
from camlens.io.samples import sample_image


@pytest.fixture(scope="session")
def builtin_model() -> camlens.Classifier:
    return camlens.load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def sample_photos():
    return [sample_image("chelsea"), sample_image("coffee")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (use with ``pytestmark = pytest.mark.usefixtures(...)``):
    the same numbers bit for bit as CLI subprocesses and Ray actors, which run one thread, and
    no oversubscription of a small shared machine (tiny models train several times faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


#: The only reasons a test may be skipped under CI=true: no GPU, or running as root.
_ALLOWED_SKIPS = ("cuda", "root")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``CI=true`` a skipped test is a failure unless it needs CUDA or a non-root user:
    a test that does not run proves nothing, and the test extra installs what tests import."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() != "true" or not report.skipped:
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if not any(word in reason.lower() for word in _ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which only CUDA and root skips may be: {reason}"
