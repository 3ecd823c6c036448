"""label tasks leave "open" when answered

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 06:00:00.000000

Until now only review tasks became `answered`; a label task stayed `open` for ever, so the open
counts grew with every answer. A label task whose item is labeled (or in review, which follows
a label) was answered.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE labeltask SET state = 'answered' WHERE kind = 'label' AND state = 'open' "
        "AND item_id IN (SELECT id FROM item WHERE status IN ('labeled', 'in_review'))"
    )


def downgrade() -> None:
    # The older code treats every confirmed label task as open.
    op.execute("UPDATE labeltask SET state = 'open' WHERE kind = 'label' AND state = 'answered'")
