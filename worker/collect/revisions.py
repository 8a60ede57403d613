"""A poll's ``collected_at`` (its revision): the clock just before a window is read, never behind the last one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import structlog

from worker.models import MAX_FUTURE

log = structlog.get_logger("worker.collect")

REVISION_STEP = timedelta(milliseconds=1)  # a poll's collected_at after a clock step back: the last one + this
REVISION_MARGIN = timedelta(hours=1)  # consumer lag: a revision this close to the worker's future bound is not followed


class Revisions:
    """The ``collected_at`` of each window: the clock just before the window is read, so that a provider row's
    coverage (the hours before its ``collected_at``, README rule 2) ends as close as possible to when the
    provider was asked (a revision taken at the start of a round of many accounts, retries and Retry-After waits
    would leave the estimates of the hours in between counting beside the provider's figure for them), and later
    than every revision staged before (``revision_after``)."""

    def __init__(self, newest: datetime | None) -> None:
        self.newest = newest

    def next(self) -> datetime:
        clock = datetime.now(UTC)
        collected_at = revision_after(clock, self.newest)
        if collected_at != clock:
            log.warning(
                "collect_clock_behind_last_poll", clock=clock.isoformat(), collected_at=collected_at.isoformat()
            )
        self.newest = collected_at
        return collected_at


def revision_after(clock: datetime, newest: datetime | None) -> datetime:
    """A poll's ``collected_at``: the clock, or just after the newest one already staged when the clock is not past
    it. The worker ignores a revision older than the one it has, so a clock stepped back (NTP, a replica whose
    clock was ahead) must not freeze the ledger until the clock catches up. A newest revision beyond what the worker
    accepts (``MAX_FUTURE`` ahead: quarantined, never stored) is not followed: the clock is used."""
    if newest is None or clock > newest or newest >= clock + MAX_FUTURE - REVISION_MARGIN:
        return clock
    return newest + REVISION_STEP
