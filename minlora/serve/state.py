"""What the service keeps across restarts: sessions, training runs, checkpoints, samplers, boots.

The weights themselves are registry revisions; this store maps the tinker API's names onto
them (a checkpoint row is (run, type, name) -> (registry adapter, revision number)) and keeps
what the registry has no place for (owners, sessions, loss histories, TTLs).  SQLAlchemy Core
on any URL the registry takes: by default a SQLite file beside the registry (`serve.db`).

Each boot of the server records a row; request ids name their boot, so a future asked for
after a restart is known to have been lost (futures themselves live in memory).
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import sqlalchemy as sa

from ..registry.db import make_engine, run_transaction

__all__ = ["CheckpointRecord", "RunRecord", "SamplerRecord", "SessionRecord", "StateStore"]

SCHEMA_VERSION = "1"
MAX_LOSS_HISTORY = 10_000

meta = sa.MetaData()
settings_t = sa.Table(
    "serve_settings", meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
boots_t = sa.Table(
    "serve_boots", meta,
    sa.Column("boot_id", sa.String(32), primary_key=True),
    sa.Column("started_at", sa.Float, nullable=False),
)
sessions_t = sa.Table(
    "serve_sessions", meta,
    sa.Column("session_id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Column("end_reason", sa.String(200)),
    sa.Column("tags", sa.Text, nullable=False),
    sa.Column("user_metadata", sa.Text, nullable=False),
    sa.Column("sdk_version", sa.String(64)),
)
runs_t = sa.Table(
    "serve_runs", meta,
    sa.Column("run_id", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False, index=True),
    sa.Column("session_id", sa.String(64), nullable=False),
    sa.Column("adapter_id", sa.String(200), nullable=False),
    sa.Column("base_model", sa.String(400), nullable=False),
    sa.Column("lora_config", sa.Text, nullable=False),
    sa.Column("user_metadata", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_request_at", sa.Float, nullable=False),
    sa.Column("steps", sa.Integer, nullable=False),
    sa.Column("loss_history", sa.Text, nullable=False),
    # live: held by this boot; ended: unloaded or its session expired; lost: a restart dropped it
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("boot_id", sa.String(32), nullable=False),
)
checkpoints_t = sa.Table(
    "serve_checkpoints", meta,
    sa.Column("run_id", sa.String(128), primary_key=True),
    sa.Column("checkpoint_type", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False, index=True),
    sa.Column("adapter_id", sa.String(200), nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("public", sa.Boolean, nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("step", sa.Integer, nullable=False),
)
samplers_t = sa.Table(
    "serve_samplers", meta,
    sa.Column("sampler_id", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("session_id", sa.String(64), nullable=False, index=True),
    # base | revision | serving | snapshot (weights held in memory only)
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("adapter_id", sa.String(200)),
    sa.Column("revision", sa.Integer),
    sa.Column("model_path", sa.String(400)),
    sa.Column("created_at", sa.Float, nullable=False),
)


@dataclass
class SessionRecord:
    session_id: str
    owner: str
    created_at: float
    ended_at: Optional[float] = None
    end_reason: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    sdk_version: Optional[str] = None


@dataclass
class RunRecord:
    run_id: str
    owner: str
    session_id: str
    adapter_id: str  # the registry adapter its checkpoints are revisions of
    base_model: str
    lora_config: dict[str, Any]
    user_metadata: dict[str, Any]
    created_at: float
    last_request_at: float
    steps: int = 0
    loss_history: list[list[float]] = field(default_factory=list)  # [step, loss:sum] pairs
    state: str = "live"
    boot_id: str = ""


@dataclass
class CheckpointRecord:
    run_id: str
    checkpoint_type: str  # training | sampler
    name: str
    owner: str
    adapter_id: str
    revision: int
    size_bytes: Optional[int]
    created_at: float
    public: bool = False
    expires_at: Optional[float] = None
    step: int = 0


@dataclass
class SamplerRecord:
    sampler_id: str
    owner: str
    session_id: str
    kind: str
    adapter_id: Optional[str]
    revision: Optional[int]
    model_path: Optional[str]
    created_at: float


def _row(table: sa.Table, cls: type, row: Any) -> Any:
    values = dict(row._mapping)
    for name in ("tags", "user_metadata", "lora_config", "loss_history"):
        if name in values and isinstance(values[name], str):
            values[name] = json.loads(values[name])
    return cls(**{c.name: values[c.name] for c in table.columns})


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class StateStore:
    """The service's tables on one database (thread-safe: every call is one transaction)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        meta.create_all(self.engine)
        version = self._setting("schema_version")
        if version is None:
            self._set_setting("schema_version", SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            raise RuntimeError(f"the service state database {url} has schema {version}; this server needs {SCHEMA_VERSION}")

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ settings and boots

    def _setting(self, name: str) -> Optional[str]:
        def read(conn: sa.Connection) -> Optional[str]:
            return conn.execute(sa.select(settings_t.c.value).where(settings_t.c.name == name)).scalar()

        return run_transaction(self.engine, read, write=False)

    def _set_setting(self, name: str, value: str) -> None:
        def write(conn: sa.Connection) -> None:
            if conn.execute(sa.select(settings_t.c.name).where(settings_t.c.name == name)).first() is None:
                conn.execute(settings_t.insert().values(name=name, value=value))
            else:
                conn.execute(settings_t.update().where(settings_t.c.name == name).values(value=value))

        run_transaction(self.engine, write)

    def secret(self) -> bytes:
        """The server's signing secret (made once, kept across restarts so tokens stay valid)."""
        def get_or_make(conn: sa.Connection) -> str:
            value = conn.execute(sa.select(settings_t.c.value).where(settings_t.c.name == "secret")).scalar()
            if value is None:
                value = secrets.token_hex(32)
                conn.execute(settings_t.insert().values(name="secret", value=value))
            return value

        return bytes.fromhex(run_transaction(self.engine, get_or_make))

    def start_boot(self) -> str:
        """Records a new boot; runs still live from an earlier boot are marked lost."""
        boot_id = secrets.token_hex(6)

        def write(conn: sa.Connection) -> None:
            conn.execute(boots_t.insert().values(boot_id=boot_id, started_at=time.time()))
            conn.execute(runs_t.update().where(runs_t.c.state == "live").values(state="lost"))

        run_transaction(self.engine, write)
        return boot_id

    def is_boot(self, boot_id: str) -> bool:
        def read(conn: sa.Connection) -> bool:
            return conn.execute(sa.select(boots_t.c.boot_id).where(boots_t.c.boot_id == boot_id)).first() is not None

        return run_transaction(self.engine, read, write=False)

    def _record(self, table: sa.Table, cls: type, *where: Any) -> Any:
        """The row of `table` that `where` selects, as a `cls`; None if there is none."""
        def read(conn: sa.Connection) -> Any:
            row = conn.execute(sa.select(table).where(*where)).first()
            return None if row is None else _row(table, cls, row)

        return run_transaction(self.engine, read, write=False)

    # ------------------------------------------------------------------ sessions

    def add_session(self, rec: SessionRecord) -> None:
        values = dict(vars(rec), tags=_dump(rec.tags), user_metadata=_dump(rec.user_metadata))
        run_transaction(self.engine, lambda conn: conn.execute(sessions_t.insert().values(**values)))

    def session(self, session_id: str) -> Optional[SessionRecord]:
        return self._record(sessions_t, SessionRecord, sessions_t.c.session_id == session_id)

    def sessions(self, owner: str, limit: int, offset: int) -> list[str]:
        def read(conn: sa.Connection) -> list[str]:
            q = (sa.select(sessions_t.c.session_id).where(sessions_t.c.owner == owner)
                 .order_by(sessions_t.c.created_at.desc()).limit(limit).offset(offset))
            return [r[0] for r in conn.execute(q)]

        return run_transaction(self.engine, read, write=False)

    def end_session(self, session_id: str, reason: str) -> None:
        def write(conn: sa.Connection) -> None:
            conn.execute(sessions_t.update().where(sessions_t.c.session_id == session_id)
                         .where(sessions_t.c.ended_at.is_(None)).values(ended_at=time.time(), end_reason=reason[:200]))
            conn.execute(runs_t.update().where(runs_t.c.session_id == session_id)
                         .where(runs_t.c.state == "live").values(state="ended"))

        run_transaction(self.engine, write)

    # ------------------------------------------------------------------ runs

    def add_run(self, rec: RunRecord) -> None:
        values = dict(vars(rec), lora_config=_dump(rec.lora_config), user_metadata=_dump(rec.user_metadata),
                      loss_history=_dump(rec.loss_history))
        run_transaction(self.engine, lambda conn: conn.execute(runs_t.insert().values(**values)))

    def run(self, run_id: str) -> Optional[RunRecord]:
        return self._record(runs_t, RunRecord, runs_t.c.run_id == run_id)

    def runs(self, owner: str, limit: int, offset: int) -> tuple[list[RunRecord], int]:
        def read(conn: sa.Connection) -> tuple[list[RunRecord], int]:
            where = runs_t.c.owner == owner
            total = conn.execute(sa.select(sa.func.count()).select_from(runs_t).where(where)).scalar() or 0
            q = sa.select(runs_t).where(where).order_by(runs_t.c.created_at.desc()).limit(limit).offset(offset)
            return [_row(runs_t, RunRecord, r) for r in conn.execute(q)], int(total)

        return run_transaction(self.engine, read, write=False)

    def runs_of_session(self, session_id: str) -> list[str]:
        def read(conn: sa.Connection) -> list[str]:
            q = sa.select(runs_t.c.run_id).where(runs_t.c.session_id == session_id).order_by(runs_t.c.created_at)
            return [r[0] for r in conn.execute(q)]

        return run_transaction(self.engine, read, write=False)

    def live_run_of_adapter(self, adapter_id: str) -> Optional[str]:
        def read(conn: sa.Connection) -> Optional[str]:
            q = sa.select(runs_t.c.run_id).where(runs_t.c.adapter_id == adapter_id).where(runs_t.c.state == "live")
            return conn.execute(q).scalar()

        return run_transaction(self.engine, read, write=False)

    def update_run(self, run_id: str, *, steps: Optional[int] = None, losses: Optional[list[list[float]]] = None,
                   state: Optional[str] = None) -> None:
        """Touches the run (last request time); adds optimizer steps / loss entries / a new state."""
        def write(conn: sa.Connection) -> None:
            values: dict[str, Any] = {"last_request_at": time.time()}
            if losses:
                row = conn.execute(sa.select(runs_t.c.loss_history).where(runs_t.c.run_id == run_id)).first()
                history = json.loads(row[0]) if row is not None else []
                values["loss_history"] = _dump((history + losses)[-MAX_LOSS_HISTORY:])
            if steps is not None:
                values["steps"] = steps
            if state is not None:
                values["state"] = state
            conn.execute(runs_t.update().where(runs_t.c.run_id == run_id).values(**values))

        run_transaction(self.engine, write)

    # ------------------------------------------------------------------ checkpoints

    def put_checkpoint(self, rec: CheckpointRecord, *, overwrite: bool) -> bool:
        """Adds (or, with overwrite, replaces) a checkpoint row; False when it exists and not overwrite."""
        def write(conn: sa.Connection) -> bool:
            key = (checkpoints_t.c.run_id == rec.run_id, checkpoints_t.c.checkpoint_type == rec.checkpoint_type,
                   checkpoints_t.c.name == rec.name)
            exists = conn.execute(sa.select(checkpoints_t.c.name).where(*key)).first() is not None
            if exists and not overwrite:
                return False
            if exists:
                conn.execute(checkpoints_t.delete().where(*key))
            conn.execute(checkpoints_t.insert().values(**vars(rec)))
            return True

        return run_transaction(self.engine, write)

    def checkpoint(self, run_id: str, checkpoint_type: str, name: str) -> Optional[CheckpointRecord]:
        c = checkpoints_t.c
        return self._record(checkpoints_t, CheckpointRecord,
                            c.run_id == run_id, c.checkpoint_type == checkpoint_type, c.name == name)

    def checkpoints(self, *, run_id: Optional[str] = None, owner: Optional[str] = None,
                    limit: Optional[int] = None, offset: int = 0) -> tuple[list[CheckpointRecord], int]:
        def read(conn: sa.Connection) -> tuple[list[CheckpointRecord], int]:
            conds = []
            if run_id is not None:
                conds.append(checkpoints_t.c.run_id == run_id)
            if owner is not None:
                conds.append(checkpoints_t.c.owner == owner)
            total = conn.execute(sa.select(sa.func.count()).select_from(checkpoints_t).where(*conds)).scalar() or 0
            q = sa.select(checkpoints_t).where(*conds).order_by(checkpoints_t.c.created_at.desc()).offset(offset)
            if limit is not None:
                q = q.limit(limit)
            return [_row(checkpoints_t, CheckpointRecord, r) for r in conn.execute(q)], int(total)

        return run_transaction(self.engine, read, write=False)

    def set_checkpoint(self, rec: CheckpointRecord, **values: Any) -> None:
        def write(conn: sa.Connection) -> None:
            conn.execute(checkpoints_t.update().where(
                checkpoints_t.c.run_id == rec.run_id, checkpoints_t.c.checkpoint_type == rec.checkpoint_type,
                checkpoints_t.c.name == rec.name).values(**values))

        run_transaction(self.engine, write)

    def delete_checkpoint(self, rec: CheckpointRecord) -> None:
        def write(conn: sa.Connection) -> None:
            conn.execute(checkpoints_t.delete().where(
                checkpoints_t.c.run_id == rec.run_id, checkpoints_t.c.checkpoint_type == rec.checkpoint_type,
                checkpoints_t.c.name == rec.name))

        run_transaction(self.engine, write)

    # ------------------------------------------------------------------ samplers

    def add_sampler(self, rec: SamplerRecord) -> None:
        run_transaction(self.engine, lambda conn: conn.execute(samplers_t.insert().values(**vars(rec))))

    def sampler(self, sampler_id: str) -> Optional[SamplerRecord]:
        return self._record(samplers_t, SamplerRecord, samplers_t.c.sampler_id == sampler_id)

    def samplers_of_session(self, session_id: str) -> list[str]:
        def read(conn: sa.Connection) -> list[str]:
            q = (sa.select(samplers_t.c.sampler_id).where(samplers_t.c.session_id == session_id)
                 .order_by(samplers_t.c.created_at))
            return [r[0] for r in conn.execute(q)]

        return run_transaction(self.engine, read, write=False)
