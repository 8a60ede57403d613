"""The independent spend model on the audit's rows (issue 11): the "right" column, with no database."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tests.spend_model import Estimate, Ledger, Row, SpendModel

ORG = uuid.uuid4()
A, B = uuid.uuid4(), uuid.uuid4()
ACCOUNT = ("openai", "org-x")
DAY = datetime(2026, 11, 3, tzinfo=UTC)
H = timedelta(hours=1)


def row(
    project: uuid.UUID | None,
    report: str,
    start: datetime,
    end: datetime,
    amount: str | None,
    collected: datetime,
    item: str = "x",
    quantity: Decimal | None = None,
) -> Row:
    kind = "cost" if report == "openai.costs" else "usage"
    value = None if amount is None else Decimal(amount)
    return Row(ORG, project, *ACCOUNT, report, kind, start, end, item, value, collected, quantity=quantity)


def spend(
    rows: list[Row],
    estimates: Sequence[Estimate] = (),
    scope: str = "organization",
    project: uuid.UUID | None = None,
) -> Decimal:
    model = SpendModel(rows, list(estimates), {A: ACCOUNT, B: ACCOUNT})
    return model.spend(scope, ORG, project, None, DAY, DAY + 24 * H)


def hourly_estimates(project: uuid.UUID, provider: str | None = "openai") -> list[Estimate]:
    return [Estimate(ORG, project, None, DAY + h * H, provider, Decimal(1)) for h in range(24)]


def test_row1_daily_costs_replace_hourly_usage() -> None:
    usage = [
        row(A, "openai.usage.completions", DAY + h * H, DAY + (h + 1) * H, "4", DAY + 26 * H, quantity=Decimal(1))
        for h in range(24)
    ]
    cost = row(A, "openai.costs", DAY, DAY + 24 * H, "100", DAY + 27 * H)
    assert spend([*usage, cost]) == 100


def test_row2_ungrouped_costs_replace_the_projects_usage() -> None:
    rows = [
        row(A, "openai.usage.completions", DAY, DAY + 24 * H, "30", DAY + 26 * H, quantity=Decimal(1)),
        row(B, "openai.usage.completions", DAY, DAY + 24 * H, "20", DAY + 26 * H, quantity=Decimal(1)),
        row(None, "openai.costs", DAY, DAY + 24 * H, "50", DAY + 27 * H),
    ]
    assert spend(rows) == 50
    assert spend(rows, scope="project", project=A) == 30


def test_row3_a_new_snapshot_retires_what_it_no_longer_has() -> None:
    ledger = Ledger()
    window = ("openai", "org-x", "openai.costs", DAY, DAY + 24 * H)
    ledger.apply([window], [row(A, "openai.costs", DAY, DAY + 24 * H, "30", DAY + 25 * H, item="GPT-4o")], DAY + 25 * H)
    ledger.apply([window], [row(B, "openai.costs", DAY, DAY + 24 * H, "30", DAY + 29 * H, item="all")], DAY + 29 * H)
    assert spend(ledger.current()) == 30
    changed = ledger.apply([window], [row(A, "openai.costs", DAY, DAY + 24 * H, "30", DAY + 25 * H)], DAY + 25 * H)
    assert changed == []  # an older revision changes nothing


def test_row4_an_open_bucket_covers_the_hours_before_its_collection() -> None:
    cost = row(A, "openai.costs", DAY, DAY + 24 * H, "6", DAY + 6 * H)
    assert spend([cost], hourly_estimates(A)) == 24


def test_row5_unpriced_usage_covers_nothing() -> None:
    usage = row(A, "openai.usage.completions", DAY, DAY + 24 * H, None, DAY + 26 * H, quantity=Decimal(1000))
    assert spend([usage], hourly_estimates(A)) == 24


def test_row10_estimates_are_replaced_by_their_provider_only() -> None:
    cost = row(A, "openai.costs", DAY, DAY + 24 * H, "6", DAY + 26 * H)
    estimates = [*hourly_estimates(A), *hourly_estimates(A, "google"), *hourly_estimates(A, None)]
    assert spend([cost], estimates) == 6 + 24 + 24
