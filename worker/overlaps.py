"""Windows of one report that overlap: the same calls at two widths (an hourly bucket inside a daily one). Pure.

A bucket is a snapshot of one window of one report (README "What counts as spend", rule 1), so two different
windows of a report that overlap would both count: 4 USD published hourly and daily would count 8. The window
stored first (or, within a batch, the one of the earliest message) stays the truth of its hours; a message that
brings another window overlapping it is quarantined (``overlapping_window``) for that window, whose lines are not
written. Its other windows are written, as a message with an unattributed line still writes its other lines.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

from worker.decode import ProviderMessage
from worker.ledger import MAX_PROBLEMS, Ledger
from worker.limits import MAX_DETAIL
from worker.quarantine import Quarantined, Reason
from worker.rows import WindowKey


def refused_windows(ledger: Ledger, stored: dict[WindowKey, WindowKey]) -> dict[WindowKey, str]:
    """The batch's windows that overlap another window of their report, each with why: ``stored`` (a stored
    window each overlaps, from the database), then among the others in the order of their first message."""
    refused = {window: f"the stored window {_span(other)} of its report" for window, other in stored.items()}
    kept: dict[tuple[str, str, str], list[WindowKey]] = {}  # per report, disjoint windows sorted by start
    for window in sorted(ledger.windows.keys() - refused.keys(), key=lambda w: (min(ledger.messages[w]), w)):
        group = kept.setdefault((window.provider, window.ai_organization_id, window.report), [])
        # The kept windows are disjoint, so the one starting last before this one's end ends last among them.
        before = bisect_left(group, window.end, key=lambda w: w.start)
        if before and group[before - 1].end > window.start:
            refused[window] = f"the window {_span(group[before - 1])} of an earlier message in the batch"
        else:
            insort(group, window, key=lambda w: w.start)
    return refused


def quarantined(
    ledger: Ledger, refused: dict[WindowKey, str], messages: Sequence[ProviderMessage]
) -> list[Quarantined]:
    """One quarantine row per message carrying a refused window (a message quarantined already keeps its row)."""
    flagged = {item.source for item in ledger.quarantined}
    problems: dict[int, list[str]] = {}
    for window, why in sorted(refused.items()):
        for index in ledger.messages.get(window, []):
            problems.setdefault(index, []).append(f"{window.report} window {_span(window)} overlaps {why}")
    found = []
    for index in sorted(problems):
        message = messages[index]
        if message.source in flagged:
            continue
        detail = "; ".join(problems[index][:MAX_PROBLEMS])
        found.append(Quarantined(message.source, message.payload, Reason.OVERLAPPING_WINDOW, detail[:MAX_DETAIL]))
    return found


def _span(window: WindowKey) -> str:
    return f"{window.start.isoformat()}/{window.end.isoformat()}"
