"""The demo stream of ``cost-worker dev``, priced the way the worker prices it (no overrides: the demo seeds
none): no unpriced line for a model the catalogue knows, and every API event without cost_usd estimated."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from worker.decode import ApiEvent, ProviderMessage, decode_api_event, decode_provider_message
from worker.dev import ASSISTANT, demo_stream
from worker.model_providers import provider_of
from worker.pricing import PriceBook, catalogue_model, estimate_request
from worker.quarantine import Source


def test_the_demo_has_no_unpriced_line_of_a_model_the_catalogue_knows() -> None:
    events, buckets = demo_stream(datetime(2026, 11, 20, 12, tzinfo=UTC))
    book = PriceBook([])
    usage = priced = 0
    unpriced = []
    for offset, payload in enumerate(buckets):
        message = decode_provider_message(payload, Source("b", 0, offset), max_bytes=1 << 20, max_results=1000)
        assert isinstance(message, ProviderMessage), message
        for line in message.lines:
            if line.price_model is None:
                continue
            usage += 1
            if book.priced(line)[1]:
                priced += 1
            else:
                unpriced.append(line.line_item)
    assert usage >= 15  # completions, embeddings, web search, Anthropic messages
    assert not [item for item in unpriced if catalogue_model("openai", item.split(":")[0])]
    assert not [item for item in unpriced if catalogue_model("anthropic", item.split(":")[0])]
    assert (usage, priced, unpriced) == (usage, usage, [])  # measured: every usage line of the demo is priced

    estimated = without = 0
    for offset, payload in enumerate(events):
        event = decode_api_event(payload, Source("e", 0, offset), max_bytes=1 << 20)
        if isinstance(event, ApiEvent) and event.cost_usd is None and event.model:
            without += 1
            found = estimate_request(
                provider_of(event.model), event.model, event.prompt_tokens, event.completion_tokens, event.occurred_at
            )
            estimated += found is not None
    assert without > 0
    assert estimated == without


# The moments the demo was seen to depend on: the 1st just after midnight, the 2nd early (yesterday's costs in this
# month, the day before's in the last), mid-month, the last hour of a month (past instants: decode refuses the future).
DEMO_RUNS = (
    datetime(2026, 11, 1, 0, 0, 30, tzinfo=UTC),
    datetime(2026, 11, 1, 4, 0, tzinfo=UTC),
    datetime(2026, 11, 2, 1, 53, tzinfo=UTC),
    datetime(2026, 11, 2, 23, 0, tzinfo=UTC),
    datetime(2026, 11, 15, 12, 0, tzinfo=UTC),
    datetime(2026, 11, 30, 23, 30, tzinfo=UTC),
)
ASSISTANT_MONTHLY = Decimal(100) * Decimal("0.5")  # demo_seed.sql: 'Assistant monthly', 100 USD, first threshold 50 %


@pytest.mark.parametrize("now", DEMO_RUNS, ids=lambda now: now.strftime("%d-%H%M"))
def test_the_demo_crosses_the_assistant_budget_whenever_it_runs(now: datetime) -> None:
    """Events lie within today (UTC), which no demo bucket covers, so they count; a lower bound of the Assistant
    project's spend per UTC month (events with the platform's cost, plus its provider cost lines) crosses 50 % of
    its monthly budget in some month, whatever the time of day or the day of the month."""
    events, buckets = demo_stream(now)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    spend: dict[tuple[int, int], Decimal] = {}
    for offset, payload in enumerate(events):
        event = decode_api_event(payload, Source("e", 0, offset), max_bytes=1 << 20)
        if not isinstance(event, ApiEvent):
            continue
        assert day <= event.occurred_at <= now, (event.event_id, event.occurred_at)
        if str(event.project_id) == ASSISTANT and event.cost_usd is not None and event.status_code < 400:
            month = (event.occurred_at.year, event.occurred_at.month)
            spend[month] = spend.get(month, Decimal(0)) + event.cost_usd
    for offset, payload in enumerate(buckets):
        message = decode_provider_message(payload, Source("b", 0, offset), max_bytes=1 << 20, max_results=1000)
        assert isinstance(message, ProviderMessage), message
        for line in message.lines:
            assert line.bucket_end <= day  # no bucket covers today's hours
            if line.ai_project_id == "proj_assistant" and line.amount is not None and line.api_version == "costs_v1":
                month = (line.bucket_start.year, line.bucket_start.month)
                spend[month] = spend.get(month, Decimal(0)) + line.amount
    assert max(spend.values()) >= ASSISTANT_MONTHLY, spend
