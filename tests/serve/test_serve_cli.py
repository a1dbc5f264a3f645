"""`minlora serve` and `minlora bench serve` from the shell: help, startup, bad options."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

import pytest

from minlora.serve.cli import add_arguments
from helpers import REPO
from helpers.serve import model_dir, write_keys

ENV = dict(os.environ, PYTHONPATH=str(REPO), TINKER_TELEMETRY="0")


def minlora(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minlora", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def test_help_documents_every_option():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert {"--model", "--root", "--registry", "--blobs", "--host", "--port", "--api-keys"} <= set(options)
    out = minlora("serve", "--help")
    assert out.returncode == 0
    for option in options:
        assert option in out.stdout, option
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented


def test_startup_prints_the_url_and_the_model(tmp_path):
    model = model_dir(str(tmp_path))
    keys = write_keys(str(tmp_path / "keys"))
    proc = subprocess.Popen([sys.executable, "-m", "minlora", "serve", "--model", model, "--root",
                             str(tmp_path / "home"), "--api-keys", keys, "--port", "0", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    # A watchdog kills the server if the startup banner never completes, so the loop below ends.
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip().startswith("training"):
                break
        text = "".join(lines)
        assert "training  LoRA ranks 1..128" in text, text
        assert "minlora serve: http://127.0.0.1:" in text
        assert "tiny-llama" in text and model in text
        assert keys in text
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(30)


def test_bad_options_are_one_line_errors(tmp_path):
    out = minlora("serve", "--model", str(tmp_path / "missing"))
    assert out.returncode == 1 and "not a directory" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = minlora("serve", "--model", model_dir(str(tmp_path)), "--root", str(tmp_path / "h"),
                  "--api-keys", str(tmp_path / "none"))
    assert out.returncode == 1 and "keys" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad-keys"
    bad.write_text("xyz-not-a-key alice\n")
    out = minlora("serve", "--model", model_dir(str(tmp_path)), "--root", str(tmp_path / "h"), "--api-keys", str(bad))
    assert out.returncode == 1 and "tml-" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_serve_quick_runs():
    pytest.importorskip("tinker")
    out = minlora("bench", "serve", "--quick", "--threads", "1", "--no-progress", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sampling, mixed-adapter batches" in out.stdout and "sampling, one adapter at a time" in out.stdout


def test_bench_serve_options_win_over_quick_and_name_the_loss():
    from minlora.bench import serve as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    quick = bench.config_from_args(parser.parse_args(["--quick"]))
    assert quick == bench.quick_config()
    cfg = bench.config_from_args(parser.parse_args(["--quick", "--clients", "5", "--train-steps", "7",
                                                    "--train-loss", "ppo", "--layers", "3", "--rank", "2"]))
    assert (cfg.sampling.clients, cfg.sampling.adapters, cfg.training.steps, cfg.training.clients) == (5, 4, 7, 4)
    assert cfg.training.loss_fn == "ppo" and cfg.shape.layers == 3 and cfg.shape.hidden == 128 and cfg.rank == 2
    assert bench.config_from_args(parser.parse_args([])) == bench.ServeBenchConfig()


@pytest.mark.slow
def test_bench_serve_quick_trains_with_a_policy_loss():
    pytest.importorskip("tinker")
    out = minlora("bench", "serve", "--quick", "--threads", "1", "--no-progress", "--clients", "2",
                  "--train-loss", "importance_sampling", "--json", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["workload"]: r for r in json.loads(out.stdout)["results"]["rows"]}
    assert rows["training, 4 clients"]["tokens"] == 4 * 2 * 2 * 16 and rows["training, 1 client"]["x"] == 1.0
