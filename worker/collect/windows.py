"""Which window each poll reads, and reading all of it.

A poll of an endpoint reads whole UTC days: from the trailing re-read window (``collect_trailing_days`` before
today, since providers finalise costs late) or from where the last successful poll stopped, whichever is
earlier, up to the end of today's open bucket. An account's first poll starts at ``collect_backfill_start``.
Every page is followed (``has_more`` / ``next_page``) before anything is staged: the window is published whole
or not at all, and buckets that a provider split over pages are merged, so a bucket is never split across
messages. A bucket that comes again (a cursor pointing at the last bucket served rather than past it) brings
results already collected: those are taken once (appended again, the worker would sum each line twice); a result
for a group already collected with other figures fails the window (which one the provider meant is not guessed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from worker.collect.client import ProviderClient
from worker.collect.errors import ProviderRejected
from worker.collect.publisher import dump_exact
from worker.collect.sources import Endpoint, bucket_bounds

DAY = timedelta(days=1)
MAX_PAGES = 10_000  # pages of one window; more means a cursor that never ends
MAX_EMPTY_PAGES = 5  # pages in a row without a bucket yet saying has_more; more: a cursor that goes nowhere


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime


def day_start(moment: datetime) -> datetime:
    return datetime.combine(moment.astimezone(UTC).date(), time(), tzinfo=UTC)


def window_for(
    now: datetime,
    *,
    collected_through: datetime | None,
    trailing_days: int,
    backfill_start: date | None,
    backfill_days: int,
) -> Window:
    """The window of the next poll (see the module docstring)."""
    today = day_start(now)
    end = today + DAY  # the open bucket's end
    if collected_through is None:
        if backfill_start is not None:
            start = datetime.combine(backfill_start, time(), tzinfo=UTC)
        else:
            start = today - timedelta(days=backfill_days)
    else:
        # The last poll's own open bucket was partial: read it again.
        start = min(today - timedelta(days=trailing_days), day_start(collected_through - DAY))
    return Window(start=min(start, today), end=end)


@dataclass
class Collected:
    """Every bucket of one window of one endpoint, in the provider's order, pages merged."""

    buckets: list[dict[str, Any]]
    pages: int
    repeated: int = 0  # results the provider served again (a bucket repeated on a later page), taken once


@dataclass
class _Merged:
    """One bucket being collected, with what identifies its results (their exact text, their group)."""

    bucket: dict[str, Any]
    texts: set[str]
    groups: set[tuple[str, ...]]


def _group(endpoint: Endpoint, result: Any) -> tuple[str, ...]:
    """The values of the fields the window is grouped by: one result per group in a bucket."""
    if not isinstance(result, dict):
        return (dump_exact(result),)
    return tuple(dump_exact(result.get(name)) for name in endpoint.group_by)


def _moment(provider: str, value: Any) -> datetime | None:
    """A bucket bound as the provider wrote it (unix seconds, RFC 3339), None when it cannot be read (the
    decoder says why)."""
    try:
        if provider == "openai":
            return datetime.fromtimestamp(value, tz=UTC) if isinstance(value, int) else None
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None
    except (ValueError, OverflowError, OSError):
        return None


def bucket_edges(provider: str, bucket: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    """When a bucket starts and ends."""
    start, end = bucket_bounds(provider, bucket)  # type: ignore[arg-type]
    return _moment(provider, start), _moment(provider, end)


def _merge(endpoint: Endpoint, account: str, merged: dict[str, _Merged], bucket: dict[str, Any]) -> int:
    """Add one bucket of a page to the window's; the number of its results that were already there."""
    key = json.dumps(bucket_bounds(endpoint.provider, bucket), default=str)
    results = bucket["results"]
    if key not in merged:
        merged[key] = _Merged(
            {**bucket, "results": list(results)},
            {dump_exact(r) for r in results},
            {_group(endpoint, r) for r in results},
        )
        return 0
    # The bucket again: continued on this page, or served again (its results repeated).
    known = merged[key]
    repeated = 0
    for result in results:
        text = dump_exact(result)
        if text in known.texts:
            repeated += 1
            continue
        group = _group(endpoint, result)
        if group in known.groups:
            raise ProviderRejected(
                f"{endpoint.report} of account {account}: the bucket {key} came again with other figures "
                "for a group it already had"
            )
        known.bucket["results"].append(result)
        known.texts.add(text)
        known.groups.add(group)
    return repeated


async def read_window(
    client: ProviderClient,
    endpoint: Endpoint,
    window: Window,
    *,
    base_url: str,
    account: str,
    headers: dict[str, str],
) -> Collected:
    """All pages of ``window``, following the cursor to the end; then again from where the report stopped, until
    it reaches the open bucket or brings nothing new.

    A request names the window's start only (see ``Endpoint.params``). A report asked without an end may stop
    short of today with has_more false (Anthropic documents 31 days from the start for its analytics API; the
    legacy reports and OpenAI's say nothing): the state moves on to the end of today, so the days after would
    never be asked for again. So when the newest bucket ends before the open bucket's end, the report is asked
    again from there (one more request when the last days simply have no bucket)."""
    merged: dict[str, _Merged] = {}
    pages = repeated = 0
    start = window.start
    while True:
        cursor: str | None = None
        seen: set[str] = set()
        empty = 0  # pages in a row without a bucket
        reached: datetime | None = None  # the end of the newest bucket this request brought
        while True:
            params = endpoint.params(start, window.end, cursor)
            page = await client.get_page(base_url, endpoint, account, headers, params)
            pages += 1
            for bucket in page["data"]:
                if not isinstance(bucket, dict) or not isinstance(bucket.get("results"), list):
                    raise ProviderRejected(f"{endpoint.report} of account {account}: a bucket without results")
                begins, ends = bucket_edges(endpoint.provider, bucket)
                if start != window.start and begins is not None and begins < start:
                    continue  # read by the request before
                repeated += _merge(endpoint, account, merged, bucket)
                if ends is not None and (reached is None or ends > reached):
                    reached = ends
            if not page.get("has_more"):
                break
            empty = 0 if page["data"] else empty + 1
            if empty > MAX_EMPTY_PAGES:
                raise ProviderRejected(
                    f"{endpoint.report} of account {account}: more than {MAX_EMPTY_PAGES} empty pages in a row, "
                    "each with has_more"
                )
            cursor = page.get("next_page")
            if not isinstance(cursor, str) or not cursor or cursor in seen or pages >= MAX_PAGES:
                raise ProviderRejected(f"{endpoint.report} of account {account}: has_more without a usable next_page")
            seen.add(cursor)
        if reached is None or reached >= window.end or reached <= start:
            break  # the open bucket reached, or nothing after ``start``: the whole window was read
        start = reached
    return Collected(buckets=[m.bucket for m in merged.values()], pages=pages, repeated=repeated)
