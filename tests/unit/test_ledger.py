"""The ledger reduction without servers: attribution, in-message sums, snapshot revisions within a batch."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from worker.attribution import Attribution
from worker.decode import ProviderMessage
from worker.ledger import reduce_ledger, sum_lines
from worker.outcome import Result
from worker.pricing import PriceBook
from worker.providers import LedgerLine
from worker.quarantine import Reason, Source
from worker.rows import ProjectLink, WindowKey

ORG, OTHER = uuid.uuid4(), uuid.uuid4()
PROJECT, OTHER_PROJECT = uuid.uuid4(), uuid.uuid4()
START = datetime(2026, 11, 1, tzinfo=UTC)
END = START + timedelta(days=1)
REPORT = "openai.costs"
ATTRIBUTION = Attribution(
    [
        ProjectLink(ORG, PROJECT, "openai", "org-a", "proj_a", None),
        ProjectLink(OTHER, OTHER_PROJECT, "openai", "org-o", "proj_o", None),
    ]
)
NO_PRICES = PriceBook([], catalogue=False)


def line(item: str, amount: str, *, project: str | None = "proj_a", currency: str = "USD") -> LedgerLine:
    return LedgerLine(
        "openai", "org-a", project, "costs_v1", START, END, item, currency, Decimal(amount), None, None, report=REPORT
    )


def message(offset: int, collected: int, *lines: LedgerLine) -> ProviderMessage:
    return ProviderMessage(
        Source("buckets", 0, offset),
        b"{}",
        "openai",
        "org-a",
        "costs_v1",
        START + timedelta(days=2, hours=collected),
        list(lines),
        [(REPORT, START, END)],
    )


def test_lines_of_one_key_are_summed_into_a_new_line() -> None:
    first, second = line("gpt-4o", "1.5"), line("gpt-4o", "2.25")
    ledger = reduce_ledger([message(0, 0, first, second, line("o3", "7"))], ATTRIBUTION, NO_PRICES)
    assert [(r.key.line_item, r.line.amount, r.line.metadata) for r in ledger.rows] == [
        ("gpt-4o", Decimal("3.75"), {"results": 2}),
        ("o3", Decimal("7"), {}),
    ]
    assert (first.amount, first.metadata) == (Decimal("1.5"), {})  # the decoded lines are left as they were
    assert ledger.rows[0].key.organization_id == ORG
    assert ledger.rows[0].key.project_id == PROJECT
    assert ledger.quarantined == []
    assert ledger.owners == {WindowKey("openai", "org-a", REPORT, START, END): {ORG}}


def test_two_currencies_for_one_key_quarantine_the_message_whole() -> None:
    ledger = reduce_ledger(
        [message(0, 0, line("o3", "1"), line("gpt-4o", "1"), line("gpt-4o", "1", currency="EUR"))],
        ATTRIBUTION,
        NO_PRICES,
    )
    assert ledger.rows == []
    assert [(q.reason, q.detail) for q in ledger.quarantined] == [
        (Reason.INCONSISTENT_DATA, "line item 'gpt-4o' is reported in two currencies")
    ]
    # Like a message quarantined at decode, it is no revision of its window: the stored lines stay the truth
    assert (ledger.windows, ledger.messages, ledger.owners) == ({}, {}, {})


def test_a_message_quarantined_whole_neither_replaces_nor_makes_stale() -> None:
    stored = message(0, 0, line("gpt-4o", "1"))
    broken = message(1, 5, line("gpt-4o", "2"), line("gpt-4o", "2", currency="EUR"))
    ledger = reduce_ledger([stored, broken], ATTRIBUTION, NO_PRICES)
    assert [(r.line.amount, r.message) for r in ledger.rows] == [(Decimal("1"), 0)]
    assert ledger.windows == {WindowKey("openai", "org-a", REPORT, START, END): stored.collected_at}
    assert ledger.best == {}
    assert [q.source.offset for q in ledger.quarantined] == [1]


def test_an_unattributed_line_quarantines_its_message_and_the_others_are_kept() -> None:
    ledger = reduce_ledger(
        [message(0, 0, line("gpt-4o", "1"), line("o3", "1", project="proj_zz"))], ATTRIBUTION, NO_PRICES
    )
    assert [r.key.line_item for r in ledger.rows] == ["gpt-4o"]
    assert [q.reason for q in ledger.quarantined] == [Reason.UNATTRIBUTED]


def test_the_newest_revision_of_a_window_in_the_batch_wins() -> None:
    old = message(0, 0, line("gpt-4o", "1"), line("o3", "1"))
    new = message(1, 5, line("gpt-4o", "2"))
    copy = message(2, 5, line("gpt-4o", "2"))
    ledger = reduce_ledger([old, new, copy], ATTRIBUTION, NO_PRICES)
    assert [(r.line.amount, r.message) for r in ledger.rows] == [(Decimal("2"), 1)]
    assert ledger.lines == {("costs_v1", Result.STALE): 2, ("costs_v1", Result.UNCHANGED): 1}
    assert ledger.best == {0: Result.STALE, 2: Result.UNCHANGED}
    window = WindowKey("openai", "org-a", REPORT, START, END)
    assert ledger.windows == {window: new.collected_at}
    assert ledger.messages == {window: [0, 1, 2]}
    [revision] = ledger.revisions()
    assert (revision.window, revision.collected_at, revision.organization_ids) == (
        window,
        new.collected_at,
        frozenset({ORG}),
    )


def test_rows_come_in_one_order_whatever_the_messages_order() -> None:
    lines = [line(f"item-{n}", "1") for n in range(5)] + [line("org-level", "1", project=None)]
    forward = reduce_ledger([message(0, 0, *lines)], ATTRIBUTION, NO_PRICES)
    backward = reduce_ledger([message(0, 0, *reversed(lines))], ATTRIBUTION, NO_PRICES)
    assert [r.key for r in forward.rows] == [r.key for r in backward.rows]
    assert forward.rows[0].key.project_id is None  # organization-level rows first


def test_sum_lines_is_exact_beyond_the_default_context() -> None:
    a = line("x", "123456789012.1234567890123456789012345678901234")
    total = sum_lines(a, replace(a, amount=Decimal("0.0000000000000000000000000000000000000001")))
    assert total is not None
    assert total.amount == Decimal("123456789012.1234567890123456789012345678901234000001")
    assert sum_lines(a, replace(a, currency="EUR")) is None


def test_reducing_a_batch_again_gives_the_same_rows() -> None:
    """A batch is reduced again when its transaction is retried: the reduction must not have changed it."""
    messages = [message(0, 0, line("gpt-4o", "1.5"), line("gpt-4o", "2.25"), line("o3", "7"))]
    first = reduce_ledger(messages, ATTRIBUTION, NO_PRICES)
    again = reduce_ledger(messages, ATTRIBUTION, NO_PRICES)
    assert [(r.key, r.line) for r in again.rows] == [(r.key, r.line) for r in first.rows]
    assert again.rows[0].line.amount == Decimal("3.75")
