"""The demo stream of ``cost-worker dev``, priced the way the worker prices it (no overrides: the demo seeds
none): no unpriced line for a model the catalogue knows, and every API event without cost_usd estimated."""

from __future__ import annotations

from datetime import UTC, datetime

from worker.decode import ApiEvent, ProviderMessage, decode_api_event, decode_provider_message
from worker.dev import demo_stream
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
