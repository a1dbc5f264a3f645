"""Shared pytest set-up: GPU tests are marked `cuda` and skipped where no GPU is present; where
one is, a GPU fault is its test's error and skips the tests after it (helpers/cuda_guard.py)."""
from __future__ import annotations

import pytest
import torch

pytest_plugins = ["helpers.cuda_guard"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
