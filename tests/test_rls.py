"""Row-level security and roles: one organization never sees or writes another's rows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import pytest

SCOPE = "SELECT set_config('cost_worker.organization_ids', $1, true)"


@dataclass
class Tenants:
    a: uuid.UUID
    b: uuid.UUID


@pytest.fixture
async def tenants(db: asyncpg.Connection) -> Tenants:
    """Two organizations with a row in every tenant table (arranged as superuser, which bypasses RLS)."""
    a, b = uuid.uuid4(), uuid.uuid4()
    for org in (a, b):
        user, project = uuid.uuid4(), uuid.uuid4()
        await db.execute("INSERT INTO organizations (id, name, slug) VALUES ($1, $2, $2)", org, f"org-{org}")
        await db.execute(
            "INSERT INTO users (id, organization_id, email, username) VALUES ($1, $2, $3, $3)",
            user,
            org,
            f"{user}@example.com",
        )
        await db.execute(
            "INSERT INTO projects (id, organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
            "VALUES ($1, $2, 'p', 'openai', $3, 'proj')",
            project,
            org,
            f"org-{org}",
        )
        await db.execute(
            "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
            "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) VALUES "
            "($1, $2, 'openai', 'x', 'costs_v1', '2026-11-01', '2026-11-02', 'li', 'USD', 1.5, now())",
            org,
            project,
        )
        await db.execute(
            "INSERT INTO api_usage (organization_id, event_id, endpoint, method, status_code, occurred_at) "
            "VALUES ($1, 'e1', '/v1', 'POST', 200, now())",
            org,
        )
        await db.execute(
            "INSERT INTO project_metrics (organization_id, project_id, hour) VALUES ($1, $2, '2026-11-01')",
            org,
            project,
        )
        await db.execute(
            "INSERT INTO user_metrics (organization_id, user_id, hour) VALUES ($1, $2, '2026-11-01')",
            org,
            user,
        )
        await db.execute("INSERT INTO ai_organization_budgets (organization_id, amount) VALUES ($1, 10)", org)
        await db.execute(
            "INSERT INTO ai_project_budgets (organization_id, project_id, amount) VALUES ($1, $2, 10)",
            org,
            project,
        )
        await db.execute("INSERT INTO ai_budgets (organization_id, user_id, amount) VALUES ($1, $2, 10)", org, user)
        await db.execute(
            "SELECT cost_worker_spend_track('{user}', ARRAY[$1::uuid], '{NULL}', ARRAY[$2::uuid])", org, user
        )
        await db.execute(
            "INSERT INTO budget_alerts (id, scope, budget_id, organization_id, period_start, period_end, "
            "threshold, spend, amount, currency, percent_used) VALUES "
            "($1, 'organization', $2, $3, '2026-11-01', '2026-12-01', 50, 6, 10, 'USD', 60)",
            uuid.uuid4(),
            uuid.uuid4(),
            org,
        )
        destination = uuid.uuid4()
        await db.execute(
            "INSERT INTO notify_destinations (id, organization_id, name, kind, url_origin, url_sealed, secret_sealed) "
            "VALUES ($1, $2, 'd', 'webhook', 'https://example.com', '\\x00', '\\x00')",
            destination,
            org,
        )
        await db.execute(
            "INSERT INTO notify_deliveries (organization_id, destination_id, webhook_id, event_type, payload) "
            "VALUES ($1, $2, 'a1', 'budget.alert.triggered', '{}')",
            org,
            destination,
        )
        await db.execute("INSERT INTO spend_rebuilds (organization_id, reason) VALUES ($1, 'test')", org)
    return Tenants(a=a, b=b)


async def tenant_tables(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "AND (c.relname = 'organizations' OR EXISTS ("
        "  SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'organization_id' "
        "  AND NOT a.attisdropped)) AND c.relname <> 'quarantine' ORDER BY 1"
    )
    return [row["relname"] for row in rows]


def org_column(table: str) -> str:
    return "id" if table == "organizations" else "organization_id"


async def test_every_tenant_table_is_covered(db: asyncpg.Connection) -> None:
    assert set(await tenant_tables(db)) == {
        "organizations",
        "users",
        "projects",
        "cost_data",
        "api_usage",
        "project_metrics",
        "user_metrics",
        "ai_organization_budgets",
        "ai_project_budgets",
        "ai_budgets",
        "budget_alerts",
        "budget_terms",
        "notify_destinations",
        "notify_deliveries",
        "spend_hourly",
        "spend_daily",
        "spend_cover",
        "spend_reach",
        "spend_subjects",
        "spend_rebuilds",
    }


async def test_reader_cannot_read_sealed_destination_credentials(db: asyncpg.Connection, tenants: Tenants) -> None:
    for column in ("url_sealed", "secret_sealed"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.transaction():
                await db.execute("SET LOCAL ROLE cost_worker_reader")
                await db.execute(SCOPE, str(tenants.a))
                await db.fetch(f"SELECT {column} FROM notify_destinations")


async def test_reader_sees_only_its_organization(db: asyncpg.Connection, tenants: Tenants) -> None:
    for table in await tenant_tables(db):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE cost_worker_reader")
            await db.execute(SCOPE, str(tenants.a))
            orgs = await db.fetch(f"SELECT DISTINCT {org_column(table)} AS org FROM {table}")
        assert [row["org"] for row in orgs] == [tenants.a], table


async def test_nothing_set_means_nothing_visible(db: asyncpg.Connection, tenants: Tenants) -> None:
    for table in await tenant_tables(db):
        for role in ("cost_worker_reader", "cost_worker_writer"):
            async with db.transaction():
                await db.execute(f"SET LOCAL ROLE {role}")
                count = await db.fetchval(f"SELECT count(*) FROM {table}")
            if role == "cost_worker_writer" and table in (
                "organizations",
                "users",
                "projects",
                "ai_organization_budgets",
                "ai_project_budgets",
                "ai_budgets",
                "notify_deliveries",
                "spend_rebuilds",
            ):
                continue  # the worker reads mappings, budgets, due deliveries and queued rebuilds across tenants
            assert count == 0, (role, table)


async def test_writer_reads_mappings_but_cannot_write_them(db: asyncpg.Connection, tenants: Tenants) -> None:
    async with db.transaction():
        await db.execute("SET LOCAL ROLE cost_worker_writer")
        assert await db.fetchval("SELECT count(*) FROM projects") == 2
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE cost_worker_writer")
            await db.execute(SCOPE, str(tenants.a))
            await db.execute("UPDATE projects SET name = 'x'")


async def test_a_write_for_another_organization_fails(db: asyncpg.Connection, tenants: Tenants) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE cost_worker_writer")
            await db.execute(SCOPE, str(tenants.a))
            await db.execute(
                "INSERT INTO api_usage (organization_id, event_id, endpoint, method, status_code, occurred_at) "
                "VALUES ($1, 'sneaky', '/v1', 'POST', 200, now())",
                tenants.b,
            )
    # ...while the same write inside the right scope succeeds.
    async with db.transaction():
        await db.execute("SET LOCAL ROLE cost_worker_writer")
        await db.execute(SCOPE, str(tenants.b))
        await db.execute(
            "INSERT INTO api_usage (organization_id, event_id, endpoint, method, status_code, occurred_at) "
            "VALUES ($1, 'fine', '/v1', 'POST', 200, now())",
            tenants.b,
        )
    # ...and the writer cannot move a row into another organization either.
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with db.transaction():
            await db.execute("SET LOCAL ROLE cost_worker_writer")
            await db.execute(SCOPE, str(tenants.b))
            await db.execute("UPDATE api_usage SET organization_id = $1 WHERE event_id = 'fine'", tenants.a)


@pytest.fixture
async def reader_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, server_settings={"role": "cost_worker_reader"}
    )
    yield pool
    await pool.close()


async def test_scope_does_not_leak_to_the_next_transaction(reader_pool: asyncpg.Pool, tenants: Tenants) -> None:
    async with reader_pool.acquire() as conn, conn.transaction():
        await conn.execute(SCOPE, str(tenants.a))
        assert await conn.fetchval("SELECT count(*) FROM cost_data") == 1
    async with reader_pool.acquire() as conn:  # the same (only) connection
        assert await conn.fetchval("SELECT current_user") == "cost_worker_reader"
        assert await conn.fetchval("SELECT count(*) FROM cost_data") == 0
        async with conn.transaction():
            assert await conn.fetchval("SELECT count(*) FROM cost_data") == 0


async def test_catalog_forces_rls_and_roles_hold_no_bypass(db: asyncpg.Connection) -> None:
    tables = await tenant_tables(db)
    rows = await db.fetch(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = ANY($1::text[])",
        tables,
    )
    assert len(rows) == len(tables)
    for row in rows:
        assert row["relrowsecurity"], row["relname"]
        assert row["relforcerowsecurity"], row["relname"]
    roles = await db.fetch(
        "SELECT rolname, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles "
        "WHERE rolname IN ('cost_worker_writer', 'cost_worker_reader')"
    )
    assert len(roles) == 2
    for role in roles:
        for attribute in ("rolsuper", "rolbypassrls", "rolcreaterole", "rolcreatedb"):
            assert not role[attribute], (role["rolname"], attribute)
    owned = await db.fetchval(
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
        "WHERE r.rolname IN ('cost_worker_writer', 'cost_worker_reader')"
    )
    assert owned == 0


async def test_writer_cannot_run_ddl_or_touch_what_it_does_not_need(db: asyncpg.Connection) -> None:
    forbidden = [
        "CREATE TABLE sneaky (id int)",
        "DROP TABLE cost_data",
        "ALTER TABLE cost_data DISABLE ROW LEVEL SECURITY",
        "DELETE FROM cost_data",
        "DELETE FROM api_usage",
        "TRUNCATE budget_alerts",
        "UPDATE budget_alerts SET spend = 0",
        "INSERT INTO organizations (name, slug) VALUES ('x', 'x')",
        "INSERT INTO model_prices (provider, model, token_type, price_per_million, effective_from) "
        "VALUES ('openai', 'm', 't', 1, now())",
        "DELETE FROM schema_migrations",
        "CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    ]
    for statement in forbidden:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.transaction():
                await db.execute("SET LOCAL ROLE cost_worker_writer")
                await db.execute(statement)


async def test_reader_cannot_write_or_read_worker_state(db: asyncpg.Connection, tenants: Tenants) -> None:
    for statement in (
        "SELECT * FROM quarantine",
        "SELECT * FROM outbox",
        "SELECT * FROM consumer_offsets",
        "UPDATE cost_data SET amount = 0",
        "INSERT INTO budget_alerts (id, scope, budget_id, organization_id, period_start, period_end, threshold, "
        "spend, amount, currency, percent_used) VALUES (gen_random_uuid(), 'organization', gen_random_uuid(), "
        f"'{tenants.a}', now(), now(), 1, 1, 1, 'USD', 1)",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.transaction():
                await db.execute("SET LOCAL ROLE cost_worker_reader")
                await db.execute(SCOPE, str(tenants.a))
                await db.execute(statement)


async def test_budget_terms_follow_every_writer_of_the_budgets(db: asyncpg.Connection, tenants: Tenants) -> None:
    """budget_terms (migration 0033) is written by the budget tables' triggers, in the writer's transaction: a role
    under row-level security (the platform's; here the owner, which FORCE binds) in its tenant's scope, and a cascade
    from a deleted project, which names no tenant. Neither fails, and each version lands in its budget's
    organization."""

    async def versions() -> list[tuple[str, uuid.UUID, bool, Decimal]]:
        rows = await db.fetch(
            "SELECT scope, organization_id, valid_from = '-infinity' AS seeded, amount FROM budget_terms "
            "ORDER BY scope, organization_id, valid_from"
        )
        return [(r["scope"], r["organization_id"], r["seeded"], r["amount"]) for r in rows]

    before = await versions()
    assert sorted((s, o) for s, o, seeded, _ in before if seeded) == sorted(
        (s, o) for s in ("organization", "project", "user") for o in (tenants.a, tenants.b)
    )
    async with db.transaction():
        await db.execute("SET LOCAL ROLE cost_worker_owner")
        await db.execute(SCOPE, str(tenants.a))
        await db.execute("UPDATE ai_organization_budgets SET amount = 20, name = 'renamed'")  # a's only
        await db.execute("UPDATE ai_budgets SET name = 'renamed'")  # not a term: no version
    after = await versions()
    assert [v for v in after if v not in before] == [("organization", tenants.a, False, Decimal(20))]
    await db.execute("DELETE FROM projects WHERE organization_id = $1", tenants.b)  # cascades to b's project budget
    assert [v for v in await versions() if v[:2] == ("project", tenants.b)] == []
    assert [v for v in await versions() if v[:2] == ("project", tenants.a)] == [
        ("project", tenants.a, True, Decimal(10))
    ]
