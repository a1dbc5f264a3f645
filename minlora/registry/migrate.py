"""Bring a registry database to the newest schema at open (alembic, versioned scripts in
migrations/versions).  Several processes may open a fresh registry at once: the migration
runs inside a write transaction that serialises them (SQLite: BEGIN IMMEDIATE; PostgreSQL:
a transaction-scoped advisory lock), so the second one finds the schema already current."""

from __future__ import annotations

import os

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from .db import transaction
from .errors import RegistryError

__all__ = ["current_revision", "head_revision", "upgrade"]

_HERE = os.path.dirname(os.path.abspath(__file__))
# Any constant works; it only has to be the same for every minlora process.
_PG_LOCK_KEY = 0x6D696E6C6F7261  # "minlora"


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", os.path.join(_HERE, "migrations"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Migrate to head; refuse a database written by a newer minlora."""
    cfg = _config()
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    # Fast path without the write lock: most opens find the schema current.
    current = current_revision(engine)
    if current == head:
        return
    with transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and current != head:
            try:
                script.get_revision(current)
            except Exception:
                raise RegistryError(
                    f"the registry database is at schema revision {current!r}, unknown to this "
                    f"minlora (its newest is {head!r}); upgrade minlora"
                ) from None
        if current != head:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
