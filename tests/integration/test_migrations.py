"""Data migrations, run on a database written by the code before them."""

from pathlib import Path

import sqlalchemy as sa
from sqlmodel import col

from services import db
from services.models import Item, ItemStatus, LabelTask, LabelTaskState, Project


def _project_at(engine: sa.Engine, tmp_path: Path) -> int:
    """A project row as the schema in the database holds it (the model's newer columns left
    out); its id."""
    project = Project(
        name="migrated",
        labels=["a", "b"],
        modality="features",
        store_url=f"file://{tmp_path / 'store'}",
        loss_config={},
        selection_config={},
        batch_size=30,
    )
    table = sa.Table("project", sa.MetaData(), autoload_with=engine)
    values = {column.name: getattr(project, column.name) for column in table.columns}
    with engine.begin() as connection:
        inserted = connection.execute(sa.insert(table).values(values))
        key = inserted.inserted_primary_key
        assert key is not None
        return int(key[0])


def test_0007_and_0008_on_a_database_written_before_them(tmp_path: Path) -> None:
    """0007 marks answered label tasks and leaves waiting ones open; 0008 gives existing
    projects a refill watermark of one batch."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(engine, "0006")
    statuses = [ItemStatus.LABELED, ItemStatus.IN_REVIEW, ItemStatus.QUEUED, ItemStatus.UNLABELED]
    project_id = _project_at(engine, tmp_path)
    with db.session_scope(engine) as session:
        for index, status in enumerate(statuses):
            item = Item(
                project_id=project_id,
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
                        project_id=project_id,
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
    with engine.connect() as connection:
        refill = connection.execute(sa.text("SELECT refill_below FROM project")).scalar_one()
    assert refill == 30
    engine.dispose()
