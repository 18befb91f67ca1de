from __future__ import annotations

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
