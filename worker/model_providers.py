"""Which provider serves a model: the price catalogue of ``genai-prices`` (bundled, never fetched at run time).

An API-usage event's estimate is replaced only by data of its model's provider (README "What counts as spend").
The catalogue's own lookup matches a model name against each provider's name pattern (``gpt-*``, ``claude*``,
...). A name no pattern matches (``text-embedding-3-small``, ``chatgpt-4o-latest``, a fine-tuned ``ft:gpt-4o-...``)
falls back to the catalogue's model lists: the provider is the one model maker (a provider with a name pattern of
its own, not a host or reseller such as Azure or OpenRouter) whose list has the name. A model the catalogue does
not know, one that several makers list, or an event without a model has no provider (``None``): its estimate is
never replaced by provider data, so it always counts (an unknown call is not silently dropped; the price of that
choice is a possible double count, made visible by ``cost_worker_unknown_model_events_total``).
"""

from __future__ import annotations

from functools import lru_cache

from genai_prices import data_snapshot

MAX_MODEL_CACHE = 4096  # distinct model names whose provider is remembered


@lru_cache(maxsize=MAX_MODEL_CACHE)
def provider_of(model: str | None) -> str | None:
    """The catalogue's provider id (``openai``, ``anthropic``, ``google``, ...) of a model name, or None."""
    if not model or not model.strip():
        return None
    name = model.strip().lower()
    snapshot = data_snapshot.get_snapshot()
    try:
        return snapshot.find_provider(name, None, None).id
    except LookupError:
        pass
    makers = {p.id for p in snapshot.providers if p.model_match is not None and p.find_model(name) is not None}
    return makers.pop() if len(makers) == 1 else None
