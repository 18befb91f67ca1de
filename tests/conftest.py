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
