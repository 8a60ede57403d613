"""worker.touches: which periods a provider row's change makes budgets evaluate."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from worker.touches import provider_touch


def test_a_provider_touch_spans_from_the_hour_its_window_starts_in() -> None:
    """A minute bucket at 18:40 UTC covers the estimate of the hour 18:00 (migration 0025), which counts in the
    Asia/Kolkata day that ends at 18:30 UTC: the span reaches back to 18:00, so that day is evaluated too."""
    org = uuid.uuid4()
    touch = provider_touch(
        org, None, datetime(2026, 11, 3, 18, 40, tzinfo=UTC), datetime(2026, 11, 3, 18, 41, tzinfo=UTC)
    )
    assert touch.span_start == datetime(2026, 11, 3, 18, tzinfo=UTC)
    assert touch.span_end == datetime(2026, 11, 3, 18, 41, tzinfo=UTC)
    assert touch.at == datetime(2026, 11, 3, 18, 40, 30, tzinfo=UTC)
    daily = provider_touch(org, None, datetime(2026, 11, 3, tzinfo=UTC), datetime(2026, 11, 4, tzinfo=UTC))
    assert daily.span_start == datetime(2026, 11, 3, tzinfo=UTC)
