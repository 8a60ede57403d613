"""Windows of one report that overlap (``worker.overlaps``), without servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.decode import ProviderMessage
from worker.ledger import Ledger
from worker.overlaps import quarantined, refused_windows
from worker.quarantine import Quarantined, Reason, Source
from worker.rows import WindowKey

DAY0 = datetime(2026, 11, 3, tzinfo=UTC)
HOUR = timedelta(hours=1)


def window(
    start_hours: float, hours: float, report: str = "openai.usage.completions", account: str = "org-a"
) -> WindowKey:
    start = DAY0 + start_hours * HOUR
    return WindowKey("openai", account, report, start, start + hours * HOUR)


def ledger_of(*windows: WindowKey) -> Ledger:
    """One message per window, in this order."""
    ledger = Ledger()
    for index, w in enumerate(windows):
        ledger.windows[w] = DAY0
        ledger.messages.setdefault(w, []).append(index)
    return ledger


def test_the_earliest_message_keeps_its_window_and_later_overlaps_are_refused() -> None:
    daily, hour_10, hour_30 = window(0, 24), window(10, 1), window(30, 1)
    refused = refused_windows(ledger_of(daily, hour_10, hour_30), {})
    assert refused == {
        hour_10: f"the window {DAY0.isoformat()}/{(DAY0 + 24 * HOUR).isoformat()} of an earlier message in the batch"
    }
    # The other order: the hour came first, so the day around it is refused.
    assert set(refused_windows(ledger_of(hour_10, daily), {})) == {daily}


def test_adjacent_windows_other_reports_and_other_accounts_do_not_overlap() -> None:
    windows = [
        window(0, 1),
        window(1, 1),  # adjacent: [01:00, 02:00) after [00:00, 01:00)
        window(0, 24, report="openai.usage.embeddings"),
        window(0, 24, account="org-b"),
        window(2, 1 / 60),  # a minute bucket after them
        window(2 + 5 / 60, 1 / 60),
    ]
    assert refused_windows(ledger_of(*windows), {}) == {}


def test_a_window_overlapping_a_kept_one_that_is_not_the_nearest_by_start() -> None:
    # Kept: [00:00, 01:00) and [05:00, 06:00); then [00:30, 05:30) overlaps both (found by the last start before
    # its end, [05:00, 06:00)); then [01:00, 05:00) overlaps neither and is kept.
    first, second, wide, gap = window(0, 1), window(5, 1), window(0.5, 5), window(1, 4)
    assert set(refused_windows(ledger_of(first, second, wide, gap), {})) == {wide}


def test_stored_overlaps_are_refused_first_and_take_no_part_in_the_batch() -> None:
    daily, hour_10 = window(0, 24), window(10, 1)
    stored = {daily: window(3, 1)}  # the database found a stored hour inside the day
    refused = refused_windows(ledger_of(daily, hour_10), stored)
    assert set(refused) == {daily}  # the hour is kept: the refused day is no window of the batch
    assert "stored window" in refused[daily]


def test_one_quarantine_row_per_message_and_none_for_a_message_quarantined_already() -> None:
    daily, hour_10, hour_11 = window(0, 24), window(10, 1), window(11, 1)
    ledger = Ledger()
    for w, indices in ((daily, [0]), (hour_10, [1]), (hour_11, [1, 2])):
        ledger.windows[w] = DAY0
        ledger.messages[w] = indices
    messages = [
        ProviderMessage(Source("t", 0, offset), b"{}", "openai", "org-a", "usage_v1", DAY0) for offset in range(3)
    ]
    ledger.quarantined.append(Quarantined(messages[2].source, b"{}", Reason.UNATTRIBUTED, "x"))
    refused = refused_windows(ledger, {})
    assert set(refused) == {hour_10, hour_11}
    rows = quarantined(ledger, refused, messages)
    assert [(row.source.offset, row.reason) for row in rows] == [(1, Reason.OVERLAPPING_WINDOW)]
    assert rows[0].detail.count("overlaps the window") == 2  # both of its windows are named
