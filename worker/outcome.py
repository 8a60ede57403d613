"""What a committed batch did: message and ledger-line outcomes, counted for metrics and the batch log line."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from worker.alerts import Alert, Resolution
from worker.quarantine import Quarantined


class Result(StrEnum):
    """The outcome of a message (``cost_worker_messages_total``) or a ledger line (``..._ledger_lines_total``)."""

    INSERTED = "inserted"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    STALE = "stale_revision"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    SUPERSEDED = "superseded"  # a stored line a newer snapshot of its window no longer has (ledger lines only)


# A provider message's outcome is the best among its lines': one that inserted anything counts as inserted.
_RANK = {Result.INSERTED: 0, Result.UPDATED: 1, Result.UNCHANGED: 2, Result.STALE: 3}


class BestResults(dict[int, Result]):
    """Per provider message (its index in the batch), the best outcome among its lines."""

    def note(self, message: int, result: Result) -> None:
        if message not in self or _RANK[result] < _RANK[self[message]]:
            self[message] = result


@dataclass
class Outcome:
    """What a committed batch did (metrics and the canonical log line are recorded from it)."""

    messages: Counter[tuple[str, Result]] = field(default_factory=Counter)  # (topic, outcome)
    quarantined: Counter[tuple[str, str]] = field(default_factory=Counter)  # (topic, reason)
    ledger_lines: Counter[tuple[str, Result]] = field(default_factory=Counter)  # (api_version, outcome)
    unpriced: Counter[str] = field(default_factory=Counter)  # provider
    unknown_models: int = 0  # API-usage events whose model has no known provider (their estimate always counts)
    catalogue_estimates: int = 0  # API-usage events without cost_usd that the price catalogue estimated
    new_quarantine_rows: int = 0
    # API-usage events of a month retention dropped (quarantined as invalid_timestamp): valid input refused by the
    # operator's retention, so the circuit breaker counts them as good, not as a sign of a broken producer.
    retained_out: int = 0
    alerts: list[Alert | Resolution] = field(default_factory=list)
    quarantine: list[Quarantined] = field(default_factory=list)  # every message quarantined by this batch

    @property
    def outbox_rows(self) -> int:
        return self.new_quarantine_rows + len(self.alerts)
