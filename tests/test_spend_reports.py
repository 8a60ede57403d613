"""Two OpenAI usage reports of one account never retire each other's lines (README "What counts as spend", rule 1).

``openai.usage.completions`` and ``openai.usage.embeddings`` of the organization's account report the same windows
(a width drawn per example, daily or hourly, so that neither is quarantined as an overlapping window of its own
report), next to cost buckets and API-usage events. Each report's revisions arrive in any order: newer ones with
fewer lines, empty ones, the same revision again, older ones late. Each report's newest revision of a window
replaces only its own lines of that window. Fed through the real pipeline, one message per batch; after the last
step every budget's spend in every period (organization budgets in seven zones, project and user budgets) from the
aggregate (``cost_worker_spend``), from the full computation (``cost_worker_spend_full``) and from
``tests/spend_model.py`` are equal, the open alerts are the model's, and the aggregate kept incrementally equals the
one rebuilt from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import add_price, envelope, ts
from tests.feeding import Feeder
from tests.spend_model import Row, sum_lines
from tests.test_spend_aggregate import assert_incremental_equals_rebuilt
from tests.test_spend_rules import (
    BASE_DAYS,
    HOUR,
    Expected,
    Snapshot,
    World,
    _iso,
    add_prices_once,
    apply_step,
    assert_matches_model,
    events,
    example_periods,
    make_world,
)

REPORTS = ("openai.usage.completions", "openai.usage.embeddings")


@dataclass(frozen=True)
class Embeddings:
    """One bucket of OpenAI's embeddings usage (organization.usage.embeddings.result, input_tokens per model)."""

    day: int
    hour: int | None  # None: a daily window
    collected_after: int
    lines: tuple[tuple[str | None, str, int], ...]  # (project, model, input tokens)


def embeddings_payload(world: World, step: Embeddings) -> tuple[dict[str, Any], list[Row], Any]:
    """The message as the collector publishes it (``endpoint``: embeddings; the OpenAI Usage API's embeddings
    result, https://platform.openai.com/docs/api-reference/usage/embeddings), and the model's rows of it."""
    start = world.base + timedelta(days=step.day) + (HOUR * step.hour if step.hour is not None else timedelta(0))
    end = start + (HOUR if step.hour is not None else timedelta(days=1))
    collected = start + HOUR * step.collected_after
    results = [
        {
            "object": "organization.usage.embeddings.result",
            "input_tokens": n,
            "num_model_requests": 1,
            "project_id": p,
            "user_id": None,
            "api_key_id": None,
            "model": m,
        }
        for p, m, n in step.lines
    ]
    bucket = {
        "object": "bucket",
        "start_time": ts(_iso(start)[:-1]),
        "end_time": ts(_iso(end)[:-1]),
        "results": results,
    }
    message = {
        **envelope("openai", world.openai_account, "usage_v1", [bucket], collected_at=_iso(collected)),
        "endpoint": "embeddings",
    }
    rows = [
        Row(
            world.org,
            world.projects[p] if p else None,
            "openai",
            world.openai_account,
            "openai.usage.embeddings",
            "usage",
            start,
            end,
            f"{m}:input_tokens",
            Decimal(n) if m == "m1" else None,
            collected,
            quantity=Decimal(n),
        )
        for p, m, n in step.lines
    ]
    return message, sum_lines(rows), ("openai", world.openai_account, "openai.usage.embeddings", start, end)


@st.composite
def plans(draw: st.DrawFn) -> list[Any]:
    daily = draw(st.booleans())  # one width for both usage reports (another width of a report is quarantined)
    windows = st.just((0, None)) if daily else st.sampled_from([(0, 10), (0, 11), (0, 23)])
    collected = st.sampled_from([1, 5, 30] if daily else [1, 2, 3])
    line = st.tuples(
        st.sampled_from(["proj_a", "proj_b", None]), st.sampled_from(["m1", "m1", "mx"]), st.integers(1, 9)
    )

    @st.composite
    def usage(draw: st.DrawFn) -> Snapshot | Embeddings:
        day, hour = draw(windows)
        lines = tuple(draw(st.lists(line, max_size=3)))  # empty: an empty bucket (a revision that drops every line)
        if draw(st.booleans()):
            return Embeddings(day, hour, draw(collected), lines)
        return Snapshot("openai.usage", day, hour, draw(collected), lines)

    cost = st.builds(
        Snapshot,
        report=st.just("openai.costs"),
        day=st.just(0),
        hour=st.sampled_from([None, 10, 11]),
        collected_after=st.sampled_from([1, 30]),
        lines=st.lists(st.tuples(st.sampled_from(["proj_a", None]), st.just("x"), st.integers(1, 9)), max_size=2).map(
            tuple
        ),
    )
    first: list[Any] = draw(st.lists(events, min_size=1, max_size=4))
    rest: list[Any] = draw(st.lists(st.one_of(usage(), usage(), usage(), cost, events), min_size=2, max_size=10))
    steps = first + rest
    # Often the same revision again, or an older revision of a window arriving after a newer one.
    if draw(st.booleans()):
        again = draw(st.sampled_from(steps))
        steps.insert(draw(st.integers(0, len(steps))), again)
    return steps


async def apply(feeder: Feeder, world: World, expected: Expected, base: datetime, step: Any) -> None:
    if not isinstance(step, Embeddings):
        await apply_step(feeder, world, expected, base, step)
        return
    message, rows, window = embeddings_payload(world, step)
    outcome = await feeder.buckets(message)
    assert not expected.ledger.overlaps(window)
    assert not outcome.quarantine, [q.detail for q in outcome.quarantine]
    expected.snapshot(rows, window, window[3] + HOUR * step.collected_after)


async def check(db: asyncpg.Connection, world: World, expected: Expected) -> None:
    await assert_matches_model(db, world, expected)  # the aggregate and the open alerts
    model = expected.model()
    for budget in world.budgets:
        for start, end in example_periods(world, budget):
            full = await db.fetchval(
                "SELECT spend FROM cost_worker_spend_full($1, $2, $3, $4, $5, $6, 'USD')",
                budget["scope"],
                world.org,
                budget["project"],
                budget["user"],
                start,
                end,
            )
            wanted = model.spend(budget["scope"], world.org, budget["project"], budget["user"], start, end)
            assert full == wanted, (budget["scope"], budget["period"], budget["timezone"], start, full, wanted)
    await assert_incremental_equals_rebuilt(db, world.org)
    # Both reports' lines are in the ledger as the model has them: current or superseded, per report.
    stored = await db.fetch(
        "SELECT report, project_id, bucket_start_time, line_item, amount FROM cost_data "
        "WHERE organization_id = $1 AND report = ANY ($2) AND superseded_at IS NULL",
        world.org,
        list(REPORTS),
    )
    current = {(r.report, r.project_id, r.start, r.line_item, r.amount) for r in expected.ledger.current()}
    assert {tuple(r) for r in stored} == {c for c in current if c[0] in REPORTS}


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(base=st.sampled_from(BASE_DAYS), plan=plans())
async def test_two_usage_reports_of_one_account_replace_only_their_own_lines(
    base: datetime, plan: list[Any], db: asyncpg.Connection, feeder: Feeder
) -> None:
    await add_prices_once(db)
    if not await db.fetchval("SELECT count(*) FROM model_prices WHERE model = 'm1' AND token_type = 'input_tokens'"):
        await add_price(db, "openai", "m1", "input_tokens", "1000000")  # embeddings: one USD per token, as m1's text
    world = await make_world(db, base)
    expected = Expected(world)
    for step in plan:
        await apply(feeder, world, expected, base, step)
    await check(db, world, expected)
