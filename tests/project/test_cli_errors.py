"""A user's mistake in any command is one clear line on stderr and a non-zero exit status,
never a Python traceback.  Every case is a real `python -m minlora ...` process."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from types import SimpleNamespace
from typing import Callable

import pytest
from helpers import pythonpath
from helpers.registry import make_adapter

from minlora.formats.native import save_adapter_file
from minlora.formats.peft import save_peft
from minlora.registry import Registry

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    """Files the cases name: good and broken adapters, registries intact and damaged."""
    d = tmp_path_factory.mktemp("cli-errors")
    f = SimpleNamespace(dir=str(d), a_file=str(d / "a-file"))
    open(f.a_file, "w").write("not a folder\n")
    adapter = make_adapter(1)

    f.peft_regex = str(d / "peft-bad-regex")
    save_peft(adapter, f.peft_regex)
    config_path = os.path.join(f.peft_regex, "adapter_config.json")
    config = json.load(open(config_path))
    config["target_modules"] = "(q_proj"  # a string target is a regex; this one does not compile
    json.dump(config, open(config_path, "w"))

    f.peft_truncated = str(d / "peft-truncated")
    save_peft(adapter, f.peft_truncated)
    _truncate(os.path.join(f.peft_truncated, "adapter_model.safetensors"))
    f.file_ok = str(d / "good.safetensors")
    save_adapter_file(adapter, f.file_ok)
    f.file_truncated = str(d / "truncated.safetensors")
    save_adapter_file(adapter, f.file_truncated)
    _truncate(f.file_truncated)
    f.bad_json = str(d / "train.json")
    open(f.bad_json, "w").write("{lr: 0.1")

    f.reg = str(d / "registry")
    with Registry(root=f.reg) as reg:
        reg.commit("alice", adapter, message="first")
    db = os.path.join(f.reg, "registry.db")

    f.reg_garbage = str(d / "registry-garbage")
    os.makedirs(f.reg_garbage)
    open(os.path.join(f.reg_garbage, "registry.db"), "wb").write(os.urandom(8192))
    f.reg_truncated = str(d / "registry-truncated")
    shutil.copytree(f.reg, f.reg_truncated)
    _truncate(os.path.join(f.reg_truncated, "registry.db"))
    # One table's page overwritten: the registry opens, the first query of that table fails.
    f.reg_bad_page = str(d / "registry-bad-page")
    shutil.copytree(f.reg, f.reg_bad_page)
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root_page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'revisions'").fetchone()[0]
    with open(os.path.join(f.reg_bad_page, "registry.db"), "r+b") as out:
        out.seek((root_page - 1) * page_size)
        out.write(b"\x5a" * page_size)
    f.port = _free_port()  # nothing listens there
    return f


# case -> (argv from the inputs, exit status, what the one line must say)
Case = tuple[Callable[[SimpleNamespace], list[str]], int, Callable[[SimpleNamespace], list[str]]]
CASES: dict[str, Case] = {
    "bad_regex_in_peft_config": (
        lambda f: ["adapters", "--root", f.reg, "import", f.peft_regex, "bob"], 1,
        lambda f: [f.peft_regex, "the regex '(q_proj' is refused"]),
    "truncated_safetensors_file": (
        lambda f: ["adapters", "--root", f.reg, "commit", "alice", f.file_truncated], 1,
        lambda f: [f.file_truncated, "cannot read this minlora adapter file or PEFT directory"]),
    "truncated_safetensors_in_peft_dir": (
        lambda f: ["adapters", "--root", f.reg, "import", f.peft_truncated, "bob"], 1,
        lambda f: [f.peft_truncated, "cannot read this PEFT adapter directory"]),
    "bad_dtype_ops": (lambda f: ["bench", "ops", "--dtype", "float99"], 2, lambda f: ["--dtype", "'float99'"]),
    "bad_dtype_pool": (lambda f: ["bench", "pool", "--dtype", "int8"], 2, lambda f: ["--dtype", "'int8'"]),
    "bad_device_name": (lambda f: ["bench", "ops", "--device", "tpu"], 2, lambda f: ["--device", "'tpu'"]),
    "absent_device_demo": (lambda f: ["demo", "--device", "cuda:99"], 1, lambda f: ["--device cuda:99"]),
    "absent_device_model": (lambda f: ["bench", "model", "--device", "cuda:99"], 1, lambda f: ["--device cuda:99"]),
    "repeats_zero_ops": (lambda f: ["bench", "ops", "--repeats", "0"], 2, lambda f: ["--repeats", "at least 1"]),
    "repeats_zero_model": (lambda f: ["bench", "model", "--repeats", "0"], 2, lambda f: ["--repeats", "at least 1"]),
    "ranks_zero": (lambda f: ["bench", "ops", "--ranks", "16", "0"], 2, lambda f: ["--ranks", "at least 1, got 0"]),
    "adapters_zero_demo": (lambda f: ["demo", "--adapters", "0"], 2, lambda f: ["--adapters", "at least 1"]),
    "ranks_zero_vllm": (lambda f: ["bench", "vllm", "--ranks", "8", "0"], 2, lambda f: ["--ranks", "at least 1, got 0"]),
    "bad_dtype_vllm": (lambda f: ["bench", "vllm", "--dtype", "int8"], 2, lambda f: ["--dtype", "'int8'"]),
    "clients_zero_serve": (lambda f: ["bench", "serve", "--clients", "0"], 2, lambda f: ["--clients", "at least 1"]),
    "adapters_zero_train": (lambda f: ["bench", "train", "--adapters", "0"], 2,
                            lambda f: ["--adapters", "at least 1"]),
    "adapters_zero_registry": (lambda f: ["bench", "registry", "--adapters", "0"], 2,
                               lambda f: ["--adapters", "at least 1"]),
    "ranks_reversed_pool": (lambda f: ["bench", "pool", "--min-rank", "5", "--max-rank", "2"], 2,
                            lambda f: ["--min-rank 5 is above --max-rank 2"]),
    "json_out_under_a_file": (
        lambda f: ["bench", "ops", "--json-out", os.path.join(f.a_file, "ops.json")], 2,
        lambda f: ["--json-out", f"{f.a_file} is not a folder"]),
    "json_out_is_a_folder": (lambda f: ["bench", "pool", "--json-out", f.dir], 2,
                             lambda f: ["--json-out", "is a folder, not a file"]),
    "plot_under_a_file": (lambda f: ["bench", "ops", "--plot", os.path.join(f.a_file, "ops.png")], 2,
                          lambda f: ["--plot", "cannot be written"]),
    "export_under_a_file": (
        lambda f: ["adapters", "--root", f.reg, "export", "alice", os.path.join(f.a_file, "out")], 1,
        lambda f: [os.path.join(f.a_file, "out"), "cannot be written"]),
    "export_file_under_a_file": (
        lambda f: ["adapters", "--root", f.reg, "export", "alice", os.path.join(f.a_file, "w.safetensors"),
                   "--format", "minlora"], 1,
        lambda f: [os.path.join(f.a_file, "w.safetensors"), "cannot be written"]),
    "unreachable_database": (
        lambda f: ["adapters", "--url", f"postgresql+psycopg://minlora:secret@127.0.0.1:{f.port}/nowhere",
                   "--blobs", os.path.join(f.dir, "blobs"), "list"],
        1, lambda f: [f"cannot open the registry postgresql+psycopg://minlora:***@127.0.0.1:{f.port}/nowhere",
                      "refused"]),
    "not_a_database_url": (lambda f: ["adapters", "--url", "no such database", "list"], 1,
                           lambda f: ["cannot open the registry", "--url is not a database URL"]),
    "damaged_database_garbage": (lambda f: ["adapters", "--root", f.reg_garbage, "list"], 4,
                                 lambda f: [f"cannot open the registry under {f.reg_garbage}", "nor re-initialise it"]),
    "damaged_database_truncated": (lambda f: ["adapters", "--root", f.reg_truncated, "verify"], 4,
                                   lambda f: [f"under {f.reg_truncated}", "malformed"]),
    "damaged_database_page": (lambda f: ["adapters", "--root", f.reg_bad_page, "log", "alice"], 4,
                              lambda f: [f"the registry database {f.reg_bad_page}", "malformed"]),
    "registry_root_is_a_file": (lambda f: ["adapters", "--root", f.a_file, "list"], 1,
                                lambda f: ["cannot open the registry", f.a_file]),
    "runner_not_importable": (lambda f: ["adapters", "--root", f.reg, "eval", "--runner", "no_such_module:fn"], 1,
                              lambda f: ["--runner no_such_module:fn", "cannot import 'no_such_module'"]),
    "training_config_not_json": (
        lambda f: ["adapters", "--root", f.reg, "commit", "alice", f.file_ok, "--training-config", f.bad_json], 1,
        lambda f: [f"--training-config {f.bad_json}"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_without_traceback(case, inputs):
    argv, status, wanted = CASES[case]
    env = {k: v for k, v in os.environ.items() if k != "MINLORA_TRACEBACK"}
    env["PYTHONPATH"] = pythonpath()
    env["MINLORA_HOME"] = os.path.join(inputs.dir, "home")  # never the user's own registry
    done = subprocess.run([sys.executable, "-m", "minlora", *argv(inputs)], capture_output=True, text=True,
                          timeout=150, env=env, cwd=inputs.dir)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert done.returncode == status, (done.returncode, done.stderr)
    for text in wanted(inputs):
        assert text in lines[0], (text, lines[0])
    assert "secret" not in done.stderr  # a URL's password is never printed


def test_traceback_on_request(inputs):
    """MINLORA_TRACEBACK=1 shows the traceback of the same error (for a bug report)."""
    env = {**os.environ, "MINLORA_TRACEBACK": "1",
           "PYTHONPATH": pythonpath()}
    done = subprocess.run([sys.executable, "-m", "minlora", "adapters", "--root", inputs.reg_garbage, "list"],
                          capture_output=True, text=True, timeout=150, env=env, cwd=inputs.dir)
    assert done.returncode == 1 and "Traceback" in done.stderr and "nor re-initialise it" in done.stderr
