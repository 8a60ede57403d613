"""The synthetic tenants and the data a run feeds the worker: organizations with projects mapped to provider
accounts, users, model prices; API-usage events and provider envelopes (as producers publish them); rows for
the database ceilings; and the fast SQL pre-fill of the growth phase. Everything is deterministic per seed.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from bench.capacity import TREE_SIZE
from bench.config import BenchConfig
from worker.rows import UsageRows

ENDPOINTS = ("/v1/orchestrations", "/v1/agents/run", "/v1/embeddings", "/v1/search", "/v1/documents")
OPENAI_MODELS = ("gpt-4o", "gpt-4o-mini")
ANTHROPIC_MODELS = ("claude-sonnet-4", "claude-haiku-4")
OPENAI_TOKEN_TYPES = (  # the completions token categories (worker.providers.COMPLETION_TOKEN_TYPES)
    "input_text_tokens",
    "input_audio_tokens",
    "input_image_tokens",
    "input_cached_text_tokens",
    "input_cached_audio_tokens",
    "input_cached_image_tokens",
    "input_cache_write_tokens",
    "output_text_tokens",
    "output_audio_tokens",
    "output_image_tokens",
)
ANTHROPIC_TOKEN_TYPES = (
    "uncached_input_tokens",
    "cache_read_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_creation_5m_input_tokens",
    "output_tokens",
)
OPENAI_LINE_ITEMS = ("completions input", "completions output", "embeddings", "web search tool calls")
COST_BUCKETS = 5  # hourly buckets per costs_v1 envelope
USAGE_BUCKETS = 2  # hourly buckets per usage_v1 envelope (each result expands to 10 lines)
API_USAGE_COLUMNS = UsageRows.EVENT_FIELDS  # the columns the worker's insert_api_usage writes, in its order
COST_DATA_COLUMNS = (
    "organization_id",
    "project_id",
    "provider",
    "ai_organization_id",
    "ai_project_id",
    "api_version",
    "bucket_start_time",
    "bucket_end_time",
    "line_item",
    "currency",
    "amount",
    "quantity",
    "unit",
    "metadata",
    "collected_at",
    "source_partition",
    "source_offset",
)


@dataclass
class Org:
    id: uuid.UUID
    provider: str
    ai_org: str
    projects: list[tuple[uuid.UUID, str]] = field(default_factory=list)  # (project id, provider project id)
    users: list[uuid.UUID] = field(default_factory=list)


@dataclass
class World:
    orgs: list[Org]
    anchor: datetime  # event and bucket times are placed before it
    seed: int

    def all_org_ids(self) -> list[uuid.UUID]:
        return [org.id for org in self.orgs]


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def build_world(cfg: BenchConfig, *, now: datetime | None = None) -> World:
    rng = random.Random(cfg.seed)
    orgs = []
    for index in range(cfg.organizations):
        provider = "openai" if index % 2 == 0 else "anthropic"
        org = Org(id=_uuid(rng), provider=provider, ai_org=f"{provider[:2]}-org-bench-{index:03d}")
        prefix = "proj" if provider == "openai" else "wrkspc"
        org.projects = [(_uuid(rng), f"{prefix}_{index:03d}_{j}") for j in range(cfg.projects_per_org)]
        org.users = [_uuid(rng) for _ in range(cfg.users_per_org)]
        orgs.append(org)
    # The last hour of the previous month: every backlog then lies in one calendar month whatever the date of
    # the run, so monthly budgets see the same data in every run (their cost depends on it).
    month = (now or datetime.now(UTC)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return World(orgs=orgs, anchor=month - timedelta(hours=1), seed=cfg.seed)


async def install_world(conn: asyncpg.Connection, world: World, *, prices: bool = True) -> None:
    """Insert the tenants and (``prices``) the model prices (as superuser: the worker only reads these tables)."""
    await conn.executemany(
        "INSERT INTO organizations (id, name, slug) VALUES ($1, $2, $3)",
        [(org.id, f"Bench {org.ai_org}", f"bench-{org.id.hex[:16]}") for org in world.orgs],
    )
    await conn.executemany(
        "INSERT INTO users (id, organization_id, email, username) VALUES ($1, $2, $3, $3)",
        [(user, org.id, f"{user.hex[:16]}@bench.example") for org in world.orgs for user in org.users],
    )
    await conn.executemany(
        "INSERT INTO projects (id, organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (project, org.id, ai_project, org.provider, org.ai_org, ai_project)
            for org in world.orgs
            for project, ai_project in org.projects
        ],
    )
    if not prices:
        return
    rows = [
        ("openai", model, token_type, Decimal("2.5") if "output" not in token_type else Decimal(10))
        for model in OPENAI_MODELS
        for token_type in OPENAI_TOKEN_TYPES
    ] + [
        ("anthropic", model, token_type, Decimal(3) if "output" not in token_type else Decimal(15))
        for model in ANTHROPIC_MODELS
        for token_type in ANTHROPIC_TOKEN_TYPES
    ]
    await conn.executemany(
        "INSERT INTO model_prices (provider, model, token_type, price_per_million, effective_from) "
        "VALUES ($1, $2, $3, $4, '2020-01-01T00:00:00Z')",
        rows,
    )


# ------------------------------------------------------------------------------------- API-usage events


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_row(world: World, rng: random.Random, event_id: str, at: datetime) -> tuple[Any, ...]:
    """One event as the columns of ``api_usage`` (organization_id ... cost_usd, source partition/offset)."""
    org = world.orgs[rng.randrange(len(world.orgs))]
    project = org.projects[rng.randrange(len(org.projects))][0] if rng.random() < 0.9 else None
    user = org.users[rng.randrange(len(org.users))] if rng.random() < 0.8 else None
    return event_fields(org, project, user, rng, event_id=event_id, at=at)


def event_fields(
    org: Org, project: uuid.UUID | None, user: uuid.UUID | None, rng: random.Random, *, event_id: str, at: datetime
) -> tuple[Any, ...]:
    """An event of ``org`` (and ``project``, ``user``) at ``at``; the rest drawn from ``rng``."""
    roll = rng.random()
    status = 200 if roll < 0.95 else (429 if roll < 0.98 else 500)
    prompt = rng.randrange(20, 4_000)
    completion = rng.randrange(0, 2_000)
    cost = Decimal(rng.randrange(1, 500_000)) / Decimal(10_000_000)
    return (
        org.id,
        event_id,
        project,
        user,
        ENDPOINTS[rng.randrange(len(ENDPOINTS))],
        "POST" if rng.random() < 0.8 else "GET",
        status,
        rng.randrange(40, 9_000),
        at,
        prompt,
        completion,
        prompt + completion,
        OPENAI_MODELS[rng.randrange(2)] if org.provider == "openai" else ANTHROPIC_MODELS[rng.randrange(2)],
        cost,
        None,
        None,
    )


def render_event(row: tuple[Any, ...]) -> bytes:
    """The event as producers publish it (the contract of ``usage.api-events``), ~470 bytes."""
    project = f'"{row[2]}"' if row[2] else "null"
    user = f'"{row[3]}"' if row[3] else "null"
    return (
        f'{{"event_id":"{row[1]}","occurred_at":"{_iso(row[8])}","organization_id":"{row[0]}",'
        f'"project_id":{project},"user_id":{user},"endpoint":"{row[4]}","method":"{row[5]}",'
        f'"status_code":{row[6]},"response_time_ms":{row[7]},"token_usage":{{"prompt_tokens":{row[9]},'
        f'"completion_tokens":{row[10]},"total_tokens":{row[11]},"model":"{row[12]}","cost_usd":{row[13]}}}}}'
    ).encode()


def event_rows(
    world: World, count: int, *, salt: str = "ev", span: timedelta = timedelta(hours=24)
) -> Iterator[tuple[Any, ...]]:
    """``count`` events in time order over ``span`` ending an hour before the anchor (a backlog that built
    up during a day). Event ids are random hex (uuid4-like), as a platform would generate them."""
    rng = random.Random(f"{world.seed}-{salt}")
    start = world.anchor - timedelta(hours=1) - span
    step = span / max(count, 1)
    for index in range(count):
        yield event_row(world, rng, f"{rng.getrandbits(128):032x}", start + step * index)


# ------------------------------------------------------------------------------------- provider envelopes


@dataclass
class Envelopes:
    payloads: list[bytes]
    lines: int  # ledger lines the worker derives from them (distinct keys: every line is an insert)


def _hour(world: World, hours_back: int) -> datetime:
    return world.anchor - timedelta(hours=hours_back)


def _openai_costs(world: World, org: Org, rng: random.Random, first_hour: int) -> tuple[list[Any], int]:
    buckets, lines = [], 0
    for b in range(COST_BUCKETS):
        start = _hour(world, first_hour + b + 1)
        results = []
        for _, ai_project in org.projects:
            for item in OPENAI_LINE_ITEMS:
                value = f"{rng.randrange(1, 10_000_000) / 1_000_000:.6f}"
                results.append(
                    {
                        "object": "organization.costs.result",
                        "amount": {"value": value, "currency": "usd"},
                        "line_item": item,
                        "project_id": ai_project,
                    }
                )
        lines += len(results)
        buckets.append(
            {
                "object": "bucket",
                "start_time": int(start.timestamp()),
                "end_time": int((start + timedelta(hours=1)).timestamp()),
                "results": results,
            }
        )
    return buckets, lines


def _openai_usage(world: World, org: Org, rng: random.Random, first_hour: int) -> tuple[list[Any], int]:
    buckets, lines = [], 0
    for b in range(USAGE_BUCKETS):
        start = _hour(world, first_hour + b + 1)
        results = []
        for _, ai_project in org.projects:
            for model in OPENAI_MODELS:
                tokens = rng.randrange(1_000, 5_000_000)
                results.append(
                    {
                        "object": "organization.usage.completions.result",
                        "input_tokens": tokens,
                        "output_tokens": tokens // 4,
                        "input_cached_tokens": tokens // 3,
                        "input_audio_tokens": 0,
                        "output_audio_tokens": 0,
                        "num_model_requests": rng.randrange(1, 5_000),
                        "project_id": ai_project,
                        "user_id": None,
                        "api_key_id": None,
                        "model": model,
                        "batch": None,
                    }
                )
        lines += len(results) * len(OPENAI_TOKEN_TYPES)
        buckets.append(
            {
                "object": "bucket",
                "start_time": int(start.timestamp()),
                "end_time": int((start + timedelta(hours=1)).timestamp()),
                "results": results,
            }
        )
    return buckets, lines


def _anthropic_costs(world: World, org: Org, rng: random.Random, first_hour: int) -> tuple[list[Any], int]:
    buckets, lines = [], 0
    for b in range(COST_BUCKETS):
        start = _hour(world, first_hour + b + 1)
        results = []
        for _, workspace in org.projects:
            for model in ANTHROPIC_MODELS:
                for token_type in ("input_tokens", "output_tokens"):
                    results.append(
                        {
                            "amount": f"{rng.randrange(1, 10_000_000) / 100:.2f}",
                            "currency": "USD",
                            "cost_type": "tokens",
                            "description": None,
                            "model": model,
                            "service_tier": "standard",
                            "token_type": token_type,
                            "context_window": "0-200k",
                            "workspace_id": workspace,
                        }
                    )
        lines += len(results)
        buckets.append({"starting_at": _iso(start), "ending_at": _iso(start + timedelta(hours=1)), "results": results})
    return buckets, lines


def _anthropic_usage(world: World, org: Org, rng: random.Random, first_hour: int) -> tuple[list[Any], int]:
    buckets, lines = [], 0
    for b in range(USAGE_BUCKETS):
        start = _hour(world, first_hour + b + 1)
        results = []
        for _, workspace in org.projects:
            for model in ANTHROPIC_MODELS:
                tokens = rng.randrange(1_000, 5_000_000)
                results.append(
                    {
                        "uncached_input_tokens": tokens,
                        "cache_read_input_tokens": tokens // 2,
                        "cache_creation": {
                            "ephemeral_1h_input_tokens": tokens // 10,
                            "ephemeral_5m_input_tokens": tokens // 20,
                        },
                        "output_tokens": tokens // 4,
                        "server_tool_use": None,
                        "model": model,
                        "workspace_id": workspace,
                        "api_key_id": None,
                        "service_tier": "standard",
                        "context_window": "0-200k",
                    }
                )
        lines += len(results) * len(ANTHROPIC_TOKEN_TYPES)
        buckets.append({"starting_at": _iso(start), "ending_at": _iso(start + timedelta(hours=1)), "results": results})
    return buckets, lines


def envelopes(world: World, min_lines: int) -> Envelopes:
    """Provider envelopes (pages of hourly buckets, costs_v1 and usage_v1, both providers) until at least
    ``min_lines`` ledger lines. Every line has its own ledger key (each (org, version) walks back in time)."""
    import json  # noqa: PLC0415

    rng = random.Random(f"{world.seed}-buckets")
    collected = _iso(world.anchor)
    payloads: list[bytes] = []
    total = 0
    counters: dict[tuple[int, str], int] = {}
    index = 0
    while total < min_lines:
        org_index = index % len(world.orgs)
        org = world.orgs[org_index]
        version = ("costs_v1", "usage_v1")[(index // len(world.orgs)) % 2]
        nth = counters.get((org_index, version), 0)
        counters[(org_index, version)] = nth + 1
        per_message = COST_BUCKETS if version == "costs_v1" else USAGE_BUCKETS
        first_hour = 1 + nth * per_message
        if org.provider == "openai":
            maker = _openai_costs if version == "costs_v1" else _openai_usage
        else:
            maker = _anthropic_costs if version == "costs_v1" else _anthropic_usage
        buckets, lines = maker(world, org, rng, first_hour)
        body = {
            "provider": org.provider,
            "ai_organization_id": org.ai_org,
            "api_version": version,
            "collected_at": collected,
            "page": {"object": "page", "data": buckets, "has_more": False, "next_page": None},
        }
        payloads.append(json.dumps(body, separators=(",", ":")).encode())
        total += lines
        index += 1
    return Envelopes(payloads=payloads, lines=total)


def ledger_rows(world: World, count: int) -> Iterator[tuple[Any, ...]]:
    """Distinct ``cost_data`` rows (costs_v1, hourly, per project and line item), for the ceilings."""
    rng = random.Random(f"{world.seed}-ledger")
    projects = [(org, project, ai_project) for org in world.orgs for project, ai_project in org.projects]
    per_hour = len(projects) * len(OPENAI_LINE_ITEMS)
    for index in range(count):
        hour, rest = divmod(index, per_hour)
        slot, item = divmod(rest, len(OPENAI_LINE_ITEMS))
        org, project, ai_project = projects[slot]
        start = world.anchor - timedelta(days=40, hours=hour)
        yield (
            org.id,
            project,
            org.provider,
            org.ai_org,
            ai_project,
            "costs_v1",
            start,
            start + timedelta(hours=1),
            OPENAI_LINE_ITEMS[item],
            "USD",
            Decimal(rng.randrange(1, 10_000_000)) / Decimal(1_000_000),
            None,
            None,
            "{}",
            world.anchor,
            None,
            None,
        )


# ------------------------------------------------------------------------------------- growth pre-fill

# api_usage: history spread over the year before the last 30 days, evenly over the world's organizations.
# Event ids are 32 hex characters like the stream's, and monotonic within an organization (the first 8
# characters spread uniformly over the key space), so the rows go in in index order (fast) while the
# stream's random ids later land all over the existing index (as they would in production).
PREFILL_API_USAGE = """
INSERT INTO api_usage (organization_id, event_id, project_id, user_id, endpoint, method, status_code,
                       response_time_ms, occurred_at, prompt_tokens, completion_tokens, total_tokens, model,
                       cost_usd, source_partition, source_offset, created_at)
SELECT o.id,
       lpad(to_hex((g::numeric * 4294967295 / $1)::bigint), 8, '0') || left(md5(o.id::text || g::text), 24),
       CASE WHEN g % 10 <> 0 THEN o.projects[1 + g % cardinality(o.projects)] END,
       CASE WHEN g % 5 <> 0 THEN o.users[1 + g % cardinality(o.users)] END,
       '/v1/orchestrations', 'POST', CASE WHEN g % 50 = 0 THEN 500 ELSE 200 END,
       40 + g % 9000,
       $2::timestamptz - interval '30 days' - (interval '335 days' * g / $1),
       150 + g % 3000, g % 2000, 150 + g % 3000 + g % 2000, 'gpt-4o',
       (g % 500000) / 10000000.0, 0, g,
       $2::timestamptz - interval '30 days' - (interval '335 days' * g / $1)
FROM (SELECT org.id,
             (SELECT array_agg(p.id ORDER BY p.id) FROM projects p WHERE p.organization_id = org.id) AS projects,
             (SELECT array_agg(u.id ORDER BY u.id) FROM users u WHERE u.organization_id = org.id) AS users
      FROM organizations org WHERE org.id = ANY($3::uuid[]) ORDER BY org.id) o
CROSS JOIN LATERAL generate_series(1, $1) AS g
"""

# cost_data: hourly history per project (2 costs_v1 and 2 usage_v1 line items per hour), ending 30 days
# before the anchor, in index order (project, bucket start).
PREFILL_COST_DATA = """
INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, ai_project_id, api_version, report,
                       bucket_start_time, bucket_end_time, line_item, currency, amount, quantity, unit, metadata,
                       collected_at, source_partition, source_offset, created_at, updated_at)
SELECT p.organization_id, p.id, p.ai_provider, p.ai_organization_id, p.ai_project_id, i.version::cost_api_version,
       cost_worker_default_report(p.ai_provider, i.version::cost_api_version),
       s.start, s.start + interval '1 hour', i.item, 'USD', ((h * 7919) % 100000) / 1000.0,
       CASE WHEN i.version = 'usage_v1' THEN (h::bigint * 104729) % 5000000 END,
       CASE WHEN i.version = 'usage_v1' THEN 'tokens' END, '{}'::jsonb,
       s.start + interval '6 hours', 0, h, s.start + interval '6 hours', s.start + interval '6 hours'
FROM (SELECT * FROM projects WHERE ai_provider IS NOT NULL AND organization_id = ANY($3::uuid[]) ORDER BY id) p
CROSS JOIN LATERAL generate_series(1, $1) AS h
CROSS JOIN LATERAL (SELECT $2::timestamptz - interval '30 days' - interval '1 hour' * ($1 - h + 1) AS start) s
CROSS JOIN LATERAL (VALUES ('costs_v1', 'completions input'), ('costs_v1', 'completions output'),
                           ('usage_v1', 'gpt-4o:input_uncached_tokens'), ('usage_v1', 'gpt-4o:output_tokens'))
    AS i(version, item)
"""
PREFILL_COST_ITEMS_PER_HOUR = 4
TABLES = ("api_usage", "cost_data")


async def _indexes(conn: asyncpg.Connection, table: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, definition) of the table's primary/unique constraints, and its other indexes' definitions."""
    constraints = [
        (row["conname"], row["definition"])
        for row in await conn.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint "
            "WHERE conrelid = $1::regclass AND contype IN ('p', 'u') ORDER BY conname",
            table,
        )
    ]
    indexes = [
        row["indexdef"]
        for row in await conn.fetch(
            "SELECT indexdef FROM pg_indexes i WHERE tablename = $1 AND schemaname = 'public' AND NOT EXISTS "
            "(SELECT FROM pg_constraint c WHERE c.conindid = (quote_ident(i.indexname))::regclass) "
            "ORDER BY indexname",
            table,
        )
    ]
    return constraints, indexes


async def _fill(url: str, table: str, sql: str, *args: Any) -> dict[str, float]:
    """Fill one table: drop its indexes, insert (heap only), rebuild the very same indexes."""
    import time  # noqa: PLC0415

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")  # valid by construction: skip FK triggers
        await conn.execute("SET maintenance_work_mem = '1GB'")
        constraints, indexes = await _indexes(conn, table)
        for name, _ in constraints:
            await conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for definition in indexes:
            name = definition.split(" INDEX ", 1)[1].split(" ON ", 1)[0]
            await conn.execute(f"DROP INDEX {name}")
        started = time.perf_counter()
        await conn.execute(sql, *args)
        inserted = time.perf_counter()
        for name, definition in constraints:
            await conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        for definition in indexes:
            await conn.execute(definition)
        indexed = time.perf_counter()
        after = await _indexes(conn, table)
        assert after == (constraints, indexes), f"{table}: indexes differ after the pre-fill: {after}"
        await conn.execute("VACUUM (ANALYZE) " + table)
        return {
            "insert_seconds": round(inserted - started, 2),
            "index_seconds": round(indexed - inserted, 2),
            "vacuum_seconds": round(time.perf_counter() - indexed, 2),
        }
    finally:
        await conn.close()


async def prefill(url: str, world: World, rows: int) -> dict[str, Any]:
    """Pre-fill ``rows`` rows into api_usage and into cost_data (superuser), both tables at once (one core
    each), then VACUUM ANALYZE and CHECKPOINT, like settled tables. The rows are valid for every constraint;
    the indexes are dropped for the insert and rebuilt with their exact definitions (checked)."""
    import asyncio  # noqa: PLC0415
    import time  # noqa: PLC0415

    orgs = world.all_org_ids()
    per_org = -(-rows // len(orgs))
    projects = sum(len(org.projects) for org in world.orgs)
    hours = -(-rows // (projects * PREFILL_COST_ITEMS_PER_HOUR))
    started = time.perf_counter()
    api_usage, cost_data = await asyncio.gather(
        _fill(url, "api_usage", PREFILL_API_USAGE, per_org, world.anchor, orgs),
        _fill(url, "cost_data", PREFILL_COST_DATA, hours, world.anchor, orgs),
    )
    conn = await asyncpg.connect(url)
    try:
        # A server that has been serving these tables has their indexes in its cache (when they fit).
        prewarmed = []
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
            for index in await conn.fetch(
                "SELECT indexrelid::regclass::text AS name FROM pg_index "
                "WHERE indrelid IN ('api_usage'::regclass, 'cost_data'::regclass) ORDER BY 1"
            ):
                await conn.fetchval("SELECT pg_prewarm($1::regclass)", index["name"])
                prewarmed.append(index["name"])
        except asyncpg.PostgresError:
            pass  # a configured server without the extension: cold indexes
        await conn.execute("CHECKPOINT")
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM api_usage) AS api_usage, (SELECT count(*) FROM cost_data) AS cost_data"
        )
        sizes = {table: await conn.fetchval(TREE_SIZE.format(size="pg_total_relation_size"), table) for table in TABLES}
    finally:
        await conn.close()
    assert counts is not None
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "api_usage": api_usage | {"rows": counts["api_usage"], "bytes": sizes["api_usage"]},
        "cost_data": cost_data | {"rows": counts["cost_data"], "bytes": sizes["cost_data"]},
        "organizations": len(orgs),
        "prewarmed_indexes": prewarmed,
    }
