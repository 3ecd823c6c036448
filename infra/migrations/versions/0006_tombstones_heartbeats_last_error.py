"""annotation tombstones, worker heartbeats, a cycle's last error and note

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 01:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "annotationtombstone",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("project.id"), nullable=False),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("project_id", "source", "external_id", name="uq_annotation_tombstone"),
    )
    op.create_table(
        "workerheartbeat",
        sa.Column("name", sa.String(length=200), primary_key=True),
        sa.Column("queues", sa.String(length=400), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("cycle", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_error", sa.String(length=4000), nullable=True))
        batch_op.add_column(sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("note", sa.String(length=400), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cycle", schema=None) as batch_op:
        batch_op.drop_column("note")
        batch_op.drop_column("last_error_at")
        batch_op.drop_column("last_error")
    op.drop_table("workerheartbeat")
    op.drop_table("annotationtombstone")
