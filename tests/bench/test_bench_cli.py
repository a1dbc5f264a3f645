"""`minlora bench ...` runs end to end at a tiny size and writes its table, JSON and PNG."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.cases import rel_error
from minlora.bench import ops
from minlora.cli import main


def test_bench_ops_tiny(tmp_path, capsys):
    out_json, out_png = tmp_path / "ops.json", tmp_path / "ops.png"
    code = main(["bench", "ops", "--device", "cpu", "--in", "64", "--out", "48", "--ranks", "4", "8",
                 "--adapters", "2", "4", "--tokens-per-adapter", "1", "9", "--repeats", "2", "--no-progress",
                 "--json-out", str(out_json), "--plot", str(out_png)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "minlora_us" in printed and "x_loop" in printed
    data = json.loads(out_json.read_text())
    assert data["benchmark"] == "ops"
    assert data["machine"]["torch"] and data["machine"]["cpu_count"] >= 1
    rows = data["results"]
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        assert row["minlora_us"] > 0 and row["loop_us"] > 0 and row["gather_bmm_us"] > 0
        assert row["x_loop"] == pytest.approx(row["loop_us"] / row["minlora_us"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_ops_json_on_stdout(capsys):
    """--json prints the results and machine info on stdout instead of the table."""
    assert main(["bench", "ops", "--device", "cpu", "--in", "32", "--out", "16", "--ranks", "2", "--adapters", "2",
                 "--tokens-per-adapter", "3", "--repeats", "2", "--no-progress", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["benchmark"] == "ops" and payload["machine"]["cpu_count"] >= 1
    (row,) = payload["results"]
    assert row["config"]["rank"] == 2 and row["minlora_us"] > 0


def test_bench_registry_tiny(tmp_path, capsys):
    out_json, root = tmp_path / "registry.json", tmp_path / "reg"
    assert main(["bench", "registry", "--adapters", "60", "--distinct", "7", "--batch", "25", "--samples", "6",
                 "--root", str(root), "--no-progress", "--json-out", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "registry scale benchmark: 60 adapters, 7 distinct blobs" in printed and "promote_gated" in printed
    res = json.loads(out_json.read_text())["results"]
    assert res["adapters"] == 60 and res["counts"]["adapters"] == 60 and res["blob_files"] >= 7
    assert res["db_bytes"] > 0 and res["latency"]["load_verified"]["n"] == 6
    # The registry it made is kept under --root, and a second run there is refused.
    assert (root / "registry.db").exists()
    assert main(["bench", "registry", "--adapters", "5", "--root", str(root), "--no-progress"]) == 1
    assert "already holds a registry" in capsys.readouterr().err


def test_bench_presets_fill_only_unset_sizes():
    from minlora.bench import pool, registry
    from minlora.bench.common import apply_preset
    from minlora.cli import build_parser

    args = build_parser().parse_args(["bench", "registry", "--preset", "full"])
    apply_preset(args, registry.PRESETS)
    assert args.adapters == 1_000_000
    args = build_parser().parse_args(["bench", "pool", "--steps", "7"])
    apply_preset(args, pool.PRESETS)
    assert (args.adapters, args.steps) == (100_000, 7)


def test_bench_ops_backward_tiny(capsys):
    assert main(["bench", "ops", "--device", "cpu", "--in", "32", "--out", "16", "--ranks", "4",
                 "--adapters", "3", "--tokens-per-adapter", "5", "--repeats", "2", "--backward",
                 "--no-progress"]) == 0
    assert "+bwd" in capsys.readouterr().out


def test_baselines_agree_with_reference():
    """Every baseline computes the same delta as the float64 reference (they are only useful if right)."""
    from minlora.reference import lora_forward_ref

    cfg = ops.OpsConfig(40, 24, 6, 5, 3)
    p = ops.Problem(cfg, seed=3)
    want = lora_forward_ref(p.x, p.a_pool, p.b_pool, p.a_pages, p.b_pages, p.ranks, p.scales, p.token_slot)
    checked = []
    for name, run in ops.RUNNERS.items():
        if ops._available(name, p) is not None:  # grouped_mm needs 16-byte strides (rank 6 has none)
            continue
        checked.append(name)
        assert rel_error(run(p), want) < 1e-5, name
    assert {"minlora", "loop", "gather_bmm"} <= set(checked)


def test_bench_ops_bad_arguments(capsys):
    for argv, wanted in ((["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
                         (["--proj", "qq"], "argument --proj: invalid choice: 'qq'")):
        with pytest.raises(SystemExit) as info:
            main(["bench", "ops", "--device", "cpu", *argv])
        assert info.value.code == 2
        assert wanted in capsys.readouterr().err
    assert main(["bench", "ops", "--device", "cpu", "--in", "64"]) == 2
    assert "--in and --out go together" in capsys.readouterr().err


def test_cli_help_runs():
    done = subprocess.run([sys.executable, "-m", "minlora", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "bench" in done.stdout and "adapters" in done.stdout


def test_bench_model_tiny(tmp_path, capsys):
    out_json = tmp_path / "model.json"
    code = main(["bench", "model", "--preset", "tiny", "--hidden", "64", "--intermediate", "96", "--layers", "1",
                 "--heads", "4", "--kv-heads", "2", "--vocab", "128", "--adapters", "3", "--rank", "4",
                 "--batch", "5", "--repeats", "2", "--no-progress", "--json-out", str(out_json)])
    assert code == 0
    assert "x_base" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    res = data["results"]
    assert data["benchmark"] == "model" and res["preset"] == "tiny"
    assert res["rel_err_vs_peft"] <= 1e-5
    assert res["times_s"]["minlora"] > 0 and res["times_s"]["peft_mixed"] > 0 and res["times_s"]["base"] > 0


def test_bench_model_without_peft(tmp_path, capsys):
    """--no-peft: adapters made in memory, no PEFT model; base and patched model still timed."""
    out_json = tmp_path / "model.json"
    code = main(["bench", "model", "--preset", "tiny", "--hidden", "64", "--intermediate", "96", "--layers", "1",
                 "--heads", "4", "--kv-heads", "2", "--vocab", "128", "--adapters", "40", "--rank", "4",
                 "--batch", "40", "--repeats", "2", "--no-peft", "--no-progress", "--json-out", str(out_json)])
    assert code == 0
    assert "PEFT not run" in capsys.readouterr().out
    res = json.loads(out_json.read_text())["results"]
    assert res["config"]["peft"] is False and res["rel_err_vs_peft"] is None
    assert set(res["times_s"]) == {"base", "minlora", "minlora_with_prepare"}
    assert all(t > 0 for t in res["times_s"].values())


def test_bench_pool_tiny(tmp_path, capsys):
    out_json = tmp_path / "pool.json"
    code = main(["bench", "pool", "--adapters", "2000", "--steps", "50", "--batch", "8", "--no-progress",
                 "--json-out", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "hit rate" in printed and "steps/s" in printed
    res = json.loads(out_json.read_text())["results"]
    assert res["num_adapters"] == 2000 and res["steps"] == 50
    assert res["hits"] + res["misses"] == 50 * 8 - res.get("no_adapter_requests", 0)


def test_demo_runs_and_matches_peft(capsys):
    assert main(["demo", "--adapters", "2", "--new-tokens", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    err = float(out.split("relative error ")[1].split()[0])
    assert err < 1e-5
    assert "user-0:" in out and "user-1:" in out and "(no adapter):" in out
