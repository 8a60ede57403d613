"""Prices for usage lines: the operator's overrides (``model_prices``), else the genai-prices catalogue.

- Overrides are looked up by ``(provider, model, token type)`` exactly as the line carries them (see
  ``worker.providers`` for the token type's format); the row with the latest ``effective_from`` at or before
  the bucket start applies. They are the only source of custom or negotiated prices.
- The catalogue is the installed ``genai-prices`` package's bundled snapshot (never fetched at run time):
  the model is matched by genai-prices' own rules, the line's non-default price dimensions select its price
  variants (``service_tier=batch`` is genai-prices' ``processing=batch``; ``speed=fast`` and an OpenAI service
  tier are variants of the same name), and ``context_window=200k-1M`` selects the long-context tier of a
  tiered price. A bucket aggregates many requests, so its total is no request's context length: a line without
  a context window takes the tier its result's average request reaches (``LedgerLine.request_input_tokens``, where
  the result counts its requests: OpenAI completions), else the base price. A dimension the catalogue has no
  variant for (``inference_geo=us``, say) leaves the line unpriced rather than priced wrongly.

Every priced line records its source in ``metadata.price_source`` (``override:<model_prices.id>`` or
``genai-prices <version>:<provider>/<model id>``) and its unit price in ``metadata.unit_price`` (USD per
``metadata.price_per`` units). Arithmetic is exact (``EXACT``): quantity x price / per. A usage line with no
price keeps amount NULL (it is stored and counted, never dropped); a line with zero quantity costs zero.
"""

from __future__ import annotations

import bisect
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal, localcontext
from functools import cache, lru_cache
from importlib.metadata import version

from genai_prices import data_snapshot
from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices, Usage
from genai_prices.units import UnitRegistry, _get_registry

from worker.limits import EXACT
from worker.providers import LedgerLine

CATALOGUE = "genai-prices"
CATALOGUE_VERSION = version("genai-prices")
CATALOGUE_SOURCE = f"{CATALOGUE} {CATALOGUE_VERSION}"
OVERRIDE_SOURCE = "override:"  # + model_prices.id
PER_MILLION = 1_000_000  # model_prices holds prices per million units
LONG_CONTEXT = "200k-1M"  # Anthropic's context_window value billed at long-context rates
QUOTE_CACHE = 65_536  # remembered catalogue quotes (provider, model, unit, dimensions, instant)
PER_REQUEST = "requests_kcount"  # a per-request fee: no usage line is a request count, so it never applies


@dataclass(frozen=True, slots=True)
class Price:
    provider: str
    model: str
    token_type: str
    price_per_million: Decimal
    currency: str
    effective_from: datetime
    id: int | None = None


@dataclass(frozen=True, slots=True)
class Quote:
    """A price that applies to one line: ``unit_price`` per ``per`` units, and where it comes from."""

    unit_price: Decimal
    per: int
    currency: str
    source: str

    def amount(self, quantity: Decimal) -> Decimal:
        with localcontext(EXACT):  # wide enough that no product of bounded inputs is ever rounded
            return quantity * self.unit_price / self.per


class Overrides:
    """``model_prices`` rows by (provider, model, token_type), each list ordered by effective_from."""

    def __init__(self, prices: Iterable[Price]) -> None:
        self._prices: dict[tuple[str, str, str], list[Price]] = defaultdict(list)
        for price in prices:
            self._prices[(price.provider, price.model, price.token_type)].append(price)
        for versions in self._prices.values():
            versions.sort(key=lambda p: p.effective_from)
        self._starts = {key: [p.effective_from for p in versions] for key, versions in self._prices.items()}

    def lookup(self, provider: str, model: str, token_type: str, at: datetime) -> Price | None:
        key = (provider, model, token_type)
        starts = self._starts.get(key)
        if not starts:
            return None
        index = bisect.bisect_right(starts, at) - 1
        return self._prices[key][index] if index >= 0 else None


# ============================================================================================ catalogue


@cache
def _registry() -> UnitRegistry:
    return _get_registry()


@cache
def catalogue_model(provider: str, model: str) -> tuple[Provider, ModelInfo] | None:
    """The catalogue's provider and model for a reported model name, or None."""
    try:
        return data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
    except LookupError:
        return None


def _context(dimensions: Iterable[tuple[str, str]]) -> dict[str, str] | None:
    """genai-prices' price context for the line's dimensions; None when one of them has no catalogue name."""
    context: dict[str, str] = {}
    for name, value in dimensions:
        if name == "service_tier" and value.lower() == "batch":
            context["processing"] = "batch"
        elif name in ("service_tier", "speed"):
            context[name] = value.lower()
        elif name == "context_window" and value == LONG_CONTEXT:
            continue  # a tier of the price itself (below)
        else:
            return None
    return context


def _variants_cover(model: ModelInfo, context: Mapping[str, str], at: datetime) -> bool:
    """Every entry of the context selects a variant the catalogue has (else the base price would apply)."""
    for key, value in context.items():
        if not any(
            variant.when.get(key) == value and (variant.constraint is None or variant.constraint.active(at))
            for variant in model.price_variants or ()
        ):
            return False
    return True


def _flatten(prices: ModelPrice, *, long_context: bool, input_tokens: int | None) -> ModelPrice:
    """The prices with every tiered price resolved: its highest tier for long context; for one request of
    ``input_tokens`` input tokens, the tier they reach (genai-prices' rule: the highest tier whose start they
    exceed, for every token of the request); else its base."""
    flat: dict[str, Decimal | None] = {}
    for key, value in prices.__dict__.items():
        if key.startswith("_") or key == PER_REQUEST:
            continue
        if isinstance(value, TieredPrices):
            flat[key] = value.base
            if long_context and value.tiers:
                flat[key] = value.tiers[-1].price
            elif input_tokens is not None:
                reached = [tier.price for tier in value.tiers if input_tokens > tier.start]
                flat[key] = reached[-1] if reached else value.base
        else:
            flat[key] = value
    return ModelPrice(**flat)


def _is_audio_tokens(unit: str) -> bool:
    """A genai-prices usage key that counts audio tokens (input, cached, output; not seconds)."""
    return "audio" in unit.split("_") and unit.endswith("_tokens")


@lru_cache(maxsize=QUOTE_CACHE)
def catalogue_quote(
    provider: str,
    model: str,
    unit: str,
    dimensions: tuple[tuple[str, str], ...],
    at: datetime,
    *,
    request_input_tokens: int | None = None,
) -> Quote | None:
    """The catalogue's price of one unit (a genai-prices usage key) of a model, or None. Remembered: a
    catalogue lookup takes a few hundred microseconds, and the lines of one bucket share their instant.
    ``request_input_tokens``: the price is that of one request with this many input tokens (its tier); None:
    a bucket of many requests (the base price, or the long-context tier its dimensions name)."""
    found = catalogue_model(provider, model)
    if found is None:
        return None
    catalogue_provider, info = found
    context = _context(dimensions)
    if context is None or not _variants_cover(info, context, at):
        return None
    registry = _registry()
    if unit not in registry.units:
        return None
    prices = _flatten(
        info.get_prices(at, context or None),
        long_context=(("context_window", LONG_CONTEXT) in dimensions),
        input_tokens=request_input_tokens,
    )
    relevant = {unit} | registry.ancestor_usage_keys(unit)
    priced = {
        key: value
        for key, value in prices.__dict__.items()
        if not key.startswith("_") and value is not None and key in registry._all_price_keys
    }
    if priced and not any(registry.unit_for_price_key(key).usage_key in relevant for key in priced):
        return None  # the model is priced, but not for this unit
    if _is_audio_tokens(unit) and not any(
        _is_audio_tokens(usage_key) and usage_key in relevant
        for usage_key in (registry.unit_for_price_key(key).usage_key for key in priced)
    ):
        # Audio tokens are never billed as text (OpenAI: gpt-4o-audio-preview's audio input is $40 per million,
        # its text $2.50), but the catalogue falls back to the text price where a model has no audio price. A
        # line priced 16x too low would count silently; unpriced, it shows in `prices unpriced` for an override.
        return None
    per = registry.units[unit].per
    with localcontext(EXACT), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # genai-prices warns about price keys it does not use; they stay unused
        # The library decides which of the model's prices this unit falls to (the most specific priced one
        # among the unit and its ancestors); a usage of ``per`` units of it, every ancestor included, is the
        # unit price. An empty price list is a free model (moderations).
        usage = Usage(**dict.fromkeys(relevant, per))
        total = prices.calc_price(usage)["total_price"]
    return Quote(total, per, "USD", f"{CATALOGUE_SOURCE}:{catalogue_provider.id}/{info.id}")


# ============================================================================================ the book


class PriceBook:
    """Overrides first, then the catalogue."""

    def __init__(self, overrides: Iterable[Price], *, catalogue: bool = True) -> None:
        self.overrides = Overrides(overrides)
        self.catalogue = catalogue

    def quote(self, line: LedgerLine) -> Quote | None:
        assert line.price_model is not None, "usage lines carry a price key"
        assert line.price_token_type is not None, "usage lines carry a price key"
        override = self.overrides.lookup(line.provider, line.price_model, line.price_token_type, line.bucket_start)
        if override is not None:
            return Quote(override.price_per_million, PER_MILLION, override.currency, f"{OVERRIDE_SOURCE}{override.id}")
        if self.catalogue and line.price_unit is not None:
            return catalogue_quote(
                line.provider,
                line.price_model,
                line.price_unit,
                line.price_dimensions,
                line.bucket_start,
                request_input_tokens=_tier_reached(line),
            )
        return None

    def priced(self, line: LedgerLine) -> tuple[LedgerLine, bool]:
        """The line with its amount, currency and price source filled in (a new line: the one given is left as
        it was), and whether it has a price (False: it stays unpriced, amount NULL)."""
        assert line.quantity is not None, "usage lines carry a quantity"
        found = self.quote(line)
        if found is None:
            if line.quantity == 0:
                return replace(line, amount=Decimal(0)), True
            unpriced = {"model": line.price_model, "token_type": line.price_token_type}
            return replace(line, amount=None, metadata={**line.metadata, "unpriced": unpriced}), False
        metadata = {**line.metadata, "price_source": found.source, "unit_price": str(found.unit_price)}
        if found.per != 1:
            metadata["price_per"] = found.per
        return replace(line, amount=found.amount(line.quantity), currency=found.currency, metadata=metadata), True


def _tier_reached(line: LedgerLine) -> int | None:
    """For a line that knows its average request's input tokens and names no context window: the fewest input
    tokens that reach the same tier of the model's tiered prices (so that quotes stay remembered per tier), or None
    (the base price)."""
    tokens = line.request_input_tokens
    if tokens is None or any(name == "context_window" for name, _ in line.price_dimensions):
        return None
    assert line.price_model is not None
    reached = [start for start in tier_starts(line.provider, line.price_model, line.bucket_start) if tokens > start]
    return max(reached) + 1 if reached else None


@lru_cache(maxsize=QUOTE_CACHE)
def tier_starts(provider: str, model: str, at: datetime) -> tuple[int, ...]:
    """Where the model's prices tiered by input tokens (long context) change, at ``at``: () when none is."""
    found = catalogue_model(provider, model)
    if found is None:
        return ()
    prices = found[1].get_prices(at)
    tiered = [value for value in prices.__dict__.values() if isinstance(value, TieredPrices)]
    return tuple(sorted({tier.start for value in tiered for tier in value.tiers}))


def price_keys(lines: Iterable[LedgerLine]) -> set[tuple[str, str]]:
    """(provider, model) pairs a set of usage lines needs prices for."""
    return {(line.provider, line.price_model) for line in lines if line.price_model is not None}


# ============================================================================================ API-usage estimates


@dataclass(frozen=True, slots=True)
class Estimate:
    amount: Decimal
    source: str


def estimate_request(
    provider: str | None,
    model: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    at: datetime,
    *,
    total_tokens: int | None = None,
) -> Estimate | None:
    """The catalogue's price of one API request the platform did not price (no ``cost_usd``): its prompt tokens
    at the model's input price, its completion tokens at the output price. The event does not say how many of
    its prompt tokens were cached, so this is the uncached (upper) price. Unlike a bucket, one request's context
    length is known: a tiered price is that of the tier its prompt tokens reach (a 300k-token prompt to a model
    billed at long-context rates past 200k pays them on every token). An event that reports only
    ``total_tokens`` (no prompt or completion count) is priced as the dearer of all prompt or all completion,
    rather than silently count zero; one that reports one count and ``total_tokens`` has the rest of the total as
    its other count (total = prompt + completion; a missing count reads as 0). None when the
    catalogue cannot price it (no model, no tokens, a model it does not know)."""
    model = (model or "").strip()  # as ``model_providers.provider_of`` reads it
    if provider is None or not model:
        return None
    if not prompt_tokens and not completion_tokens:
        return _estimate_total(provider, model, total_tokens, at) if total_tokens else None
    if total_tokens and not completion_tokens and prompt_tokens and total_tokens > prompt_tokens:
        completion_tokens = total_tokens - prompt_tokens
    elif total_tokens and not prompt_tokens and completion_tokens and total_tokens > completion_tokens:
        prompt_tokens = total_tokens - completion_tokens
    total = Decimal(0)
    source = None
    for unit, count in (("input_tokens", prompt_tokens), ("output_tokens", completion_tokens)):
        if not count:
            continue
        quote = catalogue_quote(provider, model, unit, (), at, request_input_tokens=prompt_tokens or 0)
        if quote is None:
            if catalogue_model(provider, model) is None:
                return None
            continue  # a model the catalogue prices, but not for this kind of token (an embedding's output): free,
            # as genai-prices' own calculation has it, and its other tokens are still priced
        total += quote.amount(Decimal(count))
        source = quote.source
    return None if source is None else Estimate(total, source)


def _estimate_total(provider: str, model: str, tokens: int, at: datetime) -> Estimate | None:
    """``tokens`` of unknown split: the dearer of its two extreme splits, all prompt (at the tier that prompt
    reaches) or all completion, each priced as the catalogue prices such a request (an embedding model has no
    output price: all prompt)."""
    quantity = Decimal(tokens)
    quotes = [
        quote
        for unit, prompt in (("input_tokens", tokens), ("output_tokens", 0))
        if (quote := catalogue_quote(provider, model, unit, (), at, request_input_tokens=prompt)) is not None
    ]
    if not quotes:
        return None
    dearest = max(quotes, key=lambda quote: quote.amount(quantity))
    return Estimate(dearest.amount(quantity), dearest.source)
