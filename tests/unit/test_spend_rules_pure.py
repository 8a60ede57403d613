"""Fast checks of the spend rules' pure parts (no servers): model providers, reports, midpoints, local periods."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.spend_model import period, periods_overlapping
from worker.model_providers import provider_of
from worker.providers import report_of
from worker.touches import midpoint

DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o", "openai"),
        ("GPT-4o-mini", "openai"),
        ("o3", "openai"),
        ("claude-sonnet-4-20250514", "anthropic"),
        ("claude-3-5-haiku-latest", "anthropic"),
        ("gemini-1.5-pro", "google"),
        # no provider's name pattern matches these: the one model maker whose catalogue list has the name (Azure and
        # OpenRouter list them too, as hosts); before, they had no provider, and OpenAI's own data never replaced
        # their estimates (counted twice beside it)
        ("text-embedding-3-small", "openai"),
        ("text-embedding-3-large", "openai"),
        ("chatgpt-4o-latest", "openai"),
        ("codex-mini", "openai"),
        ("ft:gpt-4o-2024-08-06:acme::abc123", "openai"),
        ("a-model-nobody-knows", None),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_models_map_to_their_provider_through_the_catalogue(model: str | None, provider: str | None) -> None:
    assert provider_of(model) == provider


def test_reports_name_the_provider_endpoint() -> None:
    assert report_of("openai", "costs_v1") == "openai.costs"
    assert report_of("openai", "usage_v1") == "openai.usage.completions"
    assert report_of("openai", "usage_v1", "embeddings") == "openai.usage.embeddings"
    assert report_of("anthropic", "costs_v1") == "anthropic.cost_report"
    assert report_of("anthropic", "usage_v1") == "anthropic.usage_report.messages"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("kind", "zone", "bucket_day", "period_start"),
    [  # README "What counts as spend", the worked examples
        ("daily", "America/Los_Angeles", "2026-11-03", "2026-11-03T08:00"),
        ("monthly", "America/Los_Angeles", "2026-11-01", "2026-11-01T07:00"),
        ("daily", "Europe/Berlin", "2026-03-29", "2026-03-28T23:00"),
        ("daily", "Asia/Kolkata", "2026-11-10", "2026-11-09T18:30"),
        ("daily", "America/Los_Angeles", "2026-03-08", "2026-03-08T08:00"),
    ],
)
def test_a_utc_day_bucket_counts_in_the_local_period_of_its_midpoint(
    kind: str, zone: str, bucket_day: str, period_start: str
) -> None:
    start = utc(bucket_day + "T00:00")
    at = midpoint(start, start + DAY)
    assert at == start + timedelta(hours=12)
    assert period(kind, zone, at)[0] == utc(period_start)


def test_dst_days_are_23_and_25_hours_long() -> None:
    start, end = period("daily", "America/Los_Angeles", utc("2026-03-08T12:00"))
    assert (start, end - start) == (utc("2026-03-08T08:00"), timedelta(hours=23))
    start, end = period("daily", "Europe/Berlin", utc("2026-10-25T12:00"))
    assert end - start == timedelta(hours=25)
    # Chatham (UTC+13:45 in summer, +12:45 in winter) falls back on 5 April 2026.
    start, end = period("daily", "Pacific/Chatham", utc("2026-04-05T00:00"))
    assert end - start == timedelta(hours=25)


def test_a_window_touches_every_period_it_overlaps() -> None:
    start = utc("2026-11-03T00:00")
    days = list(periods_overlapping("daily", "America/Los_Angeles", start, start + DAY))
    assert [d[0] for d in days] == [utc("2026-11-02T08:00"), utc("2026-11-03T08:00")]
