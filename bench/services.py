"""The servers a benchmark run uses: an embedded PostgreSQL 18 and Tansu broker (default), or the ones named by
``BENCH_DATABASE_URL`` (a superuser URL: the run creates and drops its own databases there) and
``BENCH_KAFKA_BOOTSTRAP_SERVERS``.

The embedded PostgreSQL is restarted once with a few settings the measurements rely on (see ``PG_SETTINGS``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from worker import devstack
from worker.migrate import migrate

# Settings of the embedded server, applied with ALTER SYSTEM and a restart:
# - track_commit_timestamp: the latency phase reads each row's exact commit time (pg_xact_commit_timestamp).
# - pg_stat_statements: where the database time of each drain goes, per statement.
# - max_wal_size: the 2 x 10M-row pre-fill would otherwise checkpoint every few seconds (and keep doing so
#   during the drains that follow it); the run checkpoints explicitly before each drain instead.
# - shared_buffers: a quarter of the memory (at most 8 GB), the usual size for a database server, instead of
#   the 128 MB default no production server runs with (the growth phase depends on it).
PG_SETTINGS = {
    "track_commit_timestamp": "on",
    "shared_preload_libraries": "pg_stat_statements",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
}


def _shared_buffers() -> str:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4 // 1_048_576
    return f"{max(128, min(8_192, pages))}MB"


@dataclass
class Servers:
    server_url: str  # superuser URL of the PostgreSQL server (database "postgres")
    bootstrap: str
    embedded_pg: bool
    embedded_broker: bool
    postmaster_pid: int | None = None
    broker_pid: int | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    databases: list[str] = field(default_factory=list)

    def url(self, database: str) -> str:
        return devstack.database_url(self.server_url, database)

    def db_name(self, purpose: str) -> str:
        return f"bench_{self.run_id}_{purpose}"


def _extra_pg_settings() -> dict[str, str]:
    """``BENCH_PG_SETTINGS="name=value,name=value"`` adds to or overrides ``PG_SETTINGS``."""
    extra = {}
    for item in os.environ.get("BENCH_PG_SETTINGS", "").split(","):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            extra[name.strip()] = value.strip()
    return extra


async def _configure(url: str, settings: dict[str, str]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for name, value in settings.items():
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def scratch_postgres(prefix: str) -> AsyncIterator[str]:
    """A throwaway embedded PostgreSQL for a one-off measurement (``bench.cover_probe``, ``bench.tenant_policy``):
    its superuser URL (database "postgres"); stopped and removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    server = devstack.start_postgres(directory / "pg", stop_at_exit=True)
    try:
        yield server.url("postgres")
    finally:
        server.server.cleanup()
        devstack.remove_tree(directory)


@contextlib.asynccontextmanager
async def servers(state_dir: Path | None = None) -> AsyncIterator[Servers]:
    """Start (or connect to) the servers for one run; stop what was started on exit."""
    url = os.environ.get("BENCH_DATABASE_URL") or None
    bootstrap = os.environ.get("BENCH_KAFKA_BOOTSTRAP_SERVERS") or None
    own_dir = state_dir is None
    root = state_dir or Path(tempfile.mkdtemp(prefix="cwb-"))
    pg: Any = None
    broker: devstack.EmbeddedBroker | None = None
    try:
        postmaster = None
        if url is None:
            pg = devstack.start_postgres(root / "pg", stop_at_exit=True)
            wanted = PG_SETTINGS | {"shared_buffers": _shared_buffers()} | _extra_pg_settings()
            await _configure(pg.url("postgres"), wanted)
            pg.server.cleanup()  # stops it; the next start reads postgresql.auto.conf
            pg = devstack.start_postgres(root / "pg", stop_at_exit=True)
            url = pg.url("postgres")
            postmaster = pg.pid()
        broker_pid = None
        if bootstrap is None:
            broker = devstack.start_broker(log_path=root / "broker.log")
            bootstrap = broker.bootstrap_servers
            broker_pid = broker.process.pid
        yield Servers(
            server_url=url,
            bootstrap=bootstrap,
            embedded_pg=pg is not None,
            embedded_broker=broker is not None,
            postmaster_pid=postmaster,
            broker_pid=broker_pid,
        )
    finally:
        if broker is not None:
            broker.stop()
        if pg is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pg.server.cleanup()
        if own_dir:
            devstack.remove_tree(root)


# --------------------------------------------------------------------------------------------- databases


async def create_database(servers: Servers, name: str, *, template: str | None = None) -> str:
    conn = await asyncpg.connect(servers.server_url)
    try:
        clause = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()
    servers.databases.append(name)
    return servers.url(name)


async def create_template(servers: Servers) -> str:
    """A migrated database (the real schema, roles and row-level security) to clone phases from."""
    name = servers.db_name("template")
    url = await create_database(servers, name)
    await migrate(url)
    return name


async def drop_database(servers: Servers, name: str) -> None:
    conn = await asyncpg.connect(servers.server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    if name in servers.databases:
        servers.databases.remove(name)


async def drop_databases(servers: Servers) -> None:
    conn = await asyncpg.connect(servers.server_url)
    try:
        for name in reversed(servers.databases):
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    servers.databases.clear()


async def server_facts(servers: Servers) -> dict[str, Any]:
    conn = await asyncpg.connect(servers.server_url)
    try:
        names = (
            "server_version",
            "shared_buffers",
            "max_wal_size",
            "synchronous_commit",
            "fsync",
            "track_commit_timestamp",
            "shared_preload_libraries",
            "work_mem",
        )
        facts = {name: await conn.fetchval(f"SHOW {name}") for name in names}
    finally:
        await conn.close()
    facts["embedded"] = servers.embedded_pg
    return facts
