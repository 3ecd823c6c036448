"""Fault drills: real processes (API, workers, beat, redis-server) and real outages, each test
under pytest's timeout. They reuse the integration suite's services (a private redis-server per
test, the session's PostgreSQL database and S3 server) and its cluster of worker processes."""

from tests.integration.conftest import (  # noqa: F401 (fixtures, found by name)
    engine,
    own_pg_database_url,
    pg_database_url,
    pg_engine,
    private_redis,
    s3_endpoint,
    settings,
)
from tests.integration.test_workers import (  # noqa: F401 (fixtures, found by name)
    cluster,
    database_url,
    state,
    worker_settings,
)
