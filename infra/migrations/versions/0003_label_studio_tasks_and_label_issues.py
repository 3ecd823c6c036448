"""label studio tasks and label issues

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 16:59:15.413355
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "labeltask",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("external_task_id", sa.Integer(), nullable=True),
        sa.Column("model_version", sa.String(length=200), nullable=True),
        sa.Column("prediction_label", sa.String(length=200), nullable=True),
        sa.Column("prediction_score", sa.Float(), nullable=True),
        sa.Column("note", sa.String(length=1000), nullable=False, server_default=""),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["item.id"],
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "external_task_id", name="uq_label_task_external"),
    )
    with op.batch_alter_table("labeltask", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_labeltask_item_id"), ["item_id"], unique=False)
        batch_op.create_index(
            "uq_label_task_per_item",
            ["project_id", "item_id"],
            unique=True,
            sqlite_where=sa.text("kind = 'label'"),
            postgresql_where=sa.text("kind = 'label'"),
        )
        batch_op.create_index(
            "uq_review_task_open_per_item",
            ["project_id", "item_id"],
            unique=True,
            sqlite_where=sa.text("kind = 'review' AND state != 'answered'"),
            postgresql_where=sa.text("kind = 'review' AND state != 'answered'"),
        )

    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.add_column(sa.Column("label_issue", sa.String(length=1000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.drop_column("label_issue")

    with op.batch_alter_table("labeltask", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_review_task_open_per_item",
            sqlite_where=sa.text("kind = 'review' AND state != 'answered'"),
            postgresql_where=sa.text("kind = 'review' AND state != 'answered'"),
        )
        batch_op.drop_index(
            "uq_label_task_per_item",
            sqlite_where=sa.text("kind = 'label'"),
            postgresql_where=sa.text("kind = 'label'"),
        )
        batch_op.drop_index(batch_op.f("ix_labeltask_item_id"))

    op.drop_table("labeltask")
