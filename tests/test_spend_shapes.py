"""Spend on window shapes the pipeline's property tests rarely or never produce, written straight into the ledger and
the rollups (the triggers keep the aggregate): minute buckets (10:05, 10:20, 18:40: after Asia/Kolkata's midnight),
hourly and daily windows not on the hour, windows of three and five days, open buckets, EUR and GBP lines, Anthropic's
Priority Tier, unpriced and zero-quantity usage, lines retired, revived and deleted, rollups added to and deleted, a
project moved to another provider account, OpenAI lines of a second account beside the organization's (coverage is
per account), a project deleted (its rows cascade; its user's rollups stay). Every UTC date has another exchange
rate, so the date a row converts at (its window start's) is checked: windows of 22:00-02:00, 23:30-00:30 and noon to
noon have their midpoint on the next date; direct, inverse and cross-through-EUR rates all occur. After every step,
for daily (UTC, Asia/Kolkata, America/Los_Angeles), monthly (UTC) and weekly (Pacific/Chatham) periods,
organization and project scopes, and (UTC and Asia/Kolkata) the user's and the user's within the deletable project,
USD and EUR: the aggregate (``cost_worker_spend``) equals the full computation (``cost_worker_spend_full``), which
equals the independent model (``tests/spend_model.py`` rows converted by ``tests/currency_model.py``).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import currency_model
from tests.factories import make_org
from tests.spend_model import Estimate, Row, SpendModel, periods_overlapping

BASE = datetime(2026, 11, 1, tzinfo=UTC)
H = timedelta(hours=1)
M = timedelta(minutes=1)

windows = st.sampled_from(
    [
        (timedelta(0), 24 * H),  # day 0
        (24 * H, 48 * H),  # day 1
        (10 * H, 11 * H),
        (10 * H + 5 * M, 10 * H + 6 * M),
        (10 * H + 30 * M, 11 * H + 30 * M),
        (23 * H, 24 * H),
        (23 * H + 59 * M, 24 * H),
        (20 * H, 44 * H),  # a day not on midnight
        (timedelta(0), 72 * H),  # three days
        (-48 * H, 72 * H),
        (30 * H, 31 * H),
        (18 * H + 40 * M, 18 * H + 41 * M),
        (10 * H + 20 * M, 10 * H + 21 * M),
        # windows whose midpoint lies on the UTC date after their start's: converted at the start's rate
        (22 * H, 26 * H),
        (23 * H + 30 * M, 24 * H + 30 * M),
        (12 * H, 36 * H),
    ]
)

line = st.fixed_dictionaries(
    {
        "op": st.just("line"),
        "kind": st.sampled_from(["costs_v1", "usage_v1", "usage_v1"]),
        "project": st.sampled_from(["a", "b", None]),
        "window": windows,
        "item": st.sampled_from(["x", "y"]),
        "amount": st.sampled_from([None, Decimal(0), Decimal(3), Decimal("7.5"), Decimal(11)]),
        "quantity": st.sampled_from([None, Decimal(0), Decimal(5)]),
        "collected": st.sampled_from([H, 6 * H, 30 * H, 100 * H]),
        "currency": st.sampled_from(["USD", "USD", "EUR", "GBP"]),
        "provider": st.sampled_from(["openai", "openai", "anthropic"]),
        # OpenAI lines of the organization's account, or of another OpenAI account (a project mapped there by
        # ``remap``, or moved back): coverage is per provider *account*, not per provider (README rule 2)
        "other_account": st.sampled_from([False, False, True]),
        "outside": st.sampled_from([False, False, True]),
    }
)
estimate = st.fixed_dictionaries(
    {
        "op": st.just("estimate"),
        "project": st.sampled_from(["a", "b", None]),
        "hour": st.sampled_from([-1, 0, 3, 10, 11, 18, 20, 23, 24, 30, 43, 47, 60]),
        "provider": st.sampled_from(["openai", "openai", "anthropic", None]),
        "amount": st.sampled_from([Decimal(1), Decimal(2), Decimal("0.5")]),
    }
)
retire = st.fixed_dictionaries({"op": st.just("retire"), "index": st.integers(0, 30)})
delete = st.fixed_dictionaries({"op": st.just("delete"), "index": st.integers(0, 30)})
drop_estimate = st.fixed_dictionaries({"op": st.just("drop_estimate"), "index": st.integers(0, 30)})
remap = st.fixed_dictionaries({"op": st.just("remap"), "project": st.sampled_from(["a", "b"])})
# Project b deleted (an administrator's clean-up): its ledger lines and rollups cascade out of the organization's and
# the project's figures, its user's rollups stay in the user's (README rule 4); later steps naming b are skipped.
delete_project = st.just({"op": "delete_project"})
plans = st.lists(
    st.one_of(line, line, line, estimate, estimate, retire, delete, drop_estimate, remap, delete_project), max_size=14
)

# A different rate on every UTC date the rows' windows start on (a row converts at its window start's date, an
# estimate at its hour's: a window of 20:00-20:00 or of three days has its midpoint on another date), EUR -> USD
# and EUR -> GBP: USD budgets take EUR rows by the direct rate and GBP rows by the cross rate through EUR, EUR
# budgets take USD and GBP rows by the inverse rate. A GBP row converted by the cross rate is truncated at 20 places.
RATES: dict[tuple[str, str, date], Decimal] = {
    (base, quote, date(2026, 10, 27) + timedelta(days=n)): Decimal(rate) + Decimal(n) * Decimal("0.0173")
    for n in range(9)
    for base, quote, rate in (("EUR", "USD", "1.0837"), ("EUR", "GBP", "0.8691"))
}

# The user's scopes are the user's estimates by their hour: two zones (one not on the UTC hour) are enough for them.
USER_ZONES = ("UTC", "Asia/Kolkata")

BUDGETS = [
    ("daily", "UTC"),
    ("daily", "Asia/Kolkata"),
    ("daily", "America/Los_Angeles"),
    ("monthly", "UTC"),
    ("weekly", "Pacific/Chatham"),
]


async def run(
    db: asyncpg.Connection,
    plan: list[dict[str, Any]],
    budgets: list[tuple[str, str]] = BUDGETS,
    currencies: tuple[str, ...] = ("USD", "EUR"),
    every_step: bool = True,
) -> None:
    org = await make_org(db, project_ids=("a", "b"))
    projects = {"a": org.projects["a"], "b": org.projects["b"], None: None}
    await db.execute("DELETE FROM exchange_rates")
    await db.executemany(
        "INSERT INTO exchange_rates (base, quote, effective_date, rate, source) VALUES ($1, $2, $3, $4, 't')",
        [(b, q, d, r) for (b, q, d), r in RATES.items()],
    )
    lines: list[tuple[Any, ...]] = []
    estimates: list[tuple[Any, ...]] = []
    mlines: dict[tuple[Any, ...], Row] = {}
    mest: dict[tuple[Any, ...], Decimal] = {}
    accounts: dict[uuid.UUID, tuple[str, str]] = {
        org.projects["a"]: ("openai", org.ai_org),
        org.projects["b"]: ("openai", org.ai_org),
    }
    rates = RATES
    user = org.users[0]
    # The user's scope, and the user's within b, kept in the aggregate (what a user budget's evaluation registers)
    await db.execute(
        "SELECT cost_worker_spend_track('{user,user}', $1, $2, $3)",
        [org.id, org.id],
        [None, projects["b"]],
        [user, user],
    )
    muser: dict[tuple[Any, ...], Decimal] = {}  # the user's rollups: (project, hour, provider) -> USD
    deleted = False
    for number, step in enumerate(plan, 1):
        op = step["op"]
        if deleted and (step.get("project") == "b" or op == "delete_project"):
            continue
        if op == "line":
            s, e = step["window"]
            if step["provider"] == "openai":
                account = "other-" + org.ai_org if step["other_account"] else org.ai_org
            else:
                account = "anth"
            key = (projects[step["project"]], BASE + s, BASE + e, step["item"], step["kind"], step["provider"], account)
            await db.execute(
                "INSERT INTO cost_data (organization_id, project_id, provider, ai_organization_id, api_version, "
                "bucket_start_time, bucket_end_time, line_item, currency, amount, quantity, collected_at, "
                "outside_cost_report) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) "
                "ON CONFLICT (project_id, bucket_start_time, bucket_end_time, line_item, report, organization_id, "
                "provider, ai_organization_id) DO UPDATE SET amount = EXCLUDED.amount, quantity = EXCLUDED.quantity, "
                "currency = EXCLUDED.currency, collected_at = EXCLUDED.collected_at, superseded_at = NULL, "
                "outside_cost_report = EXCLUDED.outside_cost_report",
                org.id,
                key[0],
                step["provider"],
                account,
                step["kind"],
                key[1],
                key[2],
                step["item"],
                step["currency"],
                step["amount"] if step["kind"] == "usage_v1" else (step["amount"] or Decimal(2)),
                step["quantity"] if step["kind"] == "usage_v1" else None,
                BASE + s + step["collected"],
                step["outside"] and step["kind"] == "usage_v1",
            )
            lines.append(key)
            kind = "cost" if step["kind"] == "costs_v1" else "usage"
            mlines[key] = Row(
                org.id,
                key[0],
                step["provider"],
                account,
                "r",
                kind,
                key[1],
                key[2],
                step["item"],
                step["amount"] if step["kind"] == "usage_v1" else (step["amount"] or Decimal(2)),
                BASE + s + step["collected"],
                step["currency"],
                step["quantity"] if step["kind"] == "usage_v1" else None,
                step["outside"] and step["kind"] == "usage_v1",
            )
        elif op == "estimate":
            hour = BASE + step["hour"] * H
            await db.execute(
                "INSERT INTO project_metrics AS m (organization_id, project_id, hour, provider, request_count, "
                "estimated_cost_usd) VALUES ($1, $2, $3, $4, 1, $5) "
                "ON CONFLICT (organization_id, project_id, hour, provider) DO UPDATE SET "
                "estimated_cost_usd = m.estimated_cost_usd + EXCLUDED.estimated_cost_usd",
                org.id,
                projects[step["project"]],
                hour,
                step["provider"],
                step["amount"],
            )
            await db.execute(
                "INSERT INTO user_metrics AS m (organization_id, user_id, project_id, hour, provider, request_count, "
                "estimated_cost_usd) VALUES ($1, $2, $3, $4, $5, 1, $6) "
                "ON CONFLICT (user_id, hour, project_id, provider, organization_id) DO UPDATE SET "
                "estimated_cost_usd = m.estimated_cost_usd + EXCLUDED.estimated_cost_usd",
                org.id,
                user,
                projects[step["project"]],
                hour,
                step["provider"],
                step["amount"],
            )
            uk = (projects[step["project"]], hour, step["provider"])
            muser[uk] = muser.get(uk, Decimal(0)) + step["amount"]
            estimates.append((projects[step["project"]], hour, step["provider"]))
            mk = (projects[step["project"]], hour, step["provider"])
            mest[mk] = mest.get(mk, Decimal(0)) + step["amount"]
        elif op in ("retire", "delete") and lines:
            p, s, e, item, kind, provider, account = lines[step["index"] % len(lines)]
            sql = "UPDATE cost_data SET superseded_at = now()" if op == "retire" else "DELETE FROM cost_data"
            await db.execute(
                sql + " WHERE organization_id = $1 AND project_id IS NOT DISTINCT FROM $2 AND bucket_start_time = $3 "
                "AND bucket_end_time = $4 AND line_item = $5 AND api_version = $6 AND provider = $7 "
                "AND ai_organization_id = $8",
                org.id,
                p,
                s,
                e,
                item,
                kind,
                provider,
                account,
            )
            mlines.pop((p, s, e, item, kind, provider, account), None)
        elif op == "drop_estimate" and estimates:
            p, hour, provider = estimates[step["index"] % len(estimates)]
            await db.execute(
                "DELETE FROM project_metrics WHERE organization_id = $1 AND project_id IS NOT DISTINCT FROM $2 "
                "AND hour = $3 AND provider IS NOT DISTINCT FROM $4",
                org.id,
                p,
                hour,
                provider,
            )
            mest.pop((p, hour, provider), None)
        elif op == "remap":
            await db.execute(
                "UPDATE projects SET ai_organization_id = "
                "CASE WHEN ai_organization_id = $2 THEN 'other-' || $2 ELSE $2 END WHERE id = $1",
                projects[step["project"]],
                org.ai_org,
            )
            pid = org.projects[step["project"]]
            accounts[pid] = ("openai", "other-" + org.ai_org if accounts[pid][1] == org.ai_org else org.ai_org)
        elif op == "delete_project":
            await db.execute("DELETE FROM projects WHERE id = $1", projects["b"])
            deleted = True
            mlines = {k: r for k, r in mlines.items() if r.project_id != projects["b"]}
            mest = {k: v for k, v in mest.items() if k[0] != projects["b"]}
        if not every_step and number < len(plan):
            continue
        model = SpendModel(
            [r for r in mlines.values() if r.amount is not None or r.kind == "usage"],
            [Estimate(org.id, k[0], None, k[1], k[2], v) for k, v in mest.items()],
            accounts,
        )
        users = SpendModel([], [Estimate(org.id, k[0], user, k[1], k[2], v) for k, v in muser.items()], accounts)
        for kind, zone in budgets:
            for start, end in periods_overlapping(kind, zone, BASE - 3 * 24 * H, BASE + 4 * 24 * H):
                for scope, project in (
                    ("organization", None),
                    ("project", projects["a"]),
                    ("project", projects["b"]),
                    *((("user", None), ("user", projects["b"])) if zone in USER_ZONES else ()),
                ):
                    for currency in currencies:
                        who = user if scope == "user" else None
                        args = (scope, org.id, project, who, start, end, currency)
                        q = "SELECT spend, foreign_rows, missing_rates FROM {}($1, $2, $3, $4, $5, $6, $7)"
                        fast = await db.fetchrow(q.format("cost_worker_spend"), *args)
                        full = await db.fetchrow(q.format("cost_worker_spend_full"), *args)
                        assert fast is not None
                        assert full is not None
                        where = (op, kind, zone, scope, start, currency)
                        assert fast["spend"] == full["spend"], (*where, fast["spend"], full["spend"])
                        assert json.loads(fast["foreign_rows"]) == json.loads(full["foreign_rows"]), where
                        rows = [
                            currency_model.Row(c, at, amount)
                            for c, at, amount in (users if scope == "user" else model).spend_rows(
                                scope, org.id, project, who, start, end
                            )
                        ]
                        wanted = currency_model.spend(rows, currency, rates)
                        assert full["spend"] == wanted, (*where, full["spend"], wanted)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plan=plans)
async def test_spend_of_unusual_window_shapes_equals_the_model_and_the_aggregate(
    plan: list[dict[str, Any]], db: asyncpg.Connection
) -> None:
    await run(db, plan)


# Coverage is decided per provider *account*, not per provider (README rule 2): OpenAI lines of the organization's
# account and of another one, all within one day and overlapping one another's hours often (costs, priced, unpriced
# and zero-token usage, open buckets), estimates of both projects and of none, projects remapped between the two
# accounts, project b deleted (the user's rollups stay in the user's scopes). The random plans above rarely put lines
# of two accounts of one provider side by side, or a user's rollups of b before b's deletion; these often do.
account_line = st.fixed_dictionaries(
    {
        "op": st.just("line"),
        "kind": st.sampled_from(["costs_v1", "usage_v1", "usage_v1"]),
        "project": st.sampled_from(["a", "b", None]),
        "window": st.sampled_from(
            [
                (timedelta(0), 24 * H),
                (9 * H, 12 * H),
                (10 * H, 11 * H),
                (10 * H + 5 * M, 10 * H + 6 * M),
                (10 * H + 30 * M, 11 * H + 30 * M),
            ]
        ),
        "item": st.sampled_from(["x", "y"]),
        "amount": st.sampled_from([None, Decimal(3), Decimal("7.5")]),
        "quantity": st.sampled_from([Decimal(5), Decimal(5), Decimal(5), Decimal(0)]),
        "collected": st.sampled_from([H, 30 * H]),
        "currency": st.just("USD"),
        "provider": st.just("openai"),
        "other_account": st.booleans(),
        "outside": st.just(False),
    }
)
account_estimate = st.fixed_dictionaries(
    {
        "op": st.just("estimate"),
        "project": st.sampled_from(["a", "b", None]),
        "hour": st.sampled_from([0, 9, 10, 11, 20]),
        "provider": st.just("openai"),
        "amount": st.sampled_from([Decimal(1), Decimal(2)]),
    }
)


@st.composite
def account_plans(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Random lines, estimates and remaps, and always a priced usage line and, last, a cost line or an unpriced
    usage line of the other account or of its own, of its project or of none (a line of its own account decides it).
    Their windows are chosen so that the later line often decides the usage line in an hour beyond its own window
    (a 10:30-11:30 cost line covers the hour 11:00 of an 11:40-12:40 line; an unpriced 10:05 line marks the hour
    10:00 of a 10:30-11:30 line), where the usage line's midpoint lies outside the later line's hours."""
    plan: list[dict[str, Any]] = draw(
        st.lists(
            st.one_of(account_line, account_line, account_estimate, account_estimate, remap, delete_project), max_size=8
        )
    )
    usage = draw(account_line) | {
        "kind": "usage_v1",
        "amount": draw(st.sampled_from([Decimal(3), Decimal("7.5")])),
        "window": draw(st.sampled_from([(10 * H + 30 * M, 11 * H + 30 * M), (11 * H + 40 * M, 12 * H + 40 * M)])),
    }
    kind, amount = draw(st.sampled_from([("costs_v1", Decimal(3)), ("usage_v1", None)]))
    beside = draw(account_line) | {
        "kind": kind,
        "amount": amount,
        "quantity": Decimal(5),
        "project": draw(st.sampled_from([usage["project"], None])),
        "window": draw(
            st.sampled_from(
                [
                    (10 * H + 5 * M, 10 * H + 6 * M),
                    (10 * H, 11 * H),
                    (10 * H + 30 * M, 11 * H + 30 * M),
                    (timedelta(0), 24 * H),
                ]
            )
        ),
        "other_account": usage["other_account"] != draw(st.booleans()),
    }
    plan.insert(draw(st.integers(0, len(plan))), usage)
    return [*plan, beside]  # last: a remap or a deletion after it rebuilds the organization's aggregate


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(plan=account_plans())
async def test_lines_of_two_accounts_of_one_provider_equal_the_model(
    plan: list[dict[str, Any]], db: asyncpg.Connection
) -> None:
    await run(db, plan, budgets=[("daily", "UTC")], currencies=("USD",), every_step=False)


async def test_a_deleted_project_whose_cost_line_covered_its_estimate_leaves_the_aggregate_equal(
    db: asyncpg.Connection,
) -> None:
    """Found by the property above: project b's 2 USD cost line covers its 1 USD estimate; deleting b left the
    organization's aggregate at 4 where the full computation (and the model) said 5 (migration 0036)."""

    def cost(project: str) -> dict[str, Any]:
        return {
            "op": "line",
            "kind": "costs_v1",
            "project": project,
            "window": (timedelta(0), timedelta(days=1)),
            "item": "x",
            "amount": None,
            "quantity": Decimal(5),
            "collected": timedelta(hours=1),
            "currency": "USD",
            "provider": "openai",
            "other_account": False,
            "outside": False,
        }

    usage = {**cost("a"), "kind": "usage_v1", "window": (timedelta(hours=10.5), timedelta(hours=11.5))}
    usage["amount"] = Decimal(3)
    estimates = [{"op": "estimate", "project": p, "hour": 0, "provider": "openai", "amount": Decimal(1)} for p in "aab"]
    plan = [usage, *estimates, cost("a"), cost("b"), {"op": "delete_project"}]
    await run(db, plan, budgets=[("daily", "UTC")], currencies=("USD",))
