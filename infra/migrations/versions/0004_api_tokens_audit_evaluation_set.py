"""api tokens, audit log, evaluation set and promotion gate settings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 19:26:57.620263
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "apitoken",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["project_id"], ["project.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "auditentry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=60), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("target", sa.String(length=400), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["project.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("auditentry", schema=None) as batch_op:
        batch_op.create_index("ix_auditentry_project_at", ["project_id", "at"], unique=False)

    # Existing rows get the defaults: no evaluation picks, no reserved items, the default gate.
    with op.batch_alter_table("cycleselection", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("evaluation", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("eval_set", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gate", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_column("gate")
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.drop_column("eval_set")
    with op.batch_alter_table("cycleselection", schema=None) as batch_op:
        batch_op.drop_column("evaluation")
    with op.batch_alter_table("auditentry", schema=None) as batch_op:
        batch_op.drop_index("ix_auditentry_project_at")
    op.drop_table("auditentry")
    op.drop_table("apitoken")
