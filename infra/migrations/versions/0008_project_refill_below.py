"""projects refill the labeling queue: the next cycle starts under `refill_below` open tasks

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 08:00:00.000000

Existing projects get one batch (their `batch_size`), the default of a new project; 0 turns
the refill off.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("project") as batch:
        batch.add_column(
            sa.Column("refill_below", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute("UPDATE project SET refill_below = batch_size")


def downgrade() -> None:
    with op.batch_alter_table("project") as batch:
        batch.drop_column("refill_below")
