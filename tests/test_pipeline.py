"""The batch pipeline against a real database: every provider format, revisions, dedupe, quarantine.

These drive ``Pipeline.apply`` with in-memory records (no broker), which isolates the transaction logic;
tests/test_ingestion.py runs the same flows end to end through Kafka.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from tests.factories import (
    add_price,
    anthropic_cost_bucket,
    anthropic_usage_bucket,
    api_event,
    dumps,
    envelope,
    make_org,
    openai_cost_bucket,
    openai_usage_bucket,
)
from tests.feeding import Feeder
from worker.alerts import Alert, Resolution
from worker.batch import decode_batch
from worker.config import Settings
from worker.errors import StaleOffsets
from worker.pipeline import Pipeline
from worker.store import Database, Tx
from worker.touches import Touch


async def ledger(db: asyncpg.Connection) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT project_id, api_version::text, bucket_start_time, line_item, currency, amount, quantity, collected_at "
        "FROM cost_data ORDER BY project_id NULLS FIRST, api_version, bucket_start_time, line_item"
    )
    return [tuple(row) for row in rows]


async def test_openai_costs_land_exactly_and_replays_change_nothing(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    page = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [
            openai_cost_bucket(
                "2026-11-01",
                "2026-11-02",
                [
                    ("proj_a", "GPT-4o input", 0.06),
                    ("proj_a", "GPT-4o input", 0.30000000000000004),
                    ("proj_b", None, 1.5),
                    (None, "web search", 0.01),
                ],
            ),
            openai_cost_bucket("2026-11-02", "2026-11-03", []),
        ],
    )
    outcome = await feeder.buckets(page)
    assert outcome.messages[(feeder.settings.topic_provider_buckets, "inserted")] == 1
    rows = await db.fetch("SELECT project_id, line_item, amount, currency FROM cost_data ORDER BY amount")
    assert [(r["project_id"], r["line_item"], r["amount"], r["currency"]) for r in rows] == [
        (None, "web search", Decimal("0.01"), "USD"),
        (org.projects["proj_a"], "GPT-4o input", Decimal("0.36000000000000004"), "USD"),  # summed exactly
        (org.projects["proj_b"], "all", Decimal("1.5"), "USD"),
    ]
    assert {r["organization_id"] for r in await db.fetch("SELECT organization_id FROM cost_data")} == {org.id}
    before = await ledger(db)
    again = await feeder.buckets(page, page)
    assert again.messages[(feeder.settings.topic_provider_buckets, "unchanged")] == 2
    assert await ledger(db) == before


async def test_newest_revision_wins_in_any_order(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    revisions = [
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_a", "x", value)])],
            collected_at=at,
        )
        for value, at in ((1, "2026-11-02T01:00:00Z"), (2, "2026-11-02T05:00:00Z"), (3, "2026-11-02T03:00:00Z"))
    ]
    await feeder.buckets(revisions[1])
    outcome = await feeder.buckets(revisions[0], revisions[2])  # both older: neither may overwrite
    assert outcome.ledger_lines[("costs_v1", "stale_revision")] == 2
    assert (await db.fetchval("SELECT amount FROM cost_data")) == Decimal(2)
    # In one batch, out of order: the newest still wins.
    newest = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_a", "x", 7)])],
        collected_at="2026-11-03T00:00:00Z",
    )
    await feeder.buckets(newest, revisions[0])
    assert (await db.fetchval("SELECT amount FROM cost_data")) == Decimal(7)


async def test_openai_usage_is_priced_per_model_and_token_type(db: asyncpg.Connection, feeder: Feeder) -> None:
    """Overrides (model_prices) win over the catalogue; the catalogue prices what they do not cover; a model
    neither knows stays unpriced. Every priced line names its price's source."""
    org = await make_org(db)
    await add_price(db, "openai", "gpt-4o", "input_text_tokens", "2.40")
    await add_price(db, "openai", "gpt-4o", "output_text_tokens", "10")
    await add_price(
        db, "openai", "gpt-4o", "output_text_tokens", "12", effective_from=datetime(2026, 11, 15, tzinfo=UTC)
    )
    page = envelope(
        "openai",
        org.ai_org,
        "usage_v1",
        [
            openai_usage_bucket(
                "2026-11-01",
                "2026-11-02",
                [
                    {
                        "model": "gpt-4o",
                        "project_id": "proj_a",
                        "input_tokens": 1_000_000,
                        "input_cached_tokens": 400_000,
                        "output_tokens": 3_000,
                        "num_model_requests": 10,
                    },
                    {"model": "gpt-4o-mini", "project_id": "proj_a", "input_tokens": 5},
                    {"model": "acme-private-llm", "project_id": "proj_a", "input_tokens": 7},
                ],
            ),
            openai_usage_bucket(
                "2026-11-20",
                "2026-11-21",
                [
                    {"model": "gpt-4o", "project_id": "proj_a", "output_tokens": 1_000_000},
                ],
            ),
        ],
    )
    outcome = await feeder.buckets(page)
    assert outcome.unpriced["openai"] == 1  # acme-private-llm input; its zero lines cost zero
    found = await db.fetch("SELECT line_item, bucket_start_time, quantity, amount, metadata FROM cost_data")
    rows = {(r["line_item"], r["bucket_start_time"].day): (r["quantity"], r["amount"]) for r in found}
    sources = {(r["line_item"], r["bucket_start_time"].day): r["metadata"] for r in found}
    assert rows[("gpt-4o:input_text_tokens", 1)] == (Decimal(600_000), Decimal("1.44"))  # the override
    assert rows[("gpt-4o:input_cached_text_tokens", 1)] == (Decimal(400_000), Decimal("0.5"))  # the catalogue
    assert rows[("gpt-4o:output_text_tokens", 1)] == (Decimal(3_000), Decimal("0.03"))
    assert rows[("gpt-4o:output_text_tokens", 20)] == (Decimal(1_000_000), Decimal(12))  # the later override
    assert rows[("gpt-4o-mini:input_text_tokens", 1)] == (Decimal(5), Decimal("0.00000075"))  # 0.15 per million
    assert rows[("acme-private-llm:input_text_tokens", 1)] == (Decimal(7), None)  # stored, unpriced
    assert rows[("acme-private-llm:output_text_tokens", 1)] == (Decimal(0), Decimal(0))
    override_id = await db.fetchval("SELECT id FROM model_prices WHERE token_type = 'input_text_tokens'")
    assert f'"price_source": "override:{override_id}"' in sources[("gpt-4o:input_text_tokens", 1)]
    assert '"price_source": "genai-prices ' in sources[("gpt-4o:input_cached_text_tokens", 1)]
    # one result of 1,000,000 input and 3,000 output tokens: ten lines that add up to exactly that
    assert sum(q for (item, day), (q, _) in rows.items() if item.startswith("gpt-4o:") and day == 1) == 1_003_000


async def test_anthropic_costs_in_cents_and_usage(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db, provider="anthropic", project_ids=("wrkspc_01",))
    await add_price(db, "anthropic", "claude-sonnet-4", "uncached_input_tokens", "3")
    await add_price(db, "anthropic", "claude-sonnet-4", "cache_creation_1h_input_tokens", "6")
    costs = envelope(
        "anthropic",
        org.ai_org,
        "costs_v1",
        [
            anthropic_cost_bucket(
                "2025-08-01T00:00:00Z",
                "2025-08-02T00:00:00Z",
                [
                    {
                        "amount": "123.78912",
                        "currency": "USD",
                        "description": "Claude Sonnet 4 Usage - Input Tokens",
                        "model": "claude-sonnet-4",
                        "token_type": "uncached_input_tokens",
                        "cost_type": "tokens",
                        "workspace_id": "wrkspc_01",
                        "service_tier": "standard",
                        "context_window": "0-200k",
                    },
                    {
                        "amount": "0.5",
                        "currency": "USD",
                        "cost_type": "web_search",
                        "workspace_id": None,
                        "description": None,
                        "model": None,
                        "token_type": None,
                        "service_tier": None,
                        "context_window": None,
                    },
                ],
            )
        ],
    )
    usage = envelope(
        "anthropic",
        org.ai_org,
        "usage_v1",
        [
            anthropic_usage_bucket(
                "2025-08-01T00:00:00Z",
                "2025-08-01T01:00:00Z",
                [
                    {
                        "uncached_input_tokens": 2_000_000,
                        "cache_read_input_tokens": 0,
                        "output_tokens": 10,
                        "cache_creation": {"ephemeral_1h_input_tokens": 1_000, "ephemeral_5m_input_tokens": 0},
                        "server_tool_use": {"web_search_requests": 2},
                        "model": "claude-sonnet-4",
                        "workspace_id": "wrkspc_01",
                        "api_key_id": "apikey_01",
                        "service_tier": "standard",
                        "context_window": "0-200k",
                    },
                ],
            ),
            anthropic_usage_bucket("2025-08-01T01:00:00Z", "2025-08-01T02:00:00Z", []),
        ],
    )
    await feeder.buckets(costs, usage)
    rows = {
        r["line_item"]: (r["project_id"], r["quantity"], r["amount"])
        for r in await db.fetch("SELECT line_item, project_id, quantity, amount FROM cost_data")
    }
    assert rows["Claude Sonnet 4 Usage - Input Tokens"] == (org.projects["wrkspc_01"], None, Decimal("1.2378912"))
    assert rows["web_search"] == (None, None, Decimal("0.005"))
    assert rows["claude-sonnet-4:uncached_input_tokens:0-200k"] == (
        org.projects["wrkspc_01"],
        Decimal(2_000_000),
        Decimal(6),
    )
    assert rows["claude-sonnet-4:cache_creation_1h_input_tokens:0-200k"][2] == Decimal("0.006")
    assert rows["claude-sonnet-4:web_search_requests:0-200k"][1:] == (Decimal(2), Decimal("0.02"))  # catalogue
    assert rows["claude-sonnet-4:output_tokens:0-200k"][1:] == (Decimal(10), Decimal("0.00015"))  # catalogue


async def test_api_events_dedupe_rollup_once_and_conflicts_quarantine(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    project, user = org.projects["proj_a"], org.users[0]
    first = api_event(org, event_id="e1", project=project, user=user, cost="0.028")
    second = api_event(
        org,
        event_id="e2",
        project=project,
        user=user,
        cost="0.5",
        status=500,
        latency=100,
        occurred_at="2026-11-21T10:59:59Z",
    )
    outcome = await feeder.events(first, second, first)
    topic = feeder.settings.topic_api_usage
    assert outcome.messages[(topic, "inserted")] == 2
    assert outcome.messages[(topic, "duplicate")] == 1
    metrics = await db.fetchrow("SELECT * FROM project_metrics")
    assert metrics is not None
    assert (metrics["request_count"], metrics["error_count"], metrics["estimated_cost_usd"]) == (2, 1, Decimal("0.528"))
    assert (metrics["latency_sum_ms"], metrics["latency_max_ms"]) == (940, 840)
    assert await db.fetchval("SELECT estimated_cost_usd FROM user_metrics") == Decimal("0.528")

    changed = dict(first, endpoint="/v1/other")
    outcome = await feeder.events(first, changed, second)  # replay + a conflicting reuse of e1
    assert outcome.messages[(topic, "duplicate")] == 2
    assert outcome.quarantined[(topic, "conflicting_duplicate")] == 1
    assert await db.fetchval("SELECT request_count FROM project_metrics") == 2  # nothing added twice
    assert await db.fetchval("SELECT endpoint FROM api_usage WHERE event_id = 'e1'") == "/v1/orchestrations"
    row = await db.fetchrow("SELECT reason, source_offset FROM quarantine")
    assert row is not None
    assert (row["reason"], row["source_offset"]) == ("conflicting_duplicate", 4)
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE topic = $1", feeder.settings.topic_dead_letter) == 1


class RecordingEvaluator:
    """A budget evaluator that only records the scopes a batch hands it."""

    def __init__(self) -> None:
        self.touched: list[Touch] = []

    async def evaluate(self, tx: Tx, touched: Iterable[Touch]) -> list[Alert | Resolution]:
        self.touched.extend(touched)
        return []


async def test_only_scopes_of_organizations_with_an_active_budget_are_evaluated(
    db: asyncpg.Connection, database: Database, settings: Settings
) -> None:
    budgeted, unbudgeted, inactive = await make_org(db), await make_org(db), await make_org(db)
    for org, active in ((budgeted, True), (inactive, False)):
        await db.execute(
            "INSERT INTO ai_organization_budgets (organization_id, name, amount, period, timezone, thresholds, "
            "is_active) VALUES ($1, 'b', 100, 'monthly', 'UTC', '{0.5}', $2)",
            org.id,
            active,
        )
    evaluator = RecordingEvaluator()
    feeder = Feeder(Pipeline(database, settings, budgets=evaluator), settings)
    events = [
        api_event(org, event_id=f"e{n}-{i}", project=org.projects["proj_a"], user=org.users[0], occurred_at=at)
        for n, org in enumerate((budgeted, unbudgeted, inactive))
        for i, at in enumerate(("2026-11-21T10:00:00Z", "2026-11-21T10:30:00Z", "2026-11-21T11:00:00Z"))
    ]
    outcome = await feeder.events(*events)
    assert outcome.messages[(settings.topic_api_usage, "inserted")] == 9
    hour = datetime(2026, 11, 21, 10, tzinfo=UTC)
    expected = {
        Touch(budgeted.id, budgeted.projects["proj_a"], budgeted.users[0], hour.replace(hour=h)) for h in (10, 11)
    }
    assert sorted(evaluator.touched, key=lambda t: t.at) == sorted(expected, key=lambda t: t.at)
    assert await db.fetchval("SELECT sum(request_count) FROM project_metrics") == 9  # the rollups have all of them


async def test_bad_messages_are_quarantined_while_batch_mates_land(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    other = await make_org(db)
    good = api_event(org, project=org.projects["proj_a"])
    records = [
        dumps(good),
        b"not json",
        dumps(api_event(org, project=other.projects["proj_a"])),  # another organization's project
        dumps({**api_event(org), "organization_id": "00000000-0000-0000-0000-000000000001"}),
        dumps({**api_event(org), "user_id": str(other.users[0])}),
        b'{"event_id": "x", "event_id": "y"}',
    ]
    outcome = await feeder.apply([feeder.record(feeder.settings.topic_api_usage, r) for r in records])
    topic = feeder.settings.topic_api_usage
    assert outcome.messages[(topic, "inserted")] == 1
    assert dict(outcome.quarantined) == {
        (topic, "not_json"): 1,
        (topic, "unknown_project"): 1,
        (topic, "unknown_organization"): 1,
        (topic, "unknown_user"): 1,
        (topic, "duplicate_key"): 1,
    }
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 1
    dead = await db.fetch("SELECT key, headers FROM outbox ORDER BY id")
    assert len(dead) == 5
    assert dead[0]["key"] == f"{topic}:0:1".encode()


async def test_unattributed_lines_are_quarantined_and_the_rest_lands(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    page = envelope(
        "openai",
        org.ai_org,
        "costs_v1",
        [openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_a", "x", 1), ("proj_unknown", "x", 2)])],
    )
    outcome = await feeder.buckets(page)
    assert outcome.quarantined[(feeder.settings.topic_provider_buckets, "unattributed")] == 1
    assert await db.fetchval("SELECT sum(amount) FROM cost_data") == Decimal(1)
    unknown_org = envelope(
        "openai", "org-nobody", "costs_v1", [openai_cost_bucket("2026-11-01", "2026-11-02", [(None, "x", 1)])]
    )
    outcome = await feeder.buckets(unknown_org)
    assert outcome.quarantined[(feeder.settings.topic_provider_buckets, "unattributed")] == 1


async def test_legacy_openai_project_ids_attribute(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db, legacy={"proj_legacy": "old"})
    page = envelope(
        "openai", org.ai_org, "costs_v1", [openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_legacy", "x", 4)])]
    )
    await feeder.buckets(page)
    assert await db.fetchval("SELECT project_id FROM cost_data") == org.projects["proj_legacy"]


async def test_stale_expected_offsets_reject_the_whole_batch(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    await feeder.events(api_event(org))
    zombie = dict(feeder.stored)
    await feeder.events(api_event(org))
    record = feeder.record(feeder.settings.topic_api_usage, dumps(api_event(org, event_id="zombie")))
    with pytest.raises(StaleOffsets):
        await feeder.pipeline.apply(decode_batch([record], feeder.settings), zombie)
    assert await db.fetchval("SELECT count(*) FROM api_usage WHERE event_id = 'zombie'") == 0
    assert await db.fetchval("SELECT next_offset FROM consumer_offsets") == 2


async def test_events_without_project_or_user(db: asyncpg.Connection, feeder: Feeder) -> None:
    org = await make_org(db)
    await feeder.events(api_event(org), api_event(org, occurred_at="2026-11-21T11:00:00Z"))
    assert await db.fetchval("SELECT count(*) FROM project_metrics WHERE project_id IS NULL") == 2
    assert await db.fetchval("SELECT count(*) FROM user_metrics") == 0


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
async def test_order_of_deliveries_does_not_matter(
    db: asyncpg.Connection, feeder: Feeder, order: tuple[int, ...]
) -> None:
    org = await make_org(db)
    revisions = [
        envelope(
            "openai",
            org.ai_org,
            "costs_v1",
            [openai_cost_bucket("2026-11-01", "2026-11-02", [("proj_a", "x", v), (None, "y", v)])],
            collected_at=f"2026-11-02T0{v}:00:00Z",
        )
        for v in (1, 2, 3)
    ]
    for i in order:
        await feeder.buckets(revisions[i])
    assert sorted(r["amount"] for r in await db.fetch("SELECT amount FROM cost_data")) == [Decimal(3), Decimal(3)]


async def test_an_event_the_catalogue_prices_past_the_request_bound_is_quarantined_not_fatal(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """Valid counts (below 1e15 tokens) at a model's price can make an estimate of 1e9 USD or more, which
    api_usage's CHECK rejects: that failed the whole batch as fatal (the worker stopped, and stopped again on the
    same message after a restart). It is invalid_number, and the event beside it lands."""
    org = await make_org(db)
    project = org.projects["proj_a"]
    good = api_event(org, project=project, model="gpt-4o", prompt=1000, completion=100)
    del good["token_usage"]["cost_usd"]
    absurd = api_event(org, project=project, model="gpt-4o", prompt=0, completion=999_999_999_999_999)
    del absurd["token_usage"]["cost_usd"]  # at 10 USD per million output tokens: 9,999,999,999.99 USD
    outcome = await feeder.events(good, absurd)
    assert dict(outcome.quarantined) == {(feeder.settings.topic_api_usage, "invalid_number"): 1}
    stored = {r["event_id"]: r["catalogue_cost_usd"] for r in await db.fetch("SELECT * FROM api_usage")}
    assert stored == {good["event_id"]: Decimal("0.0035")}


async def test_a_usage_bucket_priced_past_the_ledger_bound_is_quarantined_not_fatal(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """1e14 web searches (a valid count) at the catalogue's 10 USD per thousand are 1e12 USD, which cost_data's
    CHECK rejects: that failed the whole batch as fatal. The message is invalid_number, the one beside it lands."""
    org = await make_org(db, provider="anthropic", project_ids=("wrkspc_01",))

    def usage(searches: int, hour: int) -> dict[str, Any]:
        result = {
            "output_tokens": 0,
            "server_tool_use": {"web_search_requests": searches},
            "model": "claude-sonnet-4-5",
            "workspace_id": "wrkspc_01",
        }
        start, end = f"2026-11-01T0{hour}:00:00Z", f"2026-11-01T0{hour + 1}:00:00Z"
        return envelope("anthropic", org.ai_org, "usage_v1", [anthropic_usage_bucket(start, end, [result])])

    outcome = await feeder.buckets(usage(100_000_000_000_000, 0), usage(3, 1))
    assert dict(outcome.quarantined) == {(feeder.settings.topic_provider_buckets, "invalid_number"): 1}
    rows = await db.fetch("SELECT line_item, amount FROM cost_data WHERE line_item LIKE '%web_search%'")
    assert [(r["line_item"], r["amount"]) for r in rows] == [("claude-sonnet-4-5:web_search_requests", Decimal("0.03"))]


async def test_events_without_cost_are_estimated_from_the_catalogue(db: asyncpg.Connection, feeder: Feeder) -> None:
    """The rollups say how much of the estimate the platform priced and how much the catalogue did."""
    org = await make_org(db)
    project = org.projects["proj_a"]
    priced = api_event(org, project=project, cost="0.5", model="gpt-4o", prompt=1000, completion=100)
    unpriced = api_event(org, project=project, model="gpt-4o", prompt=1000, completion=100)
    del unpriced["token_usage"]["cost_usd"]
    unknown = api_event(org, project=project, model="acme-private-llm", prompt=1000, completion=100)
    del unknown["token_usage"]["cost_usd"]
    outcome = await feeder.events(priced, unpriced, unknown)
    assert outcome.catalogue_estimates == 1
    stored = {
        r["event_id"]: (r["cost_usd"], r["catalogue_cost_usd"], r["price_source"])
        for r in await db.fetch("SELECT event_id, cost_usd, catalogue_cost_usd, price_source FROM api_usage")
    }
    assert stored[priced["event_id"]] == (Decimal("0.5"), None, None)
    # 1,000 prompt tokens at 2.50 and 100 completion tokens at 10 per million
    assert stored[unpriced["event_id"]][:2] == (None, Decimal("0.0035"))
    assert stored[unpriced["event_id"]][2].startswith("genai-prices ")
    assert stored[unknown["event_id"]] == (None, None, None)  # the catalogue cannot price it: no estimate
    metrics = await db.fetchrow(
        "SELECT sum(estimated_cost_usd) AS total, sum(platform_cost_usd) AS platform, "
        "sum(catalogue_cost_usd) AS catalogue FROM project_metrics WHERE project_id = $1",
        project,
    )
    assert metrics is not None
    assert (metrics["total"], metrics["platform"], metrics["catalogue"]) == (
        Decimal("0.5035"),
        Decimal("0.5"),
        Decimal("0.0035"),
    )
    again = await feeder.events(unpriced)  # a replay adds nothing
    assert again.catalogue_estimates == 1
    total = await db.fetchval("SELECT sum(estimated_cost_usd) FROM project_metrics WHERE project_id = $1", project)
    assert total == Decimal("0.5035")
