"""The independent spend model on the audit's rows (issue 11): the "right" column, with no database."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
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


def test_an_unpriced_line_keeps_the_estimate_of_its_hours_and_the_usage_beside_it_counts_nothing() -> None:
    """README rule 2 (migration 0031): gpt-4o calls of 3 + 6 at 10:00, a priced (3) and an unpriced line."""
    estimates = [Estimate(ORG, A, None, DAY + 10 * H, "openai", Decimal(n)) for n in (3, 6)]
    ten = (DAY + 10 * H, DAY + 11 * H)
    priced = row(A, "openai.usage.completions", *ten, "3", DAY + 12 * H, item="m1", quantity=Decimal(3))
    unpriced = row(A, "openai.usage.completions", *ten, None, DAY + 12 * H, item="mx", quantity=Decimal(6))
    assert spend([priced], estimates) == 3
    assert spend([priced, unpriced], estimates) == 9
    assert spend([priced, unpriced], estimates, scope="project", project=A) == 9
    # An unpriced line of zero quantity reports nothing: the priced line counts.
    nothing = row(A, "openai.usage.completions", *ten, None, DAY + 12 * H, item="mz", quantity=Decimal(0))
    assert spend([priced, nothing], estimates) == 3
    # Another report of the account, a daily line overlapping the hour: it stops counting for the whole day.
    daily = row(A, "openai.usage.embeddings", DAY, DAY + 24 * H, "5", DAY + 26 * H, item="e1", quantity=Decimal(5))
    assert spend([daily], estimates) == 5
    assert spend([daily, unpriced], estimates) == 9
    # An ungrouped unpriced line: in the organization scope it reaches every project's usage, not in A's own.
    ungrouped = row(None, "openai.usage.completions", *ten, None, DAY + 12 * H, item="mx", quantity=Decimal(6))
    assert spend([priced, ungrouped], estimates) == 9
    assert spend([priced, ungrouped], estimates, scope="project", project=A) == 3
    # A cost row of the hour beats both, as before.
    cost = row(A, "openai.costs", DAY, DAY + 24 * H, "8", DAY + 26 * H)
    assert spend([priced, unpriced, cost], estimates) == 8


def test_priority_tier_usage_counts_beside_a_cost_row_also_next_to_an_unpriced_line() -> None:
    """Usage the cost report leaves out counts beside the cost row as before; without a cost row of the hour an
    unpriced line of it stops it counting too (the estimate holds its calls)."""
    estimates = [Estimate(ORG, A, None, DAY + 10 * H, "openai", Decimal(9))]
    ten = (DAY + 10 * H, DAY + 11 * H)
    priority = replace(
        row(A, "openai.usage.completions", *ten, "2", DAY + 12 * H, item="p", quantity=Decimal(2)),
        outside_cost_report=True,
    )
    unpriced = row(A, "openai.usage.completions", *ten, None, DAY + 12 * H, item="mx", quantity=Decimal(6))
    cost = row(A, "openai.costs", DAY, DAY + 24 * H, "8", DAY + 26 * H)
    assert spend([priority, cost], estimates) == 10
    assert spend([priority, unpriced, cost], estimates) == 10
    assert spend([priority, unpriced], estimates) == 9


def test_sums_are_exact_beyond_28_digits() -> None:
    """Money is exact end to end: two cost lines of 30 decimal places (a JSON number as OpenAI may send it) sum to
    every digit, as NUMERIC does, not to the 28 significant digits of Python's default context (the end-to-end test
    found the model 4.31e-28 USD short: 6.504219775004514509089898113 for 6.504219775004514509089898113231)."""
    a = row(A, "openai.costs", DAY, DAY + 24 * H, "1.123456789012345678901234567891", DAY + 26 * H, item="a")
    b = row(B, "openai.costs", DAY, DAY + 24 * H, "2.000000000000000000000000000002", DAY + 26 * H, item="b")
    estimates = [Estimate(ORG, None, None, DAY, None, Decimal("0.000000000000000000000000000001"))]
    assert spend([a, b], estimates) == Decimal("3.123456789012345678901234567894")
    model = SpendModel([a, b], estimates, {A: ACCOUNT, B: ACCOUNT})
    rows = model.spend_rows("organization", ORG, None, None, DAY, DAY + 24 * H)
    assert sorted(amount for _, _, amount in rows)[0] == Decimal("1e-30")
