"""Smoke test of the model benchmark driver (`minlora bench model`) at a tiny size: it runs,
its patched model agrees with PEFT, and it reports the figures the CLI prints."""
from __future__ import annotations

from minlora.bench.llama import LlamaShape
from minlora.bench.model import ModelBenchConfig, bench_model


def test_bench_model_driver_runs_tiny():
    shape = LlamaShape(hidden=64, intermediate=96, layers=1, heads=4, kv_heads=2, vocab=200)
    cfg = ModelBenchConfig(shape=shape, adapters=3, rank=4, batch=5, repeats=1, warmup=0)
    result = bench_model(cfg)
    assert result["rel_err_vs_peft"] <= 1e-5
    assert set(result["times_s"]) == {"base", "peft_mixed", "minlora", "minlora_with_prepare"}
    assert result["ratios_to_base"]["base"] == 1.0
    assert "x_base" in result["table"]
