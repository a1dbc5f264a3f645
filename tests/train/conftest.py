"""The training tests' fixtures."""
from __future__ import annotations

import pytest

from helpers.train import base_model


@pytest.fixture(scope="module")
def base():
    """A tiny random Llama, built once per test module."""
    return base_model("llama")
