"""Data migrations, run on a database written by the code before them."""

from pathlib import Path

import sqlalchemy as sa
from sqlmodel import col

from services import db
from services.models import Item, ItemStatus, LabelTask, LabelTaskState
from services.projects import ProjectSpec, create_project


def test_0007_marks_answered_label_tasks_and_leaves_waiting_ones_open(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(engine, "0006")  # the schema 0007 runs on (0007 changes data only)
    statuses = [ItemStatus.LABELED, ItemStatus.IN_REVIEW, ItemStatus.QUEUED, ItemStatus.UNLABELED]
    with db.session_scope(engine) as session:
        project = create_project(
            session,
            ProjectSpec(
                name="migrated",
                labels=["a", "b"],
                modality="features",
                store_url=f"file://{tmp_path / 'store'}",
            ),
        )
        for index, status in enumerate(statuses):
            item = Item(
                project_id=project.id or 0,
                external_id=f"x{index}",
                uri=f"file:///x{index}",
                content_hash=f"{index:064d}",
                status=status,
                registered_from="file:///",
            )
            session.add(item)
            session.flush()
            for kind in ("label", "review") if status == ItemStatus.IN_REVIEW else ("label",):
                session.add(
                    LabelTask(
                        project_id=project.id or 0,
                        item_id=item.id or 0,
                        kind=kind,
                        state=LabelTaskState.OPEN,
                        external_task_id=index * 10 + len(kind),
                    )
                )
    db.upgrade(engine)
    with db.session_scope(engine) as session:
        rows = session.execute(
            sa.select(col(Item.status), col(LabelTask.kind), col(LabelTask.state))
            .join(LabelTask, col(LabelTask.item_id) == col(Item.id))
            .order_by(col(Item.id), col(LabelTask.kind))
        ).all()
    assert [tuple(row) for row in rows] == [
        (ItemStatus.LABELED, "label", LabelTaskState.ANSWERED),
        (ItemStatus.IN_REVIEW, "label", LabelTaskState.ANSWERED),
        (ItemStatus.IN_REVIEW, "review", LabelTaskState.OPEN),  # still waiting for its answer
        (ItemStatus.QUEUED, "label", LabelTaskState.OPEN),
        (ItemStatus.UNLABELED, "label", LabelTaskState.OPEN),  # its answer was deleted
    ]
    engine.dispose()
