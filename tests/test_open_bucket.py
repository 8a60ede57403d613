"""Today's open bucket, polled again and again while it grows (README "Collecting from the providers", Windows):
each re-poll's revision replaces the one before exactly, whatever the provider left out of it.

The bucket ends at the next midnight, in the future; a poll whose page stops before today's bucket (the provider
has not opened it yet, or truncated its page) leaves the stored revision as it is; a revision with fewer line items
retires the missing ones; an empty bucket retires all; an older revision arriving late changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from tests.factories import envelope, make_org, openai_cost_bucket, openai_usage_bucket
from tests.feeding import Feeder


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT00:00:00")


async def _current(db: asyncpg.Connection, report: str) -> dict[tuple[object, str], Decimal]:
    rows = await db.fetch(
        "SELECT project_id, line_item, amount FROM cost_data WHERE superseded_at IS NULL AND report = $1", report
    )
    return {(row["project_id"], row["line_item"]): row["amount"] for row in rows}


async def test_an_open_bucket_repolled_is_replaced_exactly(db: asyncpg.Connection, feeder: Feeder) -> None:
    now = datetime.now(UTC)
    today, tomorrow, yesterday = _day(now), _day(now + timedelta(days=1)), _day(now - timedelta(days=1))
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    a, b = org.projects["proj_a"], org.projects["proj_b"]

    def poll(minutes_ago: int, *buckets: dict[str, object]) -> dict[str, object]:
        at = (now - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return envelope("openai", org.ai_org, "costs_v1", list(buckets), collected_at=at)

    closed = openai_cost_bucket(yesterday, today, [("proj_a", "gpt-4o, input", 4)])
    first = openai_cost_bucket(
        today, tomorrow, [("proj_a", "gpt-4o, input", 1), ("proj_b", "gpt-4o, output", 2), (None, "Credit", -0.5)]
    )
    outcome = await feeder.buckets(poll(50, closed, first))
    assert not outcome.quarantine, outcome.quarantine  # an end_time in the future (the next midnight) is accepted
    total = await db.fetchval(
        "SELECT sum(amount) FROM cost_data WHERE superseded_at IS NULL AND bucket_start_time >= $1",
        datetime.fromisoformat(today).replace(tzinfo=UTC),
    )
    assert total == Decimal("2.5")

    async def today_lines() -> dict[tuple[object, str], Decimal]:
        rows = await db.fetch(
            "SELECT project_id, line_item, amount FROM cost_data "
            "WHERE superseded_at IS NULL AND bucket_start_time = $1",
            datetime.fromisoformat(today).replace(tzinfo=UTC),
        )
        return {(row["project_id"], row["line_item"]): row["amount"] for row in rows}

    # A later poll whose page stops before today's bucket: today's stays as it was (nothing lost).
    await feeder.buckets(poll(40, closed))
    assert await today_lines() == {(a, "gpt-4o, input"): 1, (b, "gpt-4o, output"): 2, (None, "Credit"): Decimal("-0.5")}
    # Fewer line items, one grown: the grown one replaces, the missing ones stop counting (no double count).
    await feeder.buckets(poll(30, closed, openai_cost_bucket(today, tomorrow, [("proj_a", "gpt-4o, input", 3)])))
    assert await today_lines() == {(a, "gpt-4o, input"): 3}
    # The older, fuller revision arriving late changes nothing.
    await feeder.buckets(poll(45, closed, first))
    assert await today_lines() == {(a, "gpt-4o, input"): 3}
    # An empty open bucket is the truth of its window too.
    await feeder.buckets(poll(20, closed, openai_cost_bucket(today, tomorrow, [])))
    assert await today_lines() == {}
    # Yesterday's bucket, re-read in every poll, was never counted twice.
    closed_rows = await db.fetch(
        "SELECT amount FROM cost_data WHERE superseded_at IS NULL AND bucket_start_time = $1",
        datetime.fromisoformat(yesterday).replace(tzinfo=UTC),
    )
    assert [row["amount"] for row in closed_rows] == [Decimal(4)]


async def test_an_open_usage_bucket_with_fewer_models_retires_the_missing_ones(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    now = datetime.now(UTC)
    today, tomorrow = _day(now), _day(now + timedelta(days=1))
    org = await make_org(db, project_ids=("proj_a",))

    def poll(minutes_ago: int, results: list[dict[str, object]]) -> dict[str, object]:
        at = (now - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
        page = envelope(
            "openai", org.ai_org, "usage_v1", [openai_usage_bucket(today, tomorrow, results)], collected_at=at
        )
        return page | {"endpoint": "completions"}

    gpt4o = {"project_id": "proj_a", "model": "gpt-4o", "input_tokens": 1_000_000, "output_tokens": 0}
    mini = {"project_id": "proj_a", "model": "gpt-4o-mini", "input_tokens": 1_000_000, "output_tokens": 0}
    await feeder.buckets(poll(30, [gpt4o, mini]))
    first = await _current(db, "openai.usage.completions")
    assert sum(amount for amount in first.values()) == Decimal("2.65")  # 2.50 + 0.15
    await feeder.buckets(poll(20, [gpt4o | {"input_tokens": 2_000_000}]))
    second = await _current(db, "openai.usage.completions")
    assert sum(amount for amount in second.values()) == Decimal(5)
    assert not any(line.startswith("gpt-4o-mini:") for _, line in second)
