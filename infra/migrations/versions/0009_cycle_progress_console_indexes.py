"""a cycle's live progress (epoch of N with loss), a model's curve summary, and the indexes the
console reads through

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 20:00:00.000000

`cycle.progress` is written by the training stage at most once a second; the console and
`cycle status --watch` read it. `modelversion.summary` holds what the learning curve draws
(services.curve); models recorded before this revision have none, and the console derives it
from their full metrics when it reads them. The partial index on items with a label issue keeps the
console's "rejected answers" list from scanning a project's whole pool; the one on evaluation
items does the same for the evaluation set's counts, the one on items with several answers
for agreement, and the one on tasks by state for the open-task counts.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cycle") as batch:
        batch.add_column(sa.Column("progress", sa.JSON(), nullable=True))
    with op.batch_alter_table("modelversion") as batch:
        batch.add_column(sa.Column("summary", sa.JSON(), nullable=True))
    op.create_index(
        "ix_item_label_issue",
        "item",
        ["project_id"],
        sqlite_where=sa.text("label_issue IS NOT NULL"),
        postgresql_where=sa.text("label_issue IS NOT NULL"),
    )
    op.create_index(
        "ix_item_multi_annotated",
        "item",
        ["project_id"],
        sqlite_where=sa.text("n_annotators > 1"),
        postgresql_where=sa.text("n_annotators > 1"),
    )
    op.create_index("ix_labeltask_project_state", "labeltask", ["project_id", "state"])
    op.create_index(
        "ix_item_eval_set",
        "item",
        ["project_id", "status"],
        sqlite_where=sa.text("eval_set"),
        postgresql_where=sa.text("eval_set"),
    )


def downgrade() -> None:
    op.drop_index("ix_item_eval_set", table_name="item")
    op.drop_index("ix_labeltask_project_state", table_name="labeltask")
    op.drop_index("ix_item_multi_annotated", table_name="item")
    op.drop_index("ix_item_label_issue", table_name="item")
    with op.batch_alter_table("modelversion") as batch:
        batch.drop_column("summary")
    with op.batch_alter_table("cycle") as batch:
        batch.drop_column("progress")
