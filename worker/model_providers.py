"""Which provider serves a model: the price catalogue of ``genai-prices`` (bundled, never fetched at run time).

An API-usage event's estimate is replaced only by data of its model's provider (README "What counts as spend").
A model the catalogue does not know, or an event without a model, has no provider (``None``): its estimate is
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
    try:
        provider = data_snapshot.get_snapshot().find_provider(model.strip().lower(), None, None)
    except LookupError:
        return None
    return provider.id
