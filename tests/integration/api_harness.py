"""The API under test: the app on a real database, with tokens minted the way the CLI does."""

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from fastapi.testclient import TestClient

from services import db
from services.auth import create_token


@dataclass(frozen=True)
class Api:
    """A TestClient on the app, and a way to mint tokens in its database."""

    client: TestClient
    engine: sa.Engine

    def token(
        self,
        scope: str,
        *,
        project: str | None = None,
        expires_at: datetime | None = None,
        name: str = "test",
    ) -> str:
        with db.session_scope(self.engine) as session:
            _, secret = create_token(
                session,
                name=name,
                scope=scope,
                actor="test",
                project=project,
                expires_at=expires_at,
            )
        return secret

    def headers(self, scope: str, project: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(scope, project=project)}"}
