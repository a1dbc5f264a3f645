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

from .errors import DamagedDatabaseError

__all__ = ["database_name", "is_damage", "is_transient", "make_engine", "run_transaction", "transaction"]

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


def database_name(url: str | sa.engine.URL) -> str:
    """How messages name a database: the file of a SQLite database, else the URL without
    its password."""
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return os.path.abspath(u.database)
    return u.render_as_string(hide_password=True)


def _sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


def is_damage(exc: BaseException) -> bool:
    """True for errors that say the database file itself is broken (SQLite's "file is not a
    database" and "database disk image is malformed"; PostgreSQL's data_corrupted and
    index_corrupted)."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    name = getattr(exc.orig, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or _sqlstate(exc) in ("XX001", "XX002")


def damaged(url: str | sa.engine.URL, why: object) -> DamagedDatabaseError:
    name = database_name(url)
    return DamagedDatabaseError(
        f"the registry database {name} is damaged ({why}); the registry will not use it "
        "(restore it from a backup)",
        database=name,
    )


def is_transient(exc: BaseException) -> bool:
    """True for errors that a fresh attempt of the same transaction may not hit again."""
    if isinstance(exc, sa.exc.IntegrityError):
        # Two PostgreSQL writers allocated the same revision number or created the same
        # adapter: a unique violation that the next attempt resolves by seeing the winner's
        # row.  Any other constraint failure (NOT NULL, foreign key, CHECK) fails the same
        # way every time, and SQLite serialises its writers (BEGIN IMMEDIATE), so there an
        # integrity error is never a race.
        return _sqlstate(exc) == "23505"
    if isinstance(exc, sa.exc.OperationalError):
        msg = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
        if "locked" in msg or "busy" in msg:
            return True
    if isinstance(exc, sa.exc.DBAPIError):
        # 40001 serialization_failure, 40P01 deadlock_detected, 55P03 lock_not_available
        if _sqlstate(exc) in ("40001", "40P01", "55P03"):
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
    conflicts; a damaged database raises DamagedDatabaseError naming it.  `fn` may run more
    than once, so whatever it does besides the database must be harmless to repeat."""
    delay = 0.005
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with transaction(engine, write=write) as conn:
                return fn(conn)
        except sa.exc.DBAPIError as exc:
            if is_damage(exc):
                raise damaged(engine.url, exc.orig) from exc
            if attempt == MAX_ATTEMPTS or not is_transient(exc):
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
    raise AssertionError("unreachable")
