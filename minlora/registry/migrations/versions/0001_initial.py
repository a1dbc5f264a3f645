"""Initial registry schema: adapters, blobs, revisions (with provenance), tags, the serving
pointer and its event log, evaluations, promotion gates.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# A migration spells out its tables instead of importing minlora.registry.schema: the live
# schema moves on, and this file must keep creating what version 0001 was.
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("adapter_id", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "blobs",
        sa.Column("content_hash", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "revisions",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("adapter_pk", sa.Integer, sa.ForeignKey("adapters.pk"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("content_hash", sa.String(64), sa.ForeignKey("blobs.content_hash"), nullable=False),
        sa.Column("parent_pk", sa.Integer, sa.ForeignKey("revisions.pk"), nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("author", sa.String(256), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("base_model", sa.String(64), nullable=True),
        sa.Column("training_data", sa.Text, nullable=True),
        sa.Column("training_config", sa.JSON, nullable=True),
        sa.Column("minlora_version", sa.String(32), nullable=False),
        sa.Column("torch_version", sa.String(64), nullable=False),
        sa.Column("extra", sa.JSON, nullable=True),
        sa.UniqueConstraint("adapter_pk", "number", name="uq_revisions_adapter_number"),
    )
    op.create_index("ix_revisions_content_hash", "revisions", ["content_hash"])
    op.create_table(
        "tags",
        sa.Column("adapter_pk", sa.Integer, sa.ForeignKey("adapters.pk"), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("revision_pk", sa.Integer, sa.ForeignKey("revisions.pk"), nullable=False),
        sa.Column("author", sa.String(256), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "serving",
        sa.Column("adapter_pk", sa.Integer, sa.ForeignKey("adapters.pk"), primary_key=True),
        sa.Column("revision_pk", sa.Integer, sa.ForeignKey("revisions.pk"), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "serving_events",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("adapter_pk", sa.Integer, sa.ForeignKey("adapters.pk"), nullable=False),
        sa.Column("from_revision_pk", sa.Integer, sa.ForeignKey("revisions.pk"), nullable=True),
        sa.Column("to_revision_pk", sa.Integer, sa.ForeignKey("revisions.pk"), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("forced", sa.Boolean, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("gate_report", sa.JSON, nullable=True),
        sa.Column("at", TS, nullable=False),
    )
    op.create_index("ix_serving_events_adapter", "serving_events", ["adapter_pk", "pk"])
    op.create_table(
        "evaluations",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("revision_pk", sa.Integer, sa.ForeignKey("revisions.pk"), nullable=False),
        sa.Column("suite", sa.String(128), nullable=False),
        sa.Column("metric", sa.String(128), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("author", sa.String(256), nullable=False),
        sa.Column("recorded_at", TS, nullable=False),
        sa.Column("details", sa.JSON, nullable=True),
    )
    op.create_index("ix_evaluations_revision", "evaluations", ["revision_pk", "suite", "metric"])
    op.create_table(
        "gates",
        sa.Column("adapter_pk", sa.Integer, sa.ForeignKey("adapters.pk"), primary_key=True),
        sa.Column("suite", sa.String(128), primary_key=True),
        sa.Column("metric", sa.String(128), primary_key=True),
        sa.Column("higher_is_better", sa.Boolean, nullable=False),
        sa.Column("tolerance", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for name in (
        "gates",
        "evaluations",
        "serving_events",
        "serving",
        "tags",
        "revisions",
        "blobs",
        "adapters",
    ):
        op.drop_table(name)
