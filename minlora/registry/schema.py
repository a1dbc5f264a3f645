"""The registry's tables (SQLAlchemy Core).  The migrations in migrations/versions create
exactly these; tests/registry/test_registry.py checks that the two agree.

Design notes:
- `revisions` is append-only: rows are inserted, never updated or deleted.  The movable
  things (the serving pointer, tags) live in their own small tables, and every move of the
  serving pointer is logged in `serving_events`, so "who served what, when, and why" is
  itself append-only history.
- `blobs` lists the content hashes that have a stored blob; a revision row and (when new)
  its blob row are inserted in one transaction, after the blob file is durably written.
- `revision_states` gives a revision its optional optimizer-state blob (minlora.formats.state:
  Adam moments and step counts, for a bit-exact resume); it is inserted with the revision, in
  the same transaction, and its blob is a row of `blobs` like the weights' (so gc keeps it).
- Timestamps are UTC; SQLite stores them without a zone and the registry re-attaches UTC.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "INITIAL_TABLES",
    "adapters",
    "blobs",
    "evaluations",
    "gates",
    "metadata",
    "revision_states",
    "revisions",
    "serving",
    "serving_events",
    "tags",
]

metadata = sa.MetaData()


def _pk() -> sa.Column:
    """The surrogate key of a table that other tables refer to."""
    return sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True)


def _ref(name: str, target: str, **kw: bool) -> sa.Column:
    """An integer column referring to `target` ("table.pk")."""
    return sa.Column(name, sa.Integer, sa.ForeignKey(target), **kw)


def _blob_ref() -> sa.Column:
    """The content hash of a stored blob (indexed: gc looks blobs up by it)."""
    return sa.Column("content_hash", sa.String(64), sa.ForeignKey("blobs.content_hash"), nullable=False,
                     index=True)


def _time(name: str) -> sa.Column:
    """A timestamp (UTC, see above)."""
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def _who(name: str) -> sa.Column:
    """The author or actor of a change."""
    return sa.Column(name, sa.String(256), nullable=False)


def _adapter_history(name: str, *columns: sa.Column | sa.Constraint | sa.Index) -> sa.Table:
    """An append-only table of one adapter's history: its own key, the adapter, then `columns`."""
    return sa.Table(name, metadata, _pk(), _ref("adapter_pk", "adapters.pk", nullable=False), *columns)


adapters = sa.Table(
    "adapters",
    metadata,
    _pk(),
    sa.Column("adapter_id", sa.String(128), nullable=False, unique=True),
    _time("created_at"),
)

blobs = sa.Table(
    "blobs",
    metadata,
    sa.Column("content_hash", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    _time("created_at"),
)

revisions = _adapter_history(
    "revisions",
    sa.Column("number", sa.Integer, nullable=False),
    _blob_ref(),
    _ref("parent_pk", "revisions.pk", nullable=True),
    sa.Column("message", sa.Text, nullable=False),
    _who("author"),
    _time("created_at"),
    # provenance
    sa.Column("base_model", sa.String(64), nullable=True),
    sa.Column("training_data", sa.Text, nullable=True),
    sa.Column("training_config", sa.JSON, nullable=True),
    sa.Column("minlora_version", sa.String(32), nullable=False),
    sa.Column("torch_version", sa.String(64), nullable=False),
    sa.Column("extra", sa.JSON, nullable=True),
    sa.UniqueConstraint("adapter_pk", "number", name="uq_revisions_adapter_number"),
)

revision_states = sa.Table(
    "revision_states",
    metadata,
    _ref("revision_pk", "revisions.pk", primary_key=True),
    _blob_ref(),
    _time("created_at"),
)

tags = sa.Table(
    "tags",
    metadata,
    _ref("adapter_pk", "adapters.pk", primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    _ref("revision_pk", "revisions.pk", nullable=False),
    _who("author"),
    _time("created_at"),
)

serving = sa.Table(
    "serving",
    metadata,
    _ref("adapter_pk", "adapters.pk", primary_key=True),
    _ref("revision_pk", "revisions.pk", nullable=False),
    _time("updated_at"),
)

serving_events = _adapter_history(
    "serving_events",
    _ref("from_revision_pk", "revisions.pk", nullable=True),
    _ref("to_revision_pk", "revisions.pk", nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # "promote" | "rollback"
    sa.Column("forced", sa.Boolean, nullable=False),
    _who("actor"),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("gate_report", sa.JSON, nullable=True),
    _time("at"),
    sa.Index("ix_serving_events_adapter", "adapter_pk", "pk"),
)

evaluations = sa.Table(
    "evaluations",
    metadata,
    _pk(),
    _ref("revision_pk", "revisions.pk", nullable=False),
    sa.Column("suite", sa.String(128), nullable=False),
    sa.Column("metric", sa.String(128), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    _who("author"),
    _time("recorded_at"),
    sa.Column("details", sa.JSON, nullable=True),
    sa.Index("ix_evaluations_revision", "revision_pk", "suite", "metric"),
)

# The tables every registry database has at any schema version (migration 0001 made them);
# the others come with later migrations, so a database opened before it is migrated may lack them.
INITIAL_TABLES = frozenset(
    {"adapters", "blobs", "revisions", "tags", "serving", "serving_events", "evaluations", "gates"}
)

gates = sa.Table(
    "gates",
    metadata,
    _ref("adapter_pk", "adapters.pk", primary_key=True),
    sa.Column("suite", sa.String(128), primary_key=True),
    sa.Column("metric", sa.String(128), primary_key=True),
    sa.Column("higher_is_better", sa.Boolean, nullable=False),
    sa.Column("tolerance", sa.Float, nullable=False),
)
