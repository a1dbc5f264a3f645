"""What the registry tests build on: the two database backends, a throwaway PostgreSQL server,
small adapters, and worker processes for the crash and concurrency tests (the pytest
fixtures over these are in tests/registry/conftest.py; the workers' bodies in
helpers/registry_worker.py).

The PostgreSQL server is real: initdb + postgres from Debian's package (scripts/postgres.sh
installs it), in a temporary data directory, listening on a free loopback port, started
once per test session and stopped at its end.  Each test gets its own database.  Without
the binaries the PostgreSQL tests skip, except under CI (the CI variable set), where they
fail: CI must exercise them.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import torch

from minlora.formats import Adapter, LoraWeights

from . import pythonpath

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


# ---------------------------------------------------------------------- adapters


def make_adapter(
    seed: int,
    *,
    modules: tuple[str, ...] = ("layers.0.q_proj", "layers.0.v_proj"),
    rank: int = 2,
    features: int = 16,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.5,
    config: dict | None = None,
) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {
        name: LoraWeights(
            a=torch.randn(rank, features, generator=g).to(dtype),
            b=torch.randn(features, rank, generator=g).to(dtype),
            scale=scale,
        )
        for name in modules
    }
    return Adapter(
        modules=mods, config=dict(config if config is not None else {"r": rank, "lora_alpha": rank * scale})
    )


def assert_same_adapter(x: Adapter, y: Adapter) -> None:
    assert sorted(x.modules) == sorted(y.modules)
    for name in x.modules:
        a, b = x.modules[name], y.modules[name]
        assert a.a.dtype == b.a.dtype and a.b.dtype == b.b.dtype
        assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b), name
        assert a.scale == b.scale
    assert x.config == y.config


# ---------------------------------------------------------------------- PostgreSQL


def _pg_bindir() -> str | None:
    # MINLORA_PG_BINDIR chooses the binaries (and, pointing nowhere, simulates a machine
    # without them: the test of the skip / fail-under-CI rule uses that).
    forced = os.environ.get("MINLORA_PG_BINDIR")
    if forced is not None:
        return forced if os.path.isfile(os.path.join(forced, "initdb")) else None
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return os.path.dirname(found[-1]) if found else None


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the test process dies, even by SIGKILL, so an
    interrupted test run does not leave a PostgreSQL server behind."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A PostgreSQL server in a temporary directory, on 127.0.0.1:<free port>, trust auth
    (loopback only, throwaway data).  initdb and postgres refuse to run as root, so as root
    they run as the `postgres` system user (the Debian package creates it)."""

    USER = "minlora"

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.tmp = tempfile.mkdtemp(prefix="minlora-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.log = os.path.join(self.tmp, "server.log")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root and there is no 'postgres' user to run the server as"
                ) from None
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def start(self) -> None:
        subprocess.run(
            [
                *self.prefix,
                os.path.join(self.bindir, "initdb"),
                "-D",
                self.data,
                "-U",
                self.USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _attempt in range(5):  # another process may grab the port between probe and bind
            self.port = _free_port()
            logf = open(self.log, "ab")
            # fsync/full_page_writes off: the data is thrown away, and these tests kill
            # clients, never the server, so server-side durability is not what they measure.
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    os.path.join(self.bindir, "postgres"),
                    "-D",
                    self.data,
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    self.tmp,
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=100",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            logf.close()
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"PostgreSQL did not start; log:\n{self.tail()}")

    def _wait_ready(self) -> bool:
        import psycopg

        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def tail(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return "(no log)"

    def dsn(self, db: str) -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{db}"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://{self.USER}@127.0.0.1:{self.port}/{db}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to runuser is relayed; postgres does a smart shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def require_postgres_bindir() -> str:
    """The directory of initdb/postgres; without them: skip, or fail when CI is set."""
    bindir = _pg_bindir()
    if bindir is None:
        why = (
            "PostgreSQL server binaries (initdb, postgres) not found; run scripts/postgres.sh to install them"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI is set, so the PostgreSQL tests must run)", pytrace=False)
        pytest.skip(why)
    return bindir


def execute_sql(url: str, *statements: str) -> None:
    """Run SQL on a registry's database behind the registry's back (to damage or age it)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    engine.dispose()


# ---------------------------------------------------------------------- worker processes


def run_workers(procs: list, results, timeout: float) -> list:
    """Start the worker processes, take one result from each off `results`, wait for them
    to exit, and check that each exited cleanly."""
    for p in procs:
        p.start()
    got = [results.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return got


def worker_context() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that has already imported minlora and torch: a real
    separate process per worker (killable with SIGKILL) without paying the ~4 s import of
    torch for each of the many processes the crash test starts."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["minlora.registry", "helpers.registry_worker"])
    # Python 3.11's forkserver ignores the parent's sys.path, so a preload that is not on
    # PYTHONPATH fails silently (and each worker would import torch itself): start the server
    # with this checkout and tests/ on PYTHONPATH.
    from multiprocessing import forkserver

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = pythonpath()
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return ctx
