"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 14:18:22.853749
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "inboxevent",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("event_key", sa.String(length=400), nullable=False),
        sa.Column("action", sa.String(length=60), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.String(length=4000), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "event_key", name="uq_inbox_event"),
    )
    op.create_table(
        "project",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("store_url", sa.String(length=1024), nullable=False),
        sa.Column("image_size", sa.Integer(), nullable=True),
        sa.Column("image_channels", sa.Integer(), nullable=True),
        sa.Column("feature_dim", sa.Integer(), nullable=True),
        sa.Column("loss_config", sa.JSON(), nullable=False),
        sa.Column("selection_config", sa.JSON(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("label_budget", sa.Integer(), nullable=True),
        sa.Column("retrain_min_new_labels", sa.Integer(), nullable=False),
        sa.Column("retrain_cron", sa.String(length=120), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_project_name"), ["name"], unique=True)

    op.create_table(
        "cycle",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=200), nullable=False),
        sa.Column("dataset_version", sa.Integer(), nullable=True),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("failure_reason", sa.String(length=4000), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("timeline", sa.JSON(), nullable=False),
        sa.Column("chunks_total", sa.Integer(), nullable=True),
        sa.Column("chunks_done", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("cycle", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cycle_project_id"), ["project_id"], unique=False)
        batch_op.create_index(
            "uq_cycle_one_active_per_project",
            ["project_id"],
            unique=True,
            sqlite_where=sa.text("state NOT IN ('done', 'failed', 'cancelled')"),
            postgresql_where=sa.text("state NOT IN ('done', 'failed', 'cancelled')"),
        )

    op.create_table(
        "datasetversion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("manifest_key", sa.String(length=1024), nullable=True),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=True),
        sa.Column("row_count", sa.Integer(), nullable=True),
        sa.Column("class_counts", sa.JSON(), nullable=True),
        sa.Column("label_set_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "version", name="uq_dataset_version"),
    )
    op.create_table(
        "item",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("uri", sa.String(length=2048), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.String(length=1000), nullable=True),
        sa.Column("shard_key", sa.String(length=1024), nullable=True),
        sa.Column("shard_row", sa.Integer(), nullable=True),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("label_source", sa.String(length=40), nullable=True),
        sa.Column("annotator", sa.String(length=200), nullable=True),
        sa.Column("labeled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("n_annotators", sa.Integer(), nullable=False),
        sa.Column("disagreement", sa.Boolean(), nullable=False),
        sa.Column("registered_from", sa.String(length=2048), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "content_hash", name="uq_item_content_hash"),
        sa.UniqueConstraint("project_id", "external_id", name="uq_item_external_id"),
    )
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.create_index("ix_item_project_status", ["project_id", "status"], unique=False)

    op.create_table(
        "modelversion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("dataset_version", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("artifact_uri", sa.String(length=2048), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("promotion", sa.String(length=16), nullable=False),
        sa.Column("promotion_reason", sa.String(length=2000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "version", name="uq_model_version"),
    )
    op.create_table(
        "annotation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("cancelled", sa.Boolean(), nullable=False),
        sa.Column("withdrawn_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("external_updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("annotator", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["item.id"],
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "project_id",
            "source",
            "external_id",
            "external_updated_at",
            name="uq_annotation_revision",
        ),
    )
    with op.batch_alter_table("annotation", schema=None) as batch_op:
        batch_op.create_index("ix_annotation_item", ["item_id"], unique=False)

    op.create_table(
        "scorechunk",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("shard_key", sa.String(length=1024), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("result_key", sa.String(length=1024), nullable=True),
        sa.Column("error", sa.String(length=4000), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cycle_id"],
            ["cycle.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("cycle_id", "index", name="uq_chunk_index"),
    )
    with op.batch_alter_table("scorechunk", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_scorechunk_cycle_id"), ["cycle_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("scorechunk", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_scorechunk_cycle_id"))

    op.drop_table("scorechunk")
    with op.batch_alter_table("annotation", schema=None) as batch_op:
        batch_op.drop_index("ix_annotation_item")

    op.drop_table("annotation")
    op.drop_table("modelversion")
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.drop_index("ix_item_project_status")

    op.drop_table("item")
    op.drop_table("datasetversion")
    with op.batch_alter_table("cycle", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_cycle_one_active_per_project",
            sqlite_where=sa.text("state NOT IN ('done', 'failed', 'cancelled')"),
            postgresql_where=sa.text("state NOT IN ('done', 'failed', 'cancelled')"),
        )
        batch_op.drop_index(batch_op.f("ix_cycle_project_id"))

    op.drop_table("cycle")
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_project_name"))

    op.drop_table("project")
    op.drop_table("inboxevent")
