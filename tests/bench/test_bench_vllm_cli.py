"""`minlora bench vllm` outside the vLLM environment says where it runs instead of failing."""
from __future__ import annotations

import importlib.util

import pytest

from minlora.cli import main


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_bench_vllm_says_how_to_run_it(capsys):
    assert main(["bench", "vllm"]) == 1
    err = capsys.readouterr().err
    assert "bash scripts/bench_vllm.sh" in err and "vLLM environment" in err
