"""`minlora adapters ...`: every sub-command, --json output, exit codes, bad input.  Most
calls go through minlora.cli.main in-process (the same code path as the console script, and
no 4 s torch import per call); one test runs the real `python -m minlora` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import pythonpath
from helpers.registry import make_adapter

from minlora.cli import main
from minlora.formats import native as content
from minlora.registry import Registry

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cli(registry_location, capsys):
    url, blobs = registry_location

    def run(*argv: str, expect: int = 0):
        code = main(["adapters", "--url", url, "--blobs", blobs, *argv])
        out, err = capsys.readouterr()
        assert code == expect, f"exit {code} (wanted {expect}); stdout: {out!r}; stderr: {err!r}"
        if "--json" in argv and out.strip():
            return json.loads(out)
        return out + err

    run.url, run.blobs = url, blobs  # type: ignore[attr-defined]
    return run


def _write_blob(path, adapter) -> str:
    with open(path, "wb") as f:
        f.write(content.serialize(adapter))
    return str(path)


def test_cli_full_lifecycle(cli, tmp_path):
    f1 = _write_blob(tmp_path / "w1.safetensors", make_adapter(1))
    f2 = _write_blob(tmp_path / "w2.safetensors", make_adapter(2))
    (tmp_path / "train.json").write_text(json.dumps({"lr": 0.001}))
    fp = "ab" * 32
    r1 = cli(
        "commit",
        "alice",
        f1,
        "-m",
        "first",
        "--author",
        "carol",
        "--base-model",
        fp,
        "--training-data",
        "hf://chats@v1",
        "--training-config",
        str(tmp_path / "train.json"),
        "--json",
    )
    assert r1["number"] == 1 and r1["author"] == "carol"
    assert r1["provenance"]["base_model"] == fp and r1["provenance"]["training_config"] == {"lr": 0.001}
    r2 = cli("commit", "alice", f2, "-m", "second", "--json")
    assert r2["parent"] == 1
    # read commands, text and JSON
    log = cli("log", "alice", "--json")
    assert [r["number"] for r in log] == [2, 1]
    assert "second" in cli("log", "alice")
    assert cli("list", "--json") == ["alice"]
    shown = cli("show", "alice", "-r", "1", "--json")
    assert shown["content_hash"] == r1["content_hash"] and shown["residency"] == "none"
    assert "hf://chats@v1" in cli("show", "alice", "-r", "1")
    d = cli("diff", "alice", "1", "2", "--json")
    assert d["rev_a"] == 1 and any(t["status"] == "changed" for t in d["tensors"])
    assert "changed" in cli("diff", "alice", "1")
    # tags
    cli("tag", "alice", "v1", "-r", "1")
    assert cli("tag", "alice", "--json") == {"v1": 1}
    assert "already names revision 1" in cli("tag", "alice", "v1", "-r", "2", expect=1)
    cli("tag", "alice", "v1", "-r", "2", "--force")
    # gates, evaluations, promotion
    cli("gate", "alice", "qa", "acc", "--tolerance", "0.05")
    assert cli("gate", "alice", "--json") == [
        {"suite": "qa", "metric": "acc", "higher_is_better": True, "tolerance": 0.05}
    ]
    refused = cli("promote", "alice", "-r", "1", "--json", expect=3)
    assert refused["refused"] and refused["gate_report"][0]["status"] == "missing"
    cli("eval", "alice", "-r", "1", "--suite", "qa", "--metric", "acc=0.9")
    cli("eval", "alice", "-r", "2", "--suite", "qa", "--metric", "acc=0.5")
    assert [e["value"] for e in cli("eval", "alice", "-r", "1", "--json")] == [0.9]
    p = cli("promote", "alice", "-r", "1", "--by", "dave", "--json")
    assert p["to_revision"] == 1 and not p["forced"] and p["actor"] == "dave"
    assert "worse by 0.4" in cli("promote", "alice", "-r", "2", expect=3)
    forced = cli(
        "promote", "alice", "-r", "2", "--force", "--by", "erin", "--reason", "incident 12", "--json"
    )
    assert forced["forced"] and forced["actor"] == "erin" and forced["reason"] == "incident 12"
    history = cli("show", "alice", "--json")["serving_history"]
    assert [(h["to_revision"], h["forced"], h["actor"]) for h in history] == [
        (1, False, "dave"),
        (2, True, "erin"),
    ]
    back = cli("rollback", "alice", "--by", "frank", "--json")
    assert (back["from_revision"], back["to_revision"], back["actor"]) == (2, 1, "frank")
    assert cli("show", "alice", "-r", "serving", "--json")["number"] == 1
    # maintenance
    v = cli("verify", "--json")
    assert v["ok"] and v["revisions_checked"] == 2
    assert cli("gc", "--min-age", "0", "--json")["deleted"] == []
    # export both ways, and import the PEFT directory back
    cli("export", "alice", str(tmp_path / "peft"), "-r", "1")
    cli("export", "alice", str(tmp_path / "raw.safetensors"), "-r", "1", "--format", "minlora")
    imp = cli("import", str(tmp_path / "peft"), "--json")  # id from the directory name
    assert imp["adapter_id"] == "peft" and imp["number"] == 1
    raw = cli("commit", "bob", str(tmp_path / "raw.safetensors"), "--json")
    assert raw["content_hash"] == r1["content_hash"]  # same weights, same identity


def test_cli_eval_runner(cli, tmp_path, monkeypatch):
    f1 = _write_blob(tmp_path / "w1.safetensors", make_adapter(1))
    cli("commit", "a1", f1)
    cli("commit", "a2", f1)
    mod = tmp_path / "my_evals.py"
    mod.write_text(
        "def modules(adapter, revision):\n"
        "    return {'n_modules': len(adapter.modules), 'rev': revision.number}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    res = cli("eval", "--runner", "my_evals:modules", "--suite", "shape", "--json")
    assert sorted((e["adapter_id"], e["metric"], e["value"]) for e in res) == [
        ("a1", "n_modules", 2.0),
        ("a1", "rev", 1.0),
        ("a2", "n_modules", 2.0),
        ("a2", "rev", 1.0),
    ]
    assert "MODULE:FUNCTION" in cli("eval", "--runner", "nocolon", expect=1)


def test_cli_bad_input(cli, tmp_path):
    f1 = _write_blob(tmp_path / "w1.safetensors", make_adapter(1))
    assert "path separator" in cli("commit", "a/b", f1, expect=1)
    assert "control character" in cli("log", "bad\x01id", expect=1)
    assert "no adapter 'ghost'" in cli("show", "ghost", expect=1)
    cli("commit", "real", f1)
    assert "no revision 7" in cli("show", "real", "-r", "7", expect=1)
    assert "no revision, tag or hash prefix 'nope'" in cli("diff", "real", "1", "nope", expect=1)
    assert "NAME=VALUE" in cli("eval", "real", "--metric", "acc", expect=1)
    assert "not a number" in cli("eval", "real", "--metric", "acc=high", expect=1)
    assert "finite" in cli("eval", "real", "--metric", "acc=nan", expect=1)
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 50)
    assert "not a PEFT directory" in cli("commit", "real", str(tmp_path / "junk.bin"), expect=1)
    assert "no earlier" in cli("promote", "real") + cli("rollback", "real", expect=1)
    assert "fingerprint" in cli("commit", "real", f1, "--base-model", "xyz", expect=1)
    # a corrupted blob: verify and load name the revision, exit 4
    with Registry(cli.url, cli.blobs) as reg:
        path = reg.blobs.path(reg.show("real").content_hash)
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    out = cli("verify", expect=4)
    assert "'real' revision 1" in out and "corrupted" in out
    assert "'real' revision 1" in cli("export", "real", str(tmp_path / "x"), expect=4)
    with pytest.raises(SystemExit) as info:
        main(["adapters", "--url", cli.url, "frobnicate"])
    assert info.value.code == 2


def test_cli_subprocess_end_to_end(tmp_path):
    """The real console entry point, in a separate process, with the default SQLite layout
    under MINLORA_HOME."""
    _write_blob(tmp_path / "w.safetensors", make_adapter(4))
    env = {
        **os.environ,
        "MINLORA_HOME": str(tmp_path / "home"),
        "MINLORA_USER": "ci-bot",
        "PYTHONPATH": pythonpath(),
    }
    script = (
        "import sys\n"
        "from minlora.cli import main\n"
        "codes = [main(a.split('|')) for a in sys.argv[1:]]\n"
        "print('CODES', codes)\n"
    )
    calls = [
        f"adapters|commit|u1|{tmp_path / 'w.safetensors'}|-m|hello",
        "adapters|log|u1|--json",
        "adapters|promote|u1",
        "adapters|show|u1|-r|nope",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", script, *calls], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "CODES [0, 0, 0, 1]" in proc.stdout
    assert '"author": "ci-bot"' in proc.stdout and "no revision, tag or hash prefix 'nope'" in proc.stderr
    assert (tmp_path / "home" / "registry.db").exists()
    # and `python -m minlora adapters` itself
    proc = subprocess.run(
        [sys.executable, "-m", "minlora", "adapters", "log", "u1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "hello" in proc.stdout and "serving" in proc.stdout
