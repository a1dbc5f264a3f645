"""pytest-benchmark regression suite: the LoRA op at a few fixed configurations.

Not part of the test suite (speed is never asserted).  Run and compare across commits:

    source scripts/env.sh
    python -m pytest bench/regression_ops.py --benchmark-autosave
    python -m pytest bench/regression_ops.py --benchmark-compare      # against the last saved run
"""
from __future__ import annotations

import pytest
import torch

from minlora.bench.ops import RUNNERS, OpsConfig, Problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
CONFIGS = {
    "decode-q-r16-x32": OpsConfig(4096, 4096, 16, 32, 1, DTYPE, DEVICE),
    "prefill-q-r16-x8x128": OpsConfig(4096, 4096, 16, 8, 128, DTYPE, DEVICE),
    "decode-down-r8-x64": OpsConfig(14336, 4096, 8, 64, 1, DTYPE, DEVICE),
    "decode-k-r64-x16": OpsConfig(4096, 1024, 64, 16, 1, DTYPE, DEVICE),
}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("method", ["minlora", "gather_bmm"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_forward(benchmark, name, method):
    problem = Problem(CONFIGS[name], seed=0)
    run = RUNNERS[method]
    benchmark.group = name

    def call():
        with torch.no_grad():
            run(problem)
        _sync()

    benchmark(call)
