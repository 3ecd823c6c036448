"""Alembic environment: runs against the engine `services.db.upgrade` hands over, so the URL,
SQLite pragmas and driver choice live in one place (services/db.py), not in an alembic.ini."""

from alembic import context
from sqlmodel import SQLModel

import services.models  # noqa: F401 (registers the tables on SQLModel.metadata)

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
