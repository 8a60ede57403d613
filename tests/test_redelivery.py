"""Deliveries of one event key in one batch, against a real database: batch boundaries never change an outcome.

The rule (README "Dedupe"): the first write of a key (organization, occurred_at, event_id) wins, a later delivery
with the stored content is a duplicate, one with other content is a ``conflicting_duplicate``; a delivery whose
project the platform does not know is quarantined and leaves the store as it was, unless its key is stored already
(dedupe comes first: it is then judged by its content, like any other delivery of the key). The independent model
applies the deliveries one at a time, in plain Python with Decimal; the database sees the same deliveries cut into
batches anywhere.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import Org, api_event, make_org
from tests.feeding import Feeder

INSTANTS = ("2026-11-21T10:00:00Z", "2026-11-21T10:30:00.5Z")
MOMENTS = [datetime.fromisoformat(i) for i in INSTANTS]
COSTS = (Decimal("0.028"), Decimal("0.5"))
UNKNOWN = "unknown"  # a delivery naming a project the platform does not know
_ids = itertools.count()


@dataclass(frozen=True)
class Delivery:
    event: int  # which event id (of three)
    instant: int  # which occurred_at (of two)
    content: int | str  # which cost (of two), or UNKNOWN


def body(org: Org, delivery: Delivery, prefix: str) -> dict[str, Any]:
    project = org.projects["proj_a"]
    if delivery.content == UNKNOWN:
        project = uuid.uuid4()
        cost = COSTS[0]
    else:
        assert isinstance(delivery.content, int)
        cost = COSTS[delivery.content]
    return api_event(
        org,
        event_id=f"{prefix}-{delivery.event}",
        project=project,
        occurred_at=INSTANTS[delivery.instant],
        cost=str(cost),
    )


def model(deliveries: list[Delivery]) -> tuple[dict[tuple[int, int], Decimal], list[str], Counter[str]]:
    """One delivery at a time: (stored cost per key, each delivery's outcome, outcome counts)."""
    stored: dict[tuple[int, int], int | str] = {}
    outcomes = []
    for delivery in deliveries:
        key = (delivery.event, delivery.instant)
        if delivery.content == UNKNOWN:
            # dedupe before the reference check: a stored key is judged by its content (another project here)
            outcomes.append("conflicting_duplicate" if key in stored else "unknown_project")
        elif key not in stored:
            stored[key] = delivery.content
            outcomes.append("inserted")
        elif stored[key] == delivery.content:
            outcomes.append("duplicate")
        else:
            outcomes.append("conflicting_duplicate")
    costs = {key: COSTS[content] for key, content in stored.items() if isinstance(content, int)}
    return costs, outcomes, Counter(outcomes)


deliveries_strategy = st.lists(
    st.builds(Delivery, st.integers(0, 2), st.integers(0, 1), st.sampled_from([0, 1, UNKNOWN])),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries=deliveries_strategy, cuts=st.sets(st.integers(1, 11)))
async def test_deliveries_cut_into_batches_anywhere_end_as_applied_one_at_a_time(
    db: asyncpg.Connection, feeder: Feeder, deliveries: list[Delivery], cuts: set[int]
) -> None:
    org = await make_org(db)
    prefix = f"p{next(_ids)}"
    topic = feeder.settings.topic_api_usage
    start = feeder.next.get((topic, 0), 0)
    bounds = [0, *sorted(c for c in cuts if c < len(deliveries)), len(deliveries)]
    counts: Counter[str] = Counter()
    for lo, hi in itertools.pairwise(bounds):
        outcome = await feeder.events(*(body(org, d, prefix) for d in deliveries[lo:hi]))
        counts.update({result: n for (_, result), n in outcome.messages.items()})
        counts.update({reason: n for (_, reason), n in outcome.quarantined.items()})

    costs, outcomes, expected = model(deliveries)
    rows = await db.fetch("SELECT event_id, occurred_at, cost_usd FROM api_usage WHERE organization_id = $1", org.id)
    stored = {
        (int(row["event_id"].rsplit("-", 1)[1]), MOMENTS.index(row["occurred_at"])): row["cost_usd"] for row in rows
    }
    assert stored == costs
    quarantined = await db.fetch(
        "SELECT source_offset, reason FROM quarantine WHERE source_offset >= $1 ORDER BY source_offset", start
    )
    assert [(row["source_offset"] - start, row["reason"]) for row in quarantined] == [
        (n, outcome) for n, outcome in enumerate(outcomes) if outcome not in ("inserted", "duplicate")
    ]
    assert counts["inserted"] == expected["inserted"]
    assert counts["duplicate"] == expected["duplicate"]
    assert counts["quarantined"] == expected["unknown_project"] + expected["conflicting_duplicate"]
    # the rollups hold each stored event once
    total = await db.fetchrow(
        "SELECT coalesce(sum(request_count), 0) AS n, coalesce(sum(estimated_cost_usd), 0) AS cost "
        "FROM project_metrics WHERE organization_id = $1",
        org.id,
    )
    assert total is not None
    assert (total["n"], total["cost"]) == (len(costs), sum(costs.values(), Decimal(0)))


async def test_an_exact_resend_after_a_conflicting_copy_in_one_batch_is_a_duplicate(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """The fault suite's flake: O stored; then C (other content) and R (O again) in one batch, C first."""
    org = await make_org(db)
    topic = feeder.settings.topic_api_usage
    original = api_event(org, event_id="e1", project=org.projects["proj_a"])
    changed = dict(original, endpoint="/v1/other")
    assert (await feeder.events(original)).messages[(topic, "inserted")] == 1
    outcome = await feeder.events(changed, original, changed, original)
    assert outcome.messages[(topic, "duplicate")] == 2
    assert outcome.quarantined[(topic, "conflicting_duplicate")] == 2
    rows = await db.fetch("SELECT source_offset, reason FROM quarantine ORDER BY source_offset")
    assert [(row["source_offset"], row["reason"]) for row in rows] == [
        (1, "conflicting_duplicate"),
        (3, "conflicting_duplicate"),
    ]
    assert await db.fetchval("SELECT request_count FROM project_metrics") == 1


async def test_a_corrected_copy_after_an_unknown_project_in_one_batch_is_stored_once(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """The first delivery is quarantined (unknown project): the store is as it was, so the next one is judged
    by the database in a second round of the same transaction, and the one after that from it."""
    org = await make_org(db)
    topic = feeder.settings.topic_api_usage
    good = api_event(org, event_id="e1", project=org.projects["proj_a"])
    unknown = dict(good, project_id="6f1c1d6e-0000-4000-8000-0000000000ff")
    outcome = await feeder.events(unknown, good, good, dict(good, endpoint="/v1/other"))
    assert outcome.messages[(topic, "inserted")] == 1
    assert outcome.messages[(topic, "duplicate")] == 1
    assert outcome.quarantined[(topic, "unknown_project")] == 1
    assert outcome.quarantined[(topic, "conflicting_duplicate")] == 1
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 1
    assert await db.fetchval("SELECT request_count FROM project_metrics") == 1


async def test_a_redelivery_after_its_user_or_project_moved_is_a_duplicate(
    db: asyncpg.Connection, feeder: Feeder
) -> None:
    """An event of user u in project p of A is stored; u moves to B, then p does too. Its redeliveries (a
    rebalance, a full replay) are duplicates, and one with other content a conflicting duplicate: dedupe comes
    before the reference check, so nothing already counted is quarantined and the rollups stay as they were. A new
    event of A naming u is still ``unknown_user``: the worker knows where u is now, not where it was."""
    org_a = await make_org(db)
    org_b = await make_org(db, project_ids=())
    u, p = org_a.users[0], org_a.projects["proj_a"]
    topic = feeder.settings.topic_api_usage
    event = api_event(org_a, event_id="e1", project=p, user=u, cost="5")
    assert (await feeder.events(event)).messages[(topic, "inserted")] == 1
    await db.execute("UPDATE users SET organization_id = $2 WHERE id = $1", u, org_b.id)
    outcome = await feeder.events(event, dict(event, endpoint="/v1/other"), dict(event, event_id="e2"))
    assert outcome.messages[(topic, "duplicate")] == 1
    assert dict(outcome.quarantined) == {(topic, "conflicting_duplicate"): 1, (topic, "unknown_user"): 1}
    await db.execute("UPDATE projects SET organization_id = $2 WHERE id = $1", p, org_b.id)
    outcome = await feeder.events(event)
    assert outcome.messages[(topic, "duplicate")] == 1
    assert not outcome.quarantined
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 1
    assert [tuple(r) for r in await db.fetch("SELECT request_count, estimated_cost_usd FROM user_metrics")] == [
        (1, Decimal(5))
    ]
