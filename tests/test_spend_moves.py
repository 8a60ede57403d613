"""A project moved to another organization, against the independent model (README "What counts as spend", rule 4).

Every ledger line and rollup row names its own organization, and counts there: a project moved to another
organization leaves the lines and estimates it had in the organization it left (they stay that organization's
spend, in its organization scope and in its budget of the project), and what arrives for it afterwards counts in
the organization that now owns it. The project's provider mapping is what an ungrouped provider row of an account
covers (organization scope): moving the project with its account changes which estimates such rows cover, in both
organizations. Written straight into the ledger and the rollups (the triggers keep the aggregate), in any order:
lines of the project in its current organization and late ones in the organization it left, ungrouped lines of
either organization's account, estimates in either, lines retired, moves back and forth (with the account, or the
organization alone), and the project deleted (its rows in both organizations cascade). After every step, for both
organizations, the organization scope and the project scopes of both projects (daily UTC periods; Asia/Kolkata's
too after the last step): the aggregate (``cost_worker_spend``) equals the full computation
(``cost_worker_spend_full``), which equals ``tests/spend_model.py``; at the end the aggregate kept incrementally
equals the aggregate rebuilt from scratch, in both organizations. A user moved to another organization the same
way (0045): its rollups count in the organization they name, in that organization's budgets of the user, registered
in the aggregate or not; and its rollups are keyed by organization (0046), so its events of the hour it moved count
in each organization they name, through the worker too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import api_event, make_org, migrate_before
from tests.feeding import Feeder
from tests.spend_model import Estimate, Row, SpendModel, periods_overlapping
from tests.test_spend_aggregate import assert_incremental_equals_rebuilt
from worker.migrate import migrate

BASE = datetime(2026, 11, 1, tzinfo=UTC)
H = timedelta(hours=1)
M = timedelta(minutes=1)
HOUR_OF_MOVE = datetime(2026, 11, 21, 10, tzinfo=UTC)

line = st.fixed_dictionaries(
    {
        "op": st.just("line"),
        "kind": st.sampled_from(["costs_v1", "usage_v1", "usage_v1"]),
        # p: the project that moves; q: a project that stays in organization A; None: an ungrouped line
        "project": st.sampled_from(["p", "p", "q", None]),
        # "current": the organization that owns p now (q's and ungrouped lines: see below); "left": the other one
        # (a late line of the organization p left, with that organization's account)
        "where": st.sampled_from(["current", "current", "left"]),
        "window": st.sampled_from(
            [(timedelta(0), 24 * H), (10 * H, 11 * H), (10 * H + 30 * M, 11 * H + 30 * M), (20 * H, 21 * H)]
        ),
        "item": st.sampled_from(["x", "y"]),
        "amount": st.sampled_from([None, Decimal(3), Decimal("7.5")]),
        "collected": st.sampled_from([H, 30 * H]),
    }
)
estimate = st.fixed_dictionaries(
    {
        "op": st.just("estimate"),
        "project": st.sampled_from(["p", "p", "q", None]),
        "where": st.sampled_from(["current", "current", "left"]),
        "hour": st.sampled_from([0, 10, 11, 20, 23]),
        "amount": st.sampled_from([Decimal(1), Decimal(2)]),
    }
)
# p goes to the other organization: with that organization's account (its provider mapping too), or alone
move = st.fixed_dictionaries({"op": st.just("move"), "account": st.booleans()})
retire = st.fixed_dictionaries({"op": st.just("retire"), "index": st.integers(0, 20)})
# p deleted (its rows cascade out of both organizations; later steps naming p are skipped)
delete = st.just({"op": "delete"})
steps = st.lists(st.one_of(line, line, line, estimate, estimate, move, retire, delete), min_size=1, max_size=12)
# Often ending with a move and then the deletion (the rows p left behind cascade out of the organization it left),
# after a cost line of p covering its estimate there (a deletion's deltas against the coverage of the moment, 0038).
TAILS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "move": [{"op": "move", "account": True}],
    "move, delete": [{"op": "move", "account": True}, {"op": "delete"}],
    "cover, move, delete": [
        {
            "op": "line",
            "kind": "costs_v1",
            "project": "p",
            "where": "current",
            "window": (timedelta(0), 24 * H),
            "item": "z",
            "amount": Decimal(3),
            "collected": 30 * H,
        },
        {"op": "estimate", "project": "p", "where": "current", "hour": 10, "amount": Decimal(1)},
        {"op": "move", "account": True},
        {"op": "delete"},
    ],
}
plans = st.tuples(steps, st.sampled_from(sorted(TAILS))).map(lambda t: [*t[0], *TAILS[t[1]]])

ZONES = ("UTC", "Asia/Kolkata")


async def run(db: asyncpg.Connection, plan: list[dict[str, Any]]) -> None:
    org_a = await make_org(db, project_ids=("p", "q"))
    org_b = await make_org(db, project_ids=())
    orgs = {"A": org_a.id, "B": org_b.id}
    account = {"A": org_a.ai_org, "B": org_b.ai_org}
    p, q = org_a.projects["p"], org_a.projects["q"]
    owner = "A"  # p's organization
    mapped = {p: ("openai", org_a.ai_org), q: ("openai", org_a.ai_org)}
    lines: dict[tuple[Any, ...], Row] = {}
    keys: list[tuple[Any, ...]] = []
    estimates: dict[tuple[Any, ...], Decimal] = {}
    deleted = False
    for number, step in enumerate(plan, 1):
        op = step["op"]
        if deleted and (op in ("move", "delete") or step.get("project") == "p"):
            continue
        if op in ("line", "estimate"):
            if step["project"] == "q":
                where = "A"  # q never leaves A
            else:
                where = owner if step["where"] == "current" else ("B" if owner == "A" else "A")
            project = {"p": p, "q": q, None: None}[step["project"]]
        if op == "line":
            s, e = step["window"]
            kind = step["kind"]
            amount = step["amount"] if kind == "usage_v1" else (step["amount"] or Decimal(2))
            quantity = Decimal(5) if kind == "usage_v1" else None
            key = (orgs[where], project, BASE + s, BASE + e, step["item"], kind, account[where])
            await db.execute(
                "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
                "bucket_start_time, bucket_end_time, line_item, currency, amount, quantity, collected_at) "
                "VALUES ($1, $2, 'openai', $3, $4, $5, $6, $7, 'USD', $8, $9, $10) "
                "ON CONFLICT (project_id, bucket_start_time, bucket_end_time, line_item, report, organization_id, "
                "provider, ai_organization_id) DO UPDATE SET amount = EXCLUDED.amount, quantity = EXCLUDED.quantity, "
                "collected_at = EXCLUDED.collected_at, superseded_at = NULL",
                orgs[where],
                project,
                account[where],
                kind,
                BASE + s,
                BASE + e,
                step["item"],
                amount,
                quantity,
                BASE + s + step["collected"],
            )
            keys.append(key)
            lines[key] = Row(
                orgs[where],
                project,
                "openai",
                account[where],
                kind,
                "cost" if kind == "costs_v1" else "usage",
                BASE + s,
                BASE + e,
                step["item"],
                amount,
                BASE + s + step["collected"],
                quantity=quantity,
            )
        elif op == "estimate":
            hour = BASE + step["hour"] * H
            await db.execute(
                "INSERT INTO project_metrics AS m (organization_id, project_id, hour, provider, request_count, "
                "estimated_cost_usd) VALUES ($1, $2, $3, 'openai', 1, $4) "
                "ON CONFLICT (organization_id, project_id, hour, provider) DO UPDATE SET "
                "estimated_cost_usd = m.estimated_cost_usd + EXCLUDED.estimated_cost_usd",
                orgs[where],
                project,
                hour,
                step["amount"],
            )
            mk = (orgs[where], project, hour)
            estimates[mk] = estimates.get(mk, Decimal(0)) + step["amount"]
        elif op == "move":
            owner = "B" if owner == "A" else "A"
            if step["account"]:
                await db.execute(
                    "UPDATE projects SET organization_id = $2, ai_organization_id = $3 WHERE id = $1",
                    p,
                    orgs[owner],
                    account[owner],
                )
                mapped[p] = ("openai", account[owner])
            else:
                await db.execute("UPDATE projects SET organization_id = $2 WHERE id = $1", p, orgs[owner])
        elif op == "delete":
            await db.execute("DELETE FROM projects WHERE id = $1", p)
            deleted = True
            lines = {k: r for k, r in lines.items() if r.project_id != p}
            estimates = {k: v for k, v in estimates.items() if k[1] != p}
        elif op == "retire" and keys:
            org, project, s, e, item, kind, acct = keys[step["index"] % len(keys)]
            await db.execute(
                "UPDATE cost_data SET superseded_at = now() WHERE organization_id = $1 "
                "AND project_id IS NOT DISTINCT FROM $2 AND bucket_start_time = $3 AND bucket_end_time = $4 "
                "AND line_item = $5 AND api_version = $6 AND ai_organization_id = $7",
                org,
                project,
                s,
                e,
                item,
                kind,
                acct,
            )
            lines.pop((org, project, s, e, item, kind, acct), None)
        model = SpendModel(
            list(lines.values()), [Estimate(o, pr, None, h, "openai", v) for (o, pr, h), v in estimates.items()], mapped
        )
        for zone in ZONES if number == len(plan) else ZONES[:1]:  # Kolkata's days after the last step
            for start, end in periods_overlapping("daily", zone, BASE - 24 * H, BASE + 48 * H):
                for org in orgs.values():
                    for scope, project in (("organization", None), ("project", p), ("project", q)):
                        args = (scope, org, project, None, start, end, "USD")
                        fast = await db.fetchval(
                            "SELECT spend FROM cost_worker_spend($1, $2, $3, $4, $5, $6, $7)", *args
                        )
                        full = await db.fetchval(
                            "SELECT spend FROM cost_worker_spend_full($1, $2, $3, $4, $5, $6, $7)", *args
                        )
                        wanted = model.spend(scope, org, project, None, start, end)
                        where_ = (op, zone, start, org == orgs["A"], scope, project == p)
                        assert (fast, full) == (wanted, wanted), (*where_, fast, full, wanted)
    for org in orgs.values():
        await assert_incremental_equals_rebuilt(db, org)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plan=plans)
async def test_spend_of_a_project_moved_between_organizations_equals_the_model(
    plan: list[dict[str, Any]], db: asyncpg.Connection
) -> None:
    await run(db, plan)


async def test_a_project_moved_to_another_organization_keeps_its_rows_where_they_name(db: asyncpg.Connection) -> None:
    """Project p of organization A (a 10 USD cost line of 3 November, a 5 USD estimate of the 5th) moves to B with
    B's account; B then has a 7 USD line of p for the same day, A a late 3 USD line of the 8th. Each counts in the
    organization it names: A's project scope 18, B's 7. Before 0037 the full computation said 25 and 20 (p's lines of
    both organizations, the estimates of its own), the aggregate 8 and 17 (one project scope per project: B's
    recomputation of p's 3rd deleted A's 10 USD there and put its own 7 plus A's 10 under B)."""
    org_a = await make_org(db, project_ids=("p",))
    org_b = await make_org(db, project_ids=())
    p = org_a.projects["p"]

    async def cost(org: Any, day: int, amount: int) -> None:
        await db.execute(
            "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
            "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) "
            "VALUES ($1, $2, 'openai', $3, 'costs_v1', $4, $5, 'x', 'USD', $6, $7)",
            org.id,
            p,
            org.ai_org,
            BASE + timedelta(days=day),
            BASE + timedelta(days=day + 1),
            Decimal(amount),
            BASE + timedelta(days=20),
        )

    await cost(org_a, 2, 10)
    await db.execute(
        "INSERT INTO project_metrics (organization_id, project_id, hour, provider, request_count, estimated_cost_usd) "
        "VALUES ($1, $2, $3, 'openai', 1, 5)",
        org_a.id,
        p,
        BASE + timedelta(days=4, hours=10),
    )
    await db.execute(
        "UPDATE projects SET organization_id = $2, ai_organization_id = $3 WHERE id = $1", p, org_b.id, org_b.ai_org
    )
    await cost(org_b, 2, 7)
    await cost(org_a, 7, 3)
    found = {}
    for name, org in (("A", org_a.id), ("B", org_b.id)):
        for scope, project in (("organization", None), ("project", p)):
            for fn in ("cost_worker_spend", "cost_worker_spend_full"):
                found[(name, scope, fn)] = await db.fetchval(
                    f"SELECT spend FROM {fn}($1, $2, $3, NULL, '2026-11-01Z', '2026-12-01Z', 'USD')",
                    scope,
                    org,
                    project,
                )
    wanted = {"A": Decimal(18), "B": Decimal(7)}
    assert found == {key: wanted[key[0]] for key in found}
    for org in (org_a.id, org_b.id):
        await assert_incremental_equals_rebuilt(db, org)


async def test_a_moved_project_deleted_leaves_the_organization_it_left_equal(db: asyncpg.Connection) -> None:
    """Project p of A: a 2 USD cost line covers its 1 USD estimate, beside q's 4 USD estimate; p moves to B, then is
    deleted. Its rows in A cascade: A's organization spend is q's 4 (the aggregate said 0 before 0038: 0036 rebuilt
    only B, the organization p belonged to when deleted, and A kept the deltas applied against the coverage of the
    moment)."""
    org_a = await make_org(db, project_ids=("p", "q"))
    org_b = await make_org(db, project_ids=())
    p, q = org_a.projects["p"], org_a.projects["q"]
    await db.execute(
        "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
        "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) "
        "VALUES ($1, $2, 'openai', $3, 'costs_v1', $4, $5, 'x', 'USD', 2, $6)",
        org_a.id,
        p,
        org_a.ai_org,
        BASE,
        BASE + timedelta(days=1),
        BASE + timedelta(days=2),
    )
    for project, amount in ((p, 1), (q, 4)):
        await db.execute(
            "INSERT INTO project_metrics (organization_id, project_id, hour, provider, request_count, "
            "estimated_cost_usd) VALUES ($1, $2, $3, 'openai', 1, $4)",
            org_a.id,
            project,
            BASE + timedelta(hours=3),
            Decimal(amount),
        )
    await db.execute(
        "UPDATE projects SET organization_id = $2, ai_organization_id = $3 WHERE id = $1", p, org_b.id, org_b.ai_org
    )
    await db.execute("DELETE FROM projects WHERE id = $1", p)
    found = [
        await db.fetchval(
            f"SELECT spend FROM {fn}('organization', $1, NULL, NULL, '2026-11-01Z', '2026-12-01Z', 'USD')", org_a.id
        )
        for fn in ("cost_worker_spend", "cost_worker_spend_full")
    ]
    assert found == [4, 4]
    for org in (org_a.id, org_b.id):
        await assert_incremental_equals_rebuilt(db, org)


async def test_the_migration_keeps_a_moved_projects_scope_per_organization(
    empty_database_url: str, tmp_path: Path
) -> None:
    """A database before 0037 whose moved project has rows in both organizations: after the migration both
    organizations' aggregates equal the full computation and the model (A's project scope 18, B's 7), and a later
    write in one organization leaves the other's scope of the project as it is."""
    await migrate_before(empty_database_url, tmp_path, 37)
    db = await asyncpg.connect(empty_database_url)
    try:
        org_a = await make_org(db, project_ids=("p",))
        org_b = await make_org(db, project_ids=())
        p = org_a.projects["p"]
        line = (
            "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
            "bucket_start_time, bucket_end_time, line_item, currency, amount, collected_at) "
            "VALUES ($1, $2, 'openai', $3, 'costs_v1', $4, $5, $6, 'USD', $7, $8)"
        )

        async def cost(org: Any, day: int, amount: int, item: str = "x") -> None:
            start = BASE + timedelta(days=day)
            end = start + timedelta(days=1)
            await db.execute(line, org.id, p, org.ai_org, start, end, item, Decimal(amount), BASE + timedelta(days=20))

        await cost(org_a, 2, 10)
        await db.execute(
            "INSERT INTO project_metrics (organization_id, project_id, hour, provider, request_count, "
            "estimated_cost_usd) VALUES ($1, $2, $3, 'openai', 1, 5)",
            org_a.id,
            p,
            BASE + timedelta(days=4, hours=10),
        )
        await db.execute(
            "UPDATE projects SET organization_id = $2, ai_organization_id = $3 WHERE id = $1",
            p,
            org_b.id,
            org_b.ai_org,
        )
        await cost(org_b, 2, 7)
        await cost(org_a, 7, 3)

        await migrate(empty_database_url)

        async def spend(fn: str, org: Any) -> Any:
            return await db.fetchval(
                f"SELECT spend FROM {fn}('project', $1, $2, NULL, '2026-11-01Z', '2026-12-01Z', 'USD')", org.id, p
            )

        for fn in ("cost_worker_spend", "cost_worker_spend_full"):
            assert (await spend(fn, org_a), await spend(fn, org_b)) == (18, 7), fn
        await cost(org_b, 2, 1, item="y")  # B's scope of p recomputed over the 3rd: A's stays
        for fn in ("cost_worker_spend", "cost_worker_spend_full"):
            assert (await spend(fn, org_a), await spend(fn, org_b)) == (18, 8), fn
        for org in (org_a.id, org_b.id):
            await assert_incremental_equals_rebuilt(db, org)
    finally:
        await db.close()


async def test_a_user_moved_to_another_organization_keeps_its_rollups_where_they_name(db: asyncpg.Connection) -> None:
    """User u of organization A has a user budget there (registered in the aggregate) and a 5 USD rollup of the 3rd;
    u moves to B (users.organization_id) and has a 3 USD rollup there on the 5th. Each rollup counts in the
    organization it names: A's user budget of u reads 5, B's 3, in the aggregate and the full computation alike,
    whether or not B's budget of u is registered. Before 0045 A's read 5 from the aggregate (B's rollup touched no
    registered subject of B: the trigger returned early) and 8 in full (u's rollups of every organization); B's read
    5 from the aggregate (u registered, by A: its rows of any organization) and 8 in full."""
    org_a = await make_org(db, project_ids=())
    org_b = await make_org(db, project_ids=())
    u = org_a.users[0]
    rollup = (
        "INSERT INTO user_metrics (organization_id, user_id, project_id, hour, provider, request_count, "
        "estimated_cost_usd) VALUES ($1, $2, NULL, $3, 'openai', 1, $4)"
    )
    await db.execute("SELECT cost_worker_spend_track('{user}', $1, '{NULL}', $2)", [org_a.id], [u])
    await db.execute(rollup, org_a.id, u, BASE + timedelta(days=2, hours=10), Decimal(5))
    await db.execute("UPDATE users SET organization_id = $2 WHERE id = $1", u, org_b.id)
    await db.execute(rollup, org_b.id, u, BASE + timedelta(days=4, hours=10), Decimal(3))

    async def spend() -> dict[tuple[str, str], Any]:
        return {
            (name, fn): await db.fetchval(
                f"SELECT spend FROM {fn}('user', $1, NULL, $2, '2026-11-01Z', '2026-12-01Z', 'USD')", org, u
            )
            for name, org in (("A", org_a.id), ("B", org_b.id))
            for fn in ("cost_worker_spend", "cost_worker_spend_full")
        }

    def wanted(a: int, b: int) -> dict[tuple[str, str], Any]:
        return {
            (n, fn): Decimal(v)
            for n, v in (("A", a), ("B", b))
            for fn in ("cost_worker_spend", "cost_worker_spend_full")
        }

    model = SpendModel(
        [],
        [
            Estimate(org_a.id, None, u, BASE + timedelta(days=2, hours=10), "openai", Decimal(5)),
            Estimate(org_b.id, None, u, BASE + timedelta(days=4, hours=10), "openai", Decimal(3)),
        ],
        {},
    )
    month = (BASE, BASE + timedelta(days=30))
    assert [model.spend("user", org, None, u, *month) for org in (org_a.id, org_b.id)] == [5, 3]
    assert await spend() == wanted(5, 3)
    # B's budget of u registered: its aggregate is B's rollups, and a later one of B's stays out of A's.
    await db.execute("SELECT cost_worker_spend_track('{user}', $1, '{NULL}', $2)", [org_b.id], [u])
    assert await spend() == wanted(5, 3)
    await db.execute(rollup, org_b.id, u, BASE + timedelta(days=5, hours=10), Decimal(2))
    assert await spend() == wanted(5, 5)
    for org in (org_a.id, org_b.id):
        await assert_incremental_equals_rebuilt(db, org)


@pytest.mark.parametrize("a_in_the_batch", [False, True], ids=["alone", "beside-an-event-of-A"])
async def test_a_moved_users_events_of_the_same_hour_count_in_the_organization_each_names(
    db: asyncpg.Connection, feeder: Feeder, a_in_the_batch: bool
) -> None:
    """Through the worker: user u of A spends 5 USD at 10:05 without a project, moves to B, and spends 3 USD at 10:40
    of the same hour in B (alone in its batch, or beside 1 USD of another user of A). Each organization's user rollup
    holds its own events (u: A 5, B 3), as its project rollup does, and so do A's and B's budgets of u, registered
    or not. Before 0046 user_metrics' key had no organization, and the worker's upsert of B's event reached A's row:
    alone, the batch's tenant scope (B) refused it (row-level security, a fatal error: the worker stopped, and would
    meet the same batch again on restart); beside an event of A, it added B's 3 USD to A's row (A 8, B nothing)."""
    org_a = await make_org(db, project_ids=(), users=2)
    org_b = await make_org(db, project_ids=())
    u, v = org_a.users
    await db.execute("SELECT cost_worker_spend_track('{user}', $1, '{NULL}', $2)", [org_a.id], [u])
    first = api_event(org_a, user=u, occurred_at="2026-11-21T10:05:00Z", cost="5")
    outcome = await feeder.events(first)
    assert outcome.messages[(feeder.settings.topic_api_usage, "inserted")] == 1
    await db.execute("UPDATE users SET organization_id = $2 WHERE id = $1", u, org_b.id)
    moved = [api_event(org_b, user=u, occurred_at="2026-11-21T10:40:00Z", cost="3")]
    if a_in_the_batch:
        moved.append(api_event(org_a, user=v, occurred_at="2026-11-21T10:40:00Z", cost="1"))
    outcome = await feeder.events(*moved)
    assert outcome.messages[(feeder.settings.topic_api_usage, "inserted")] == len(moved)

    names = {org_a.id: "A", org_b.id: "B"}
    users = await db.fetch("SELECT organization_id, estimated_cost_usd FROM user_metrics WHERE user_id = $1", u)
    projects = await db.fetch("SELECT organization_id, estimated_cost_usd FROM project_metrics")
    assert sorted((names[r[0]], r[1]) for r in users) == [("A", Decimal(5)), ("B", Decimal(3))]
    a_total = Decimal(6) if a_in_the_batch else Decimal(5)
    assert sorted((names[r[0]], r[1]) for r in projects) == [("A", a_total), ("B", Decimal(3))]
    model = SpendModel(
        [],
        [
            Estimate(org_a.id, None, u, HOUR_OF_MOVE, "openai", Decimal(5)),
            Estimate(org_b.id, None, u, HOUR_OF_MOVE, "openai", Decimal(3)),
        ],
        {},
    )

    async def spend(org: Any) -> list[Any]:
        return [
            await db.fetchval(
                f"SELECT spend FROM {fn}('user', $1, NULL, $2, '2026-11-01Z', '2026-12-01Z', 'USD')", org, u
            )
            for fn in ("cost_worker_spend", "cost_worker_spend_full")
        ]

    month = (BASE, BASE + timedelta(days=30))
    for org in (org_a.id, org_b.id):
        wanted = model.spend("user", org, None, u, *month)
        assert await spend(org) == [wanted, wanted], names[org]
    assert [model.spend("user", org, None, u, *month) for org in (org_a.id, org_b.id)] == [5, 3]
    await db.execute("SELECT cost_worker_spend_track('{user}', $1, '{NULL}', $2)", [org_b.id], [u])
    assert await spend(org_b.id) == [Decimal(3), Decimal(3)]
    for org in (org_a.id, org_b.id):
        await assert_incremental_equals_rebuilt(db, org)


async def test_the_migration_keeps_a_moved_users_scope_per_organization(
    empty_database_url: str, tmp_path: Path
) -> None:
    """A database before 0045: user u of A (its budget registered there, a 5 USD rollup) moves to B, where another
    user's budget is registered, and has a 3 USD rollup there, which 0019's trigger added under u's scope in B's
    aggregate. Before the migration A's budget of u read 8 from the aggregate and in full; after it, 5 and 5, B's
    budget of u 3 and 3; the migration queued B (not A) for a rebuild, after which B's aggregate equals one rebuilt
    from scratch (the stale row of u is gone)."""
    await migrate_before(empty_database_url, tmp_path, 45)
    db = await asyncpg.connect(empty_database_url)
    try:
        org_a = await make_org(db, project_ids=())
        org_b = await make_org(db, project_ids=())
        u, v = org_a.users[0], org_b.users[0]
        track = "SELECT cost_worker_spend_track('{user}', $1, '{NULL}', $2)"
        await db.execute(track, [org_a.id], [u])
        await db.execute(track, [org_b.id], [v])
        rollup = (
            "INSERT INTO user_metrics (organization_id, user_id, project_id, hour, provider, request_count, "
            "estimated_cost_usd) VALUES ($1, $2, NULL, $3, 'openai', 1, $4)"
        )
        await db.execute(rollup, org_a.id, u, BASE + timedelta(days=2, hours=10), Decimal(5))
        await db.execute("UPDATE users SET organization_id = $2 WHERE id = $1", u, org_b.id)
        await db.execute(rollup, org_b.id, u, BASE + timedelta(days=4, hours=10), Decimal(3))

        async def spend(org: Any) -> list[Any]:
            return [
                await db.fetchval(
                    f"SELECT spend FROM {fn}('user', $1, NULL, $2, '2026-11-01Z', '2026-12-01Z', 'USD')", org.id, u
                )
                for fn in ("cost_worker_spend", "cost_worker_spend_full")
            ]

        assert await spend(org_a) == [8, 8]
        await migrate(empty_database_url)
        assert (await spend(org_a), await spend(org_b)) == ([5, 5], [3, 3])
        queued = await db.fetch("SELECT organization_id, reason FROM spend_rebuilds")
        assert [(r["organization_id"], r["reason"][:14]) for r in queued] == [(org_b.id, "migration 0045")]
        stale = "SELECT count(*) FROM spend_hourly WHERE organization_id = $1 AND subject = $2"
        assert await db.fetchval(stale, org_b.id, u) == 1  # not read any more; the rebuild drops it
        await db.execute("SELECT cost_worker_spend_rebuild(ARRAY[$1::uuid])", org_b.id)
        await db.execute("DELETE FROM spend_rebuilds")
        assert await db.fetchval(stale, org_b.id, u) == 0
        assert (await spend(org_a), await spend(org_b)) == ([5, 5], [3, 3])
        for org in (org_a.id, org_b.id):
            await assert_incremental_equals_rebuilt(db, org)
    finally:
        await db.close()


async def test_the_migration_keys_user_rollups_by_organization_online(empty_database_url: str, tmp_path: Path) -> None:
    """A database before 0046 with a user's rollups, and the invalid index a failed concurrent build of the new key
    leaves behind: migrate drops it, builds the key again and swaps it in. The rows are kept as they were, and the
    worker's upsert of the same user, hour and project in another organization writes a row of its own."""
    await migrate_before(empty_database_url, tmp_path, 46)
    db = await asyncpg.connect(empty_database_url)
    try:
        org_a = await make_org(db, project_ids=())
        org_b = await make_org(db, project_ids=())
        u = org_a.users[0]
        hour = BASE + timedelta(days=2, hours=10)
        upsert = (
            "INSERT INTO user_metrics AS m (organization_id, user_id, project_id, hour, provider, request_count, "
            "estimated_cost_usd) VALUES ($1, $2, NULL, $3, 'openai', 1, $4) ON CONFLICT ({key}) DO UPDATE SET "
            "estimated_cost_usd = m.estimated_cost_usd + EXCLUDED.estimated_cost_usd"
        )
        await db.execute(upsert.format(key="user_id, hour, project_id, provider"), org_a.id, u, hour, Decimal(5))
        # What a failed CREATE INDEX CONCURRENTLY leaves: an index marked invalid.
        await db.execute("CREATE UNIQUE INDEX user_metrics_organization_key ON user_metrics (user_id)")
        await db.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'user_metrics_organization_key'::regclass"
        )
        await migrate(empty_database_url)
        columns = await db.fetchval(
            "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indexrelid = 'user_metrics_key'::regclass AND i.indisvalid AND i.indisunique"
        )
        assert columns == ["user_id", "hour", "project_id", "provider", "organization_id"]
        assert await db.fetchval("SELECT count(*) FROM pg_class WHERE relname = 'user_metrics_organization_key'") == 0
        key = "user_id, hour, project_id, provider, organization_id"
        await db.execute("UPDATE users SET organization_id = $2 WHERE id = $1", u, org_b.id)
        await db.execute(upsert.format(key=key), org_b.id, u, hour, Decimal(3))
        await db.execute(upsert.format(key=key), org_a.id, u, hour, Decimal(1))
        rows = await db.fetch("SELECT organization_id, estimated_cost_usd FROM user_metrics ORDER BY 2")
        assert [(r[0], r[1]) for r in rows] == [(org_b.id, Decimal(3)), (org_a.id, Decimal(6))]
        for org in (org_a.id, org_b.id):
            await assert_incremental_equals_rebuilt(db, org)
    finally:
        await db.close()


# ------------------------------------------------------------------------------------------------- users that move

# A user's rollup: user u (starts in A and moves) or w (always in B); in u's current organization or the one it left
# (a late rollup of an event of before the move); within project p of A or none.
user_rollup = st.fixed_dictionaries(
    {
        "op": st.just("rollup"),
        "user": st.sampled_from(["u", "u", "w"]),
        "where": st.sampled_from(["current", "current", "left"]),
        "project": st.sampled_from(["p", None]),
        "hour": st.sampled_from([0, 10, 23, 30]),
        "amount": st.sampled_from([Decimal(1), Decimal("2.5")]),
    }
)
user_move = st.just({"op": "move"})
# A user budget of (user, organization, project) evaluated: its scope registered in the aggregate (0016)
user_register = st.fixed_dictionaries(
    {
        "op": st.just("register"),
        "user": st.sampled_from(["u", "w"]),
        "org": st.sampled_from(["A", "B"]),
        "project": st.sampled_from(["p", None]),
    }
)
user_drop = st.fixed_dictionaries({"op": st.just("drop"), "index": st.integers(0, 20)})
user_plans = st.lists(
    st.one_of(user_rollup, user_rollup, user_rollup, user_move, user_register, user_drop), min_size=1, max_size=10
)


async def run_users(db: asyncpg.Connection, plan: list[dict[str, Any]]) -> None:
    org_a = await make_org(db, project_ids=("p",))
    org_b = await make_org(db, project_ids=())
    orgs = {"A": org_a.id, "B": org_b.id}
    p = org_a.projects["p"]
    users = {"u": org_a.users[0], "w": org_b.users[0]}
    owner = "A"  # u's organization
    # The rollups as user_metrics keys them (0046): (user, hour, project, organization) -> amount. The worker's
    # upsert (worker/sql/queries.sql) adds to the row of the key.
    rollups: dict[tuple[Any, ...], Any] = {}
    for number, step in enumerate(plan, 1):
        op = step["op"]
        if op == "rollup":
            if step["user"] == "w":
                where = "B"
            else:
                where = owner if step["where"] == "current" else ("B" if owner == "A" else "A")
            user, project, hour = users[step["user"]], {"p": p, None: None}[step["project"]], BASE + step["hour"] * H
            await db.execute(
                "INSERT INTO user_metrics AS m (organization_id, user_id, project_id, hour, provider, request_count, "
                "estimated_cost_usd) VALUES ($1, $2, $3, $4, 'openai', 1, $5) "
                "ON CONFLICT (user_id, hour, project_id, provider, organization_id) DO UPDATE SET "
                "request_count = m.request_count + 1, "
                "estimated_cost_usd = m.estimated_cost_usd + EXCLUDED.estimated_cost_usd",
                orgs[where],
                user,
                project,
                hour,
                step["amount"],
            )
            key = (user, hour, project, orgs[where])
            rollups[key] = rollups.get(key, 0) + step["amount"]
        elif op == "move":
            owner = "B" if owner == "A" else "A"
            await db.execute("UPDATE users SET organization_id = $2 WHERE id = $1", users["u"], orgs[owner])
        elif op == "register":
            await db.execute(
                "SELECT cost_worker_spend_track('{user}', $1, $2, $3)",
                [orgs[step["org"]]],
                [{"p": p, None: None}[step["project"]]],
                [users[step["user"]]],
            )
        elif op == "drop" and rollups:
            key = sorted(rollups, key=str)[step["index"] % len(rollups)]
            await db.execute(
                "DELETE FROM user_metrics WHERE user_id = $1 AND hour = $2 AND project_id IS NOT DISTINCT FROM $3 "
                "AND organization_id = $4",
                *key,
            )
            del rollups[key]
        model = SpendModel(
            [], [Estimate(o, pr, us, h, "openai", v) for (us, h, pr, o), v in rollups.items()], {p: ("openai", "x")}
        )
        for zone in ZONES if number == len(plan) else ZONES[:1]:
            for start, end in periods_overlapping("daily", zone, BASE, BASE + 31 * H):
                for org in orgs.values():
                    for user in users.values():
                        for project in (None, p):
                            args = ("user", org, project, user, start, end, "USD")
                            fast = await db.fetchval(
                                "SELECT spend FROM cost_worker_spend($1, $2, $3, $4, $5, $6, $7)", *args
                            )
                            full = await db.fetchval(
                                "SELECT spend FROM cost_worker_spend_full($1, $2, $3, $4, $5, $6, $7)", *args
                            )
                            wanted = model.spend("user", org, project, user, start, end)
                            where_ = (number, op, zone, start, org == orgs["A"], user == users["u"], project)
                            assert (fast, full) == (wanted, wanted), (*where_, fast, full, wanted)
    for org in orgs.values():
        await assert_incremental_equals_rebuilt(db, org)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plan=user_plans)
async def test_spend_of_a_user_moved_between_organizations_equals_the_model(
    plan: list[dict[str, Any]], db: asyncpg.Connection
) -> None:
    """A user's budgets in both organizations (the user's own scope and within a project), registered or not, while
    the user moves back and forth, rollups arrive in its current organization and late ones in the one it left, and
    rollups are deleted: after every step the aggregate equals the full computation, which equals the model (a
    user's scope is its rollups that name the organization, 0045); at the end the aggregate kept incrementally
    equals the aggregate rebuilt, in both organizations. Without 0045, 45 of 60 examples fail; with 0045's full
    computation alone (the aggregate's functions as before), 17 of 60."""
    await run_users(db, plan)
