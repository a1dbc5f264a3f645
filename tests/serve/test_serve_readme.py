"""The README's service quickstart runs as written: its shell lines start `minlora serve` on a
tiny Llama directory, its Python trains a user's adapter with the tinker client and samples it.

Only the port changes (8000 may be taken on a test machine): every "8000" of the snippets is
replaced by a free port, and `--port` is given to the server line.  The server line ends in
`&`; the test starts it in the background itself, so it can stop it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request

import pytest

pytest.importorskip("tinker")

from helpers import REPO  # noqa: E402
from helpers.serve import free_port, model_dir, wait_until  # noqa: E402

README = os.path.join(REPO, "README.md")
HEADING = "## Serve: train and sample users' adapters through the tinker API"


def snippets() -> tuple[str, str]:
    text = open(README, encoding="utf-8").read()
    assert HEADING in text
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return shell, python


def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    shell, python = snippets()
    assert len(shell.strip().splitlines()) + len(python.strip().splitlines()) < 15
    os.rename(model_dir(str(tmp_path)), tmp_path / "tiny-llama")
    port = free_port()
    shell, python = shell.replace("8000", str(port)), python.replace("8000", str(port))
    env = dict(os.environ, PYTHONPATH=str(REPO), TINKER_TELEMETRY="0")
    server = None
    try:
        for line in filter(None, (ln.strip() for ln in shell.splitlines())):
            if line.endswith("&"):
                args = shlex.split(line[:-1]) + ["--port", str(port)]
                args[0] = sys.executable if args[0] == "python" else args[0]
                server = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            else:
                subprocess.run(line, shell=True, cwd=tmp_path, env=env, check=True, timeout=120)
        assert server is not None, "the quickstart starts no server"

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=1).status == 200
            except OSError:
                return False

        wait_until(up, 120, "the server to come up", period=0.3)
        monkeypatch.chdir(tmp_path)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(python, "README.md", "exec"), {"__name__": "__readme__"})
        printed = out.getvalue()
        assert "tokens" in printed or "SampleResponse" in printed
        log = subprocess.run([sys.executable, "-m", "minlora", "adapters", "--root", "minlora-home", "list", "--json"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert log.returncode == 0, log.stderr
        assert any(a.startswith("alice:") for a in json.loads(log.stdout))
    finally:
        if server is not None:
            server.kill()
            server.wait(30)
