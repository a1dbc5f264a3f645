"""`minlora bench train` runs end to end at a tiny size: its table, JSON and figures."""
from __future__ import annotations

import argparse
import json

import pytest

from minlora.bench import train as bench_train
from minlora.cli import main

TINY = ["--hidden", "32", "--intermediate", "48", "--layers", "1", "--heads", "2", "--kv-heads", "2",
        "--vocab", "64", "--adapters", "3", "--rank", "2", "--rows", "4", "--tokens", "8", "--steps", "2",
        "--warmup", "1"]


@pytest.mark.slow
def test_bench_train_tiny_in_process(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "train", *TINY, "--in-process", "--no-progress", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "peft_sequential" in printed and "peft_single" in printed and "tokens_per_s" in printed
    data = json.loads(out.read_text())
    assert data["benchmark"] == "train"
    res = data["results"]
    for name in bench_train.CONTENDERS:
        f = res["figures"][name]
        assert f["seconds_per_step"] > 0 and f["tokens_per_s"] > 0 and f["peak_bytes"] > 0
    r = res["ratios"]
    assert r["speedup_vs_peft_sequential"] == pytest.approx(
        res["figures"]["minlora"]["tokens_per_s"] / res["figures"]["peft_sequential"]["tokens_per_s"])


@pytest.mark.slow
def test_bench_train_tiny_one_process_per_contender(capsys):
    """The default: each contender in a fresh process, so each peak memory is its own."""
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(TINY + ["--rounds", "1"])
    assert args.isolate is True
    assert bench_train.run(args) == 0
    printed = capsys.readouterr().out
    assert "minlora vs PEFT one adapter after another" in printed
