"""project seed and per-project cycle numbers

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 22:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing projects keep seed 0, the default; existing cycles are numbered in id order.
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seed", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("cycle", schema=None) as batch_op:
        batch_op.add_column(sa.Column("number", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE cycle SET number = (SELECT COUNT(*) FROM cycle AS earlier "
        "WHERE earlier.project_id = cycle.project_id AND earlier.id <= cycle.id)"
    )
    with op.batch_alter_table("cycle", schema=None) as batch_op:
        batch_op.alter_column("number", existing_type=sa.Integer(), nullable=False)
        batch_op.create_unique_constraint("uq_cycle_number", ["project_id", "number"])


def downgrade() -> None:
    with op.batch_alter_table("cycle", schema=None) as batch_op:
        batch_op.drop_constraint("uq_cycle_number", type_="unique")
        batch_op.drop_column("number")
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_column("seed")
