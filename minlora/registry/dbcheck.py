"""Opening a registry database without ever mistaking a damaged one for a new one.

A SQLite registry file is created whole: the schema is built in a temporary file beside it,
which is then linked into place, so a file under the registry's name always holds the
schema.  An existing file that is empty, is not SQLite, or lacks the registry's schema is
therefore damage (a truncation, a bad restore, a wrong path), and re-initialising it would
make `verify` report an empty registry as healthy and `gc` delete every blob as
unreferenced; it is refused with DamagedDatabaseError instead.  A PostgreSQL database is
created empty by its administrator, so there a database with no tables at all is new.
"""

from __future__ import annotations

import os
import sqlite3
import uuid

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import migrate
from . import schema as S
from .db import damaged, database_name, is_damage, make_engine, transaction
from .errors import DamagedDatabaseError, RegistryError

__all__ = ["open_checked", "problems"]

_SQLITE_MAGIC = b"SQLite format 3\x00"
_VERSION_TABLE = "alembic_version"


def _sqlite_file(url: str) -> str | None:
    u = sa.engine.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    if u.database.startswith("file:") or u.query.get("uri"):
        return None  # URI filenames: left to SQLite, checked like a server database
    return os.path.abspath(u.database)


def _refuse(path: str, why: str) -> DamagedDatabaseError:
    return DamagedDatabaseError(
        f"the registry database {path} {why}; the registry will not use it, nor re-initialise it "
        "(restore it from a backup, or move it away to start an empty registry)",
        database=path,
    )


def _check_file(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
    if not head:
        raise _refuse(path, "is empty (0 bytes)")
    if head != _SQLITE_MAGIC:
        raise _refuse(path, "is not a SQLite database (its header is damaged, or it is another file)")


def _fsync(path: str, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_whole(url: str, path: str) -> None:
    """Build the schema in a temporary file and link it to `path`, unless another process
    got there first (then its database is used)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.new-{uuid.uuid4().hex}"
    engine = make_engine(sa.engine.make_url(url).set(database=tmp).render_as_string(hide_password=False))
    try:
        migrate.upgrade(engine)
        raw = engine.raw_connection()  # autocommit: the journal mode cannot change in a transaction
        try:
            # Fold the WAL into the main file, so the one file linked below is the database.
            raw.cursor().execute("PRAGMA journal_mode=DELETE")
        finally:
            raw.close()
    finally:
        engine.dispose()
    try:
        _fsync(tmp)
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not os.path.exists(path):
                os.rename(tmp, path)
        _fsync(directory, directory=True)
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _judge(tables: set[str], name: str, *, new_allowed: bool, migrated: bool = False) -> None:
    """Refuse a database whose tables are not the registry's (see the module docstring).
    Before migration (`migrated` False) only the tables of every schema version are required:
    an older registry lacks the tables of later migrations until it is upgraded."""
    ours = set(S.metadata.tables) if migrated else set(S.INITIAL_TABLES)
    if _VERSION_TABLE not in tables:
        if tables & ours:
            missing = sorted(ours - tables) + [_VERSION_TABLE]
            raise _refuse(name, f"lacks tables of the registry ({', '.join(missing)})")
        if not new_allowed:
            raise _refuse(name, "has no registry schema (it is another SQLite database, or it was damaged)")
        return
    missing = sorted(ours - tables)
    if missing:
        raise _refuse(name, f"lacks tables of the registry ({', '.join(missing)})")


def _sqlite_tables(path: str) -> set[str]:
    # A plain connection: the registry's engine would switch the file to WAL, and a file
    # that turns out not to be a registry must be left as it was found.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise _refuse(path, f"is damaged ({exc})") from None
    finally:
        conn.close()


def _engine_tables(engine: Engine) -> set[str]:
    with transaction(engine, write=False) as conn:
        return set(sa.inspect(conn).get_table_names())


def open_checked(url: str) -> Engine:
    """An engine on the registry database at `url`, checked and migrated to the newest
    schema (see the module docstring).  Raises DamagedDatabaseError for a damaged database
    and RegistryError when it cannot be reached."""
    path = _sqlite_file(url)
    if path is not None:
        if not os.path.exists(path):
            _create_whole(url, path)
        _check_file(path)
        _judge(_sqlite_tables(path), path, new_allowed=False)
    engine = make_engine(url)
    try:
        if path is None:
            _judge(_engine_tables(engine), database_name(url), new_allowed=True)
        migrate.upgrade(engine)
        _judge(_engine_tables(engine), database_name(url), new_allowed=False, migrated=True)
    except RegistryError:
        engine.dispose()
        raise
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        if is_damage(exc):
            raise damaged(url, exc.orig) from exc
        raise RegistryError(f"cannot open the registry database {database_name(url)}: {exc.orig}") from exc
    return engine


def problems(engine: Engine) -> list[str]:
    """What SQLite's structural check (PRAGMA quick_check) finds wrong, [] when nothing (and
    on PostgreSQL, whose server keeps its own storage consistent)."""
    if engine.dialect.name != "sqlite":
        return []
    try:
        with transaction(engine, write=False) as conn:
            rows = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check")]
    except sa.exc.DBAPIError as exc:
        if is_damage(exc):
            return [str(exc.orig)]
        raise
    return [] if rows == ["ok"] else rows
