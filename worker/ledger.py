"""The ledger reduction: a batch's provider messages -> the ``cost_data`` rows to write. Pure.

Every line is attributed (``worker.attribution``) and priced (``worker.pricing``); lines that share a key within a
message are summed; then, per window of a report, only the lines of the batch's newest revision of it are kept
(a bucket is a snapshot: older revisions in the batch are stale as a whole). What the database then decides per
row (inserted, updated, unchanged, stale) is ``worker.ledger_write``'s.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal, localcontext
from uuid import UUID

from worker.attribution import Attribution, Unattributed
from worker.decode import ProviderMessage
from worker.limits import EXACT, MAX_DETAIL
from worker.models import MAX_AMOUNT
from worker.outcome import BestResults, Result
from worker.pricing import PriceBook
from worker.providers import LedgerLine
from worker.quarantine import Quarantined, Reason
from worker.rows import LedgerKey, LedgerRow, ProjectLink, WindowKey, WindowRevision

MAX_PROBLEMS = 5  # distinct attribution problems named in a quarantined message's detail


@dataclass
class Ledger:
    """A batch's provider data: rows at the batch's newest revision of their window, the windows, and what the
    reduction already knows of each line and message."""

    rows: list[LedgerRow] = field(default_factory=list)
    windows: dict[WindowKey, datetime] = field(default_factory=dict)  # window -> newest revision in the batch
    owners: dict[WindowKey, set[UUID]] = field(default_factory=dict)  # organizations owning the window's account
    messages: dict[WindowKey, list[int]] = field(default_factory=dict)  # messages carrying each window
    quarantined: list[Quarantined] = field(default_factory=list)
    lines: Counter[tuple[str, Result]] = field(default_factory=Counter)  # (api_version, outcome)
    unpriced: Counter[str] = field(default_factory=Counter)  # provider
    best: BestResults = field(default_factory=BestResults)  # message index -> best outcome of its lines
    # The projects the lines were attributed by (``Pipeline._reduce``): a ledger prepared before the batch's
    # transaction is reduced again in it when the projects it sees differ (``Pipeline._attribution_holds``).
    links: frozenset[ProjectLink] = frozenset()

    def organizations(self) -> set[UUID]:
        """Every organization the batch writes for: the rows' and the windows' owners (retiring needs them)."""
        found = {row.key.organization_id for row in self.rows}
        for owners in self.owners.values():
            found.update(owners)
        return found

    def revisions(self) -> list[WindowRevision]:
        """The windows in write order, each with its newest revision and the organizations of its rows."""
        organizations: dict[WindowKey, set[UUID]] = {}
        for row in self.rows:
            organizations.setdefault(row.key.window, set()).add(row.key.organization_id)
        return [
            WindowRevision(window, self.windows[window], frozenset(organizations.get(window, ())))
            for window in sorted(self.windows)
        ]


def reduce_ledger(messages: list[ProviderMessage], attribution: Attribution, book: PriceBook) -> Ledger:
    """Attribute and price every line, sum lines that share a key within a message, and keep per window the
    lines of the batch's newest revision of it. A message quarantined whole names no window: it is no revision
    of anything, so it neither replaces the stored lines of its windows nor makes another message stale."""
    ledger = Ledger()
    summed_lines: list[dict[LedgerKey, LedgerLine] | None] = []
    for index, message in enumerate(messages):
        summed = _attributed_lines(message, attribution, book, ledger)
        summed_lines.append(summed)
        if summed is None:
            continue
        owners = attribution.owners(message.provider, message.ai_organization_id)
        for report, start, end in message.windows:
            window = WindowKey(message.provider, message.ai_organization_id, report, start, end)
            if window not in ledger.windows or message.collected_at > ledger.windows[window]:
                ledger.windows[window] = message.collected_at
            ledger.owners[window] = owners
            ledger.messages.setdefault(window, []).append(index)

    newest: dict[LedgerKey, LedgerRow] = {}
    for index, (message, lines) in enumerate(zip(messages, summed_lines, strict=True)):
        for key, line in (lines or {}).items():
            if message.collected_at < ledger.windows[key.window]:  # a newer snapshot of its window is here
                ledger.lines[(line.api_version, Result.STALE)] += 1
                ledger.best.note(index, Result.STALE)
            elif key in newest:  # the same revision again (a second part or a copy of the snapshot)
                ledger.lines[(line.api_version, Result.UNCHANGED)] += 1
                ledger.best.note(index, Result.UNCHANGED)
            else:
                newest[key] = LedgerRow(key, line, index, message.collected_at, message.source)
    ledger.rows = sorted(newest.values(), key=lambda row: row.key.order())
    return ledger


def _attributed_lines(
    message: ProviderMessage, attribution: Attribution, book: PriceBook, ledger: Ledger
) -> dict[LedgerKey, LedgerLine] | None:
    """One message's lines by key, attributed, priced and summed. A line that cannot be attributed quarantines
    the message (its attributed lines are still written); two currencies for one key quarantine it whole (None),
    and so do priced amounts adding up to ``MAX_AMOUNT`` or more (valid quantities, below 1e15 a message, at a
    price of 1,000 per million units or more: cost_data's CHECK would reject them, failing the batch as fatal)."""
    summed: dict[LedgerKey, LedgerLine] = {}
    problems: list[str] = []
    problem_reason: Reason | None = None
    for line in message.lines:
        owner = attribution.resolve(line)
        if isinstance(owner, Unattributed):
            problem_reason = problem_reason or owner.reason
            problems.append(owner.detail)
            continue
        if line.price_model is not None:
            line, has_price = book.priced(line)  # noqa: PLW2901 - the priced line replaces the decoded one
            if not has_price:
                ledger.unpriced[line.provider] += 1
        key = LedgerKey(
            owner.organization_id,
            owner.project_id,
            line.provider,
            line.ai_organization_id,
            line.report,
            line.bucket_start,
            line.bucket_end,
            line.line_item,
        )
        earlier = summed.get(key)
        if earlier is None:
            summed[key] = line
            continue
        total = sum_lines(earlier, line)
        if total is None:
            detail = f"line item {line.line_item!r} is reported in two currencies"
            ledger.quarantined.append(
                Quarantined(message.source, message.payload, Reason.INCONSISTENT_DATA, detail[:MAX_DETAIL])
            )
            return None
        summed[key] = total
    with localcontext(EXACT):
        priced = sum(
            (abs(line.amount) for line in summed.values() if line.price_model is not None and line.amount is not None),
            Decimal(0),
        )
    if priced >= MAX_AMOUNT:
        detail = f"the message's usage is priced at {priced:.3E} in all, {MAX_AMOUNT} or more"
        ledger.quarantined.append(Quarantined(message.source, message.payload, Reason.INVALID_NUMBER, detail))
        return None
    if problem_reason is not None:
        detail = "; ".join(sorted(set(problems))[:MAX_PROBLEMS])
        ledger.quarantined.append(Quarantined(message.source, message.payload, problem_reason, detail[:MAX_DETAIL]))
    return summed


def sum_lines(a: LedgerLine, b: LedgerLine) -> LedgerLine | None:
    """Two lines of one key as one (a new line; None when their currencies differ)."""
    if a.currency != b.currency:
        return None
    with localcontext(EXACT):  # money has up to 46 significant digits; the default context keeps 28
        amount = None if a.amount is None or b.amount is None else a.amount + b.amount
        quantity = a.quantity
        if a.quantity is not None or b.quantity is not None:
            quantity = (a.quantity or Decimal(0)) + (b.quantity or Decimal(0))
    results = a.metadata.get("results", 1) + b.metadata.get("results", 1)
    return replace(a, amount=amount, quantity=quantity, metadata={**a.metadata, "results": results})
