"""Database engines and transactions: SQLite tuned for several processes, PostgreSQL as is,
and one retry loop for the transient conflicts both produce under concurrency."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

__all__ = ["is_transient", "make_engine", "run_transaction", "transaction"]

T = TypeVar("T")

# How long one SQLite connection waits for a lock before it reports "database is locked";
# the retry loop below then waits again, so a busy registry slows down instead of failing.
SQLITE_BUSY_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 30


def make_engine(url: str) -> Engine:
    """An engine for `url`; for SQLite, one set up for crash safety and many writers:

    - WAL journal: readers never block the writer and a killed writer leaves the database
      consistent (the uncommitted tail of the WAL is ignored on the next open).
    - synchronous=NORMAL: in WAL mode this is still safe against the *process* dying at any
      instant; only an OS crash or power cut can lose the last commits (never corrupt).  FULL
      would fsync every commit, which is the difference between minutes and hours for a
      million registrations.  Set MINLORA_SQLITE_SYNCHRONOUS=FULL to choose durability.
    - BEGIN IMMEDIATE: a write transaction takes the write lock when it starts, so two
      writers queue on the busy timeout instead of both reading and then one failing to
      upgrade its lock (SQLite's classic deadlock -> SQLITE_BUSY at once).
    """
    u = sa.engine.make_url(url)
    if u.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True, future=True)
    if u.database and u.database != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(u.database)), exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, future=True)
    sync = os.environ.get("MINLORA_SQLITE_SYNCHRONOUS", "NORMAL").upper()
    if sync not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"MINLORA_SQLITE_SYNCHRONOUS must be OFF, NORMAL, FULL or EXTRA, got {sync!r}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is DEFERRED).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={sync}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write", False) else "BEGIN")

    return engine


def is_transient(exc: BaseException) -> bool:
    """True for errors that a fresh attempt of the same transaction may not hit again."""
    if isinstance(exc, sa.exc.IntegrityError):
        # Two writers allocated the same revision number or created the same adapter; the
        # next attempt sees the winner's row and picks the next number / reuses the adapter.
        return True
    if isinstance(exc, sa.exc.OperationalError):
        msg = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
        if "locked" in msg or "busy" in msg:
            return True
    if isinstance(exc, sa.exc.DBAPIError):
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        # 40001 serialization_failure, 40P01 deadlock_detected, 55P03 lock_not_available
        if code in ("40001", "40P01", "55P03"):
            return True
    return False


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Connection]:
    """One transaction; `write=False` lets SQLite readers run beside a writer."""
    with engine.connect() as conn:
        conn.info["write"] = write
        try:
            with conn.begin():
                yield conn
        finally:
            conn.info["write"] = False


def run_transaction(engine: Engine, fn: Callable[[Connection], T], *, write: bool = True) -> T:
    """Run `fn(conn)` in a transaction, retrying it (with jittered backoff) on transient
    conflicts.  `fn` must only touch the database, so running it again is harmless."""
    delay = 0.005
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with transaction(engine, write=write) as conn:
                return fn(conn)
        except sa.exc.DBAPIError as exc:
            if attempt == MAX_ATTEMPTS or not is_transient(exc):
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
    raise AssertionError("unreachable")
