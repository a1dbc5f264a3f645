"""Optional optimizer-state blob per revision (revision_states).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revision_states",
        sa.Column("revision_pk", sa.Integer, sa.ForeignKey("revisions.pk"), primary_key=True),
        sa.Column("content_hash", sa.String(64), sa.ForeignKey("blobs.content_hash"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_revision_states_content_hash", "revision_states", ["content_hash"])


def downgrade() -> None:
    op.drop_index("ix_revision_states_content_hash", table_name="revision_states")
    op.drop_table("revision_states")
