"""Real servers for every test: a PostgreSQL database per test, cloned from a migrated template, and a
Kafka-protocol broker with unique topics per test.

``COST_WORKER_TEST_DATABASE_URL`` / ``COST_WORKER_TEST_KAFKA_BOOTSTRAP_SERVERS`` point the suite at existing
servers; without them an embedded PostgreSQL and broker are started once per session.
``COST_WORKER_TEST_SYSTEM_DATABASE_URL`` adds a second server (the machine's PostgreSQL 15) to the tests
that run on every server version.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.feeding import Feeder
from worker import devstack
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.migrate import migrate
from worker.pipeline import Pipeline
from worker.store import Database

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A superuser URL of the PostgreSQL server the suite runs on."""
    url = os.environ.get("COST_WORKER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    data_dir = Path(tempfile.mkdtemp(prefix="cw-pg-"))
    server = devstack.start_postgres(data_dir / "pg", stop_at_exit=True)
    yield server.url("postgres")
    server.server.cleanup()
    devstack.remove_tree(data_dir)


def system_server_url() -> str | None:
    return os.environ.get("COST_WORKER_TEST_SYSTEM_DATABASE_URL") or None


async def create_database(server_url: str, name: str, *, template: str | None = None) -> str:
    conn = await asyncpg.connect(server_url)
    try:
        if template:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        else:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return devstack.database_url(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template_database(pg_server_url: str) -> AsyncIterator[str]:
    name = f"cw_template_{uuid.uuid4().hex[:10]}"
    url = await create_database(pg_server_url, name)
    await migrate(url)
    yield name
    await drop_database(pg_server_url, name)


@pytest.fixture
async def database_url(pg_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test (superuser URL)."""
    name = f"cw_test_{uuid.uuid4().hex[:12]}"
    url = await create_database(pg_server_url, name, template=template_database)
    yield url
    await drop_database(pg_server_url, name)


@pytest.fixture
async def empty_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all."""
    name = f"cw_empty_{uuid.uuid4().hex[:12]}"
    url = await create_database(pg_server_url, name)
    yield url
    await drop_database(pg_server_url, name)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to this test's database, for arranging and asserting."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    servers = os.environ.get("COST_WORKER_TEST_KAFKA_BOOTSTRAP_SERVERS")
    if servers:
        yield servers
        return
    log_dir = Path(tempfile.mkdtemp(prefix="cw-broker-"))
    broker = devstack.start_broker(log_path=log_dir / "broker.log")
    yield broker.bootstrap_servers
    broker.stop()
    devstack.remove_tree(log_dir)


@dataclass(frozen=True)
class Topics:
    provider_buckets: str
    api_usage: str
    budget_alerts: str
    dead_letter: str
    group_id: str


@pytest.fixture
def topics() -> Topics:
    suffix = uuid.uuid4().hex[:10]
    return Topics(
        provider_buckets=f"buckets-{suffix}",
        api_usage=f"events-{suffix}",
        budget_alerts=f"alerts-{suffix}",
        dead_letter=f"dlq-{suffix}",
        group_id=f"group-{suffix}",
    )


@pytest.fixture
def settings(database_url: str, kafka_bootstrap: str, topics: Topics) -> Settings:
    """Worker settings for this test: its database (as the writer role), its topics, its group."""
    return Settings(
        database_url=database_url,
        database_role="cost_worker_writer",
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_group_id=topics.group_id,
        kafka_producer_idempotence=False,
        kafka_session_timeout=6.0,
        kafka_heartbeat_interval=1.0,
        topic_provider_buckets=topics.provider_buckets,
        topic_api_usage=topics.api_usage,
        topic_budget_alerts=topics.budget_alerts,
        topic_dead_letter=topics.dead_letter,
        batch_max_wait=0.1,
        metrics_port=0,
        retry_initial_backoff=0.05,
        retry_max_backoff=0.5,
        log_format="json",
        budget_sweep_interval=3600.0,
        outbox_poll_interval=0.2,
    )


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    """The worker's own pool on this test's database (as the writer role)."""
    pool = await Database.open(settings.dsn(), role=settings.database_role)
    yield pool
    await pool.close()


@pytest.fixture
def feeder(database: Database, settings: Settings) -> Feeder:
    """A pipeline (with budget evaluation) fed in-memory records, as a consumer would feed it."""
    return Feeder(Pipeline(database, settings, budgets=BudgetEngine(settings)), settings)
