"""`minlora bench vllm` at a tiny size: both parts run, write their table and JSON, and the
layer part's two wrappers agree."""
from __future__ import annotations

import json

import pytest

from vllm_assets import NEEDS_VLLM

pytest.importorskip("vllm", reason=NEEDS_VLLM)

from minlora.cli import main  # noqa: E402


def test_layer_part_tiny(tmp_path, capsys):
    out = tmp_path / "layer.json"
    assert main(["bench", "vllm", "--part", "layer", "--layers", "o_proj", "qkv_proj", "--ranks", "1", "8", "3",
                 "--max-rank", "8", "--dtype", "float32", "--decode-requests", "7", "--prefill-requests", "4",
                 "--prefill-tokens", "5", "--repeats", "1", "--stock-repeats", "1", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "x_stock" in printed and "minlora_ms" in printed
    data = json.loads(out.read_text())
    assert data["benchmark"] == "vllm" and data["machine"]["torch"]
    rows = data["results"]["layer"]
    assert [(r["layer"], r["tokens"]) for r in rows] == [("o_proj", 7), ("o_proj", 20), ("qkv_proj", 7),
                                                        ("qkv_proj", 20)]
    for row in rows:
        assert row["relerr_vs_stock"] < 1e-5 and row["base_rows_unchanged"]
        assert row["minlora_ms"] > 0 and row["x_stock"] == pytest.approx(row["stock_ms"] / row["minlora_ms"])
        assert row["true_weight_mb"] < row["padded_weight_mb"]


@pytest.mark.timeout(900)
def test_e2e_part_tiny(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert main(["bench", "vllm", "--part", "e2e", "--modes", "minlora", "--ranks", "1", "8", "--max-rank", "8",
                 "--hidden", "128", "--intermediate", "256", "--model-layers", "1", "--heads", "4", "--vocab",
                 "512", "--requests", "5", "--new-tokens", "3", "--prompt-len", "4", "--e2e-repeats", "2",
                 "--e2e-rounds", "2", "--json-out", str(out)]) == 0
    assert "tokens_per_s" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["results"]["e2e"]
    assert row["mode"] == "minlora" and row["tokens"] == 5 * 3 and row["tokens_per_s"] > 0
    # two engine rounds, each with two timed generates: the fastest of the four is the figure
    assert row["rounds"] == 2 and len(row["all_seconds"]) == 4 and row["seconds"] == min(row["all_seconds"])
