"""cycles: selections, labeler, chunk results

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 14:41:02.204078
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cycleselection",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("predicted_label", sa.String(length=200), nullable=True),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("cold_start", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["cycle_id"],
            ["cycle.id"],
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["item.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("cycle_id", "item_id", name="uq_selection_item"),
    )
    with op.batch_alter_table("cycleselection", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cycleselection_cycle_id"), ["cycle_id"], unique=False)

    with op.batch_alter_table("cycle", schema=None) as batch_op:
        # Existing rows get the defaults the models give new ones.
        batch_op.add_column(
            sa.Column("train_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("selected_count", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("cold_start_picks", sa.Integer(), nullable=True))

    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("labeler", sa.JSON(), nullable=False, server_default='{"kind": "none"}')
        )

    with op.batch_alter_table("scorechunk", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scores_key", sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column("items_scored", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scorechunk", schema=None) as batch_op:
        batch_op.drop_column("items_scored")
        batch_op.drop_column("scores_key")

    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_column("labeler")

    with op.batch_alter_table("cycle", schema=None) as batch_op:
        batch_op.drop_column("cold_start_picks")
        batch_op.drop_column("selected_count")
        batch_op.drop_column("train_attempts")

    with op.batch_alter_table("cycleselection", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cycleselection_cycle_id"))

    op.drop_table("cycleselection")
