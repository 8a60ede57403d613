"""Seeding a database with a stream's platform rows, and asserting the end state against the expectation."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from tests.faults.expectation import Coordinates, Expected
from tests.faults.generator import Kind, Stream
from worker.config import Settings


async def seed(db: asyncpg.Connection, stream: Stream) -> None:
    """Organizations, users, projects, prices and budgets (as superuser, like the platform would)."""
    for org in stream.orgs:
        await db.execute(
            "INSERT INTO organizations (id, name, slug) VALUES ($1, $2, $3)", org.id, org.ai_org, f"o-{org.id.hex[:16]}"
        )
        for user in org.users:
            await db.execute(
                "INSERT INTO users (id, organization_id, email, username) VALUES ($1, $2, $3, $3)",
                user,
                org.id,
                f"{user.hex[:16]}@example.com",
            )
        for pid, project in org.projects.items():
            await db.execute(
                "INSERT INTO projects (id, organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                project,
                org.id,
                pid,
                org.provider,
                org.ai_org,
                pid,
            )
    for (provider, model, token_type), price in stream.prices.items():
        await db.execute(
            "INSERT INTO model_prices (provider, model, token_type, price_per_million, currency, effective_from) "
            "VALUES ($1, $2, $3, $4, 'USD', $5)",
            provider,
            model,
            token_type,
            price,
            datetime(2020, 1, 1, tzinfo=UTC),
        )
    for budget in stream.budgets:
        common = (budget.id, budget.organization_id, budget.amount, budget.period, list(budget.thresholds))
        if budget.scope == "organization":
            await db.execute(
                "INSERT INTO ai_organization_budgets (id, organization_id, amount, period, thresholds) "
                "VALUES ($1, $2, $3, $4, $5)",
                *common,
            )
        elif budget.scope == "project":
            await db.execute(
                "INSERT INTO ai_project_budgets (id, organization_id, amount, period, thresholds, project_id) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                *common,
                budget.project_id,
            )
        else:
            await db.execute(
                "INSERT INTO ai_budgets (id, organization_id, amount, period, thresholds, user_id, project_id) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                *common,
                budget.user_id,
                budget.project_id,
            )


def kind_of(settings: Settings, topic: str) -> Kind:
    return "event" if topic == settings.topic_api_usage else "bucket"


def topic_of(settings: Settings, kind: str) -> str:
    return settings.topic_api_usage if kind == "event" else settings.topic_provider_buckets


@dataclass
class Published:
    """What reached the output topics."""

    alert_ids: Counter[str]
    dead_letters: Counter[str]

    @property
    def republished(self) -> int:
        """Extra copies (allowed by at-least-once publishing; consumers dedupe on the stable ids)."""
        return sum(n - 1 for n in self.alert_ids.values()) + sum(n - 1 for n in self.dead_letters.values())


async def assert_tables(
    db: asyncpg.Connection, expected: Expected, settings: Settings, *, outbox_drained: bool = True
) -> None:
    """Ledger, events, rollups, quarantine, offsets and alerts equal the expectation exactly."""
    # Ledger: every key, with the winning revision and the message that wrote it.
    rows = await db.fetch(
        "SELECT organization_id, project_id, provider, ai_organization_id, ai_project_id, api_version::text AS v, "
        "bucket_start_time, bucket_end_time, line_item, currency, amount, quantity, collected_at, "
        "source_partition, source_offset FROM cost_data"
    )
    actual_ledger = {
        (
            r["organization_id"],
            r["project_id"],
            r["provider"],
            r["ai_organization_id"],
            r["v"],
            r["bucket_start_time"],
            r["bucket_end_time"],
            r["line_item"],
        ): (
            r["ai_project_id"],
            r["currency"],
            r["amount"],
            r["quantity"],
            r["collected_at"],
            r["source_partition"],
            r["source_offset"],
        )
        for r in rows
    }
    assert len(rows) == len(actual_ledger)
    wanted_ledger = {
        key: (line.ai_project_id, line.currency, line.amount, line.quantity, collected, partition, offset)
        for key, (line, collected, partition, offset) in expected.cost_data.items()
    }
    _assert_same("cost_data", actual_ledger, wanted_ledger)

    rows = await db.fetch(
        "SELECT organization_id, event_id, project_id, user_id, status_code, response_time_ms, occurred_at, "
        "prompt_tokens, completion_tokens, total_tokens, model, cost_usd, source_partition, source_offset "
        "FROM api_usage"
    )
    actual_events = {(r["organization_id"], r["occurred_at"], r["event_id"]): tuple(r)[2:] for r in rows}
    wanted_events = {
        key: (
            e.project_id,
            e.user_id,
            e.status_code,
            e.response_time_ms,
            e.occurred_at,
            e.prompt_tokens,
            e.completion_tokens,
            e.total_tokens,
            e.model,
            e.cost_usd,
            partition,
            offset,
        )
        for key, (e, partition, offset) in expected.api_usage.items()
    }
    _assert_same("api_usage", actual_events, wanted_events)

    rows = await db.fetch(
        "SELECT organization_id, project_id, hour, request_count, error_count, prompt_tokens, completion_tokens, "
        "total_tokens, estimated_cost_usd, latency_sum_ms, latency_max_ms FROM project_metrics"
    )
    _assert_same(
        "project_metrics",
        {(r[0], r[1], r[2]): list(r)[3:] for r in rows},
        expected.project_metrics,
    )
    rows = await db.fetch(
        "SELECT user_id, hour, project_id, request_count, total_tokens, estimated_cost_usd FROM user_metrics"
    )
    _assert_same("user_metrics", {(r[0], r[1], r[2]): list(r)[3:] for r in rows}, expected.user_metrics)

    # Every source offset accounted for exactly once: stored, quarantined, or a duplicate/stale revision.
    rows = await db.fetch("SELECT source_topic, source_partition, source_offset, reason, detail FROM quarantine")
    quarantined = {(kind_of(settings, r[0]), r[1], r[2]): r[3] for r in rows}
    assert len(quarantined) == len(rows)
    # The detail goes into the failure message only: it names why an unexpected row was quarantined.
    details = {(kind_of(settings, r[0]), r[1], r[2]): r[4] for r in rows}
    _assert_same("quarantine", quarantined, expected.quarantine, details)
    stored: set[Coordinates] = {
        ("bucket", r[0], r[1]) for r in await db.fetch("SELECT DISTINCT source_partition, source_offset FROM cost_data")
    } | {("event", r[0], r[1]) for r in await db.fetch("SELECT source_partition, source_offset FROM api_usage")}
    assert not stored & set(quarantined), "an offset is both stored and quarantined"
    every = {(kind, partition, offset) for (kind, partition), end in expected.ends.items() for offset in range(end)}
    skipped = every - stored - set(quarantined)
    assert stored | set(quarantined) <= every, "a row names an offset that was never produced"
    assert skipped == expected.skipped, (
        f"duplicate/stale offsets differ: missing {sorted(expected.skipped - skipped)[:5]}, "
        f"unexpected {sorted(skipped - expected.skipped)[:5]}"
    )

    # Stored positions: the end of each partition.
    rows = await db.fetch(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = $1", settings.kafka_group_id
    )
    positions = {(kind_of(settings, r[0]), r[1]): r[2] for r in rows}
    _assert_same("consumer_offsets", positions, expected.ends)

    # Alerts: one row per crossed (budget, period, threshold), with the stable id; resolved ones as expected.
    rows = await db.fetch("SELECT id, scope, budget_id, period_start, threshold, resolved_at FROM budget_alerts")
    actual_alerts = {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}
    _assert_same("budget_alerts", actual_alerts, expected.alerts | expected.resolved)
    assert {r[0] for r in rows if r[5] is not None} == set(expected.resolved), "resolved alerts differ"
    if outbox_drained:
        assert await db.fetchval("SELECT count(*) FROM outbox") == 0, "the outbox was not drained"


def _assert_same(
    what: str, actual: dict[Any, Any], wanted: dict[Any, Any], details: dict[Any, Any] | None = None
) -> None:
    """Fail with what is missing, unexpected (with its value, and its detail when given) and different."""
    if actual == wanted:
        return
    missing = [k for k in wanted if k not in actual]
    extra = [(k, actual[k], (details or {}).get(k)) for k in actual if k not in wanted]
    differ = [(k, actual[k], wanted[k]) for k in wanted if k in actual and actual[k] != wanted[k]]
    raise AssertionError(
        f"{what}: {len(actual)} rows, expected {len(wanted)}; missing {len(missing)} e.g. {missing[:3]}; "
        f"unexpected {len(extra)} e.g. {extra[:3]}; different {len(differ)} e.g. {differ[:3]}"
    )


def delivery_id(value: bytes) -> str:
    """The stable id of an alerts-topic message: the alert id, or ``<alert id>:resolved`` for a resolution."""
    body = json.loads(value)
    return f"{body['alert_id']}:resolved" if body.get("type") == "budget.alert.resolved" else str(body["alert_id"])


def published(alert_records: list[Any], dead_records: list[Any]) -> Published:
    alert_ids = Counter(delivery_id(r.value) for r in alert_records)
    dead = Counter(r.key.decode() for r in dead_records)
    return Published(alert_ids, dead)


def assert_published(found: Published, expected: Expected, settings: Settings, *, exactly_once: bool) -> None:
    """Exactly the expected alert ids on the alerts topic, triggered and resolved (and a dead letter per
    quarantined message)."""
    wanted = {str(a) for a in [*expected.alerts, *expected.resolved]} | {f"{a}:resolved" for a in expected.resolved}
    assert set(found.alert_ids) == wanted, (
        f"alert ids on the topic differ: missing {wanted - set(found.alert_ids)}, "
        f"unexpected {set(found.alert_ids) - wanted}"
    )
    wanted_dead = {f"{topic_of(settings, kind)}:{p}:{o}" for kind, p, o in expected.quarantine}
    assert set(found.dead_letters) == wanted_dead
    if exactly_once:
        assert found.republished == 0, f"published twice: {[k for k, n in found.alert_ids.items() if n > 1]}"


def new_id() -> uuid.UUID:
    return uuid.uuid4()
