"""Pricing without servers: overrides before the catalogue, price dimensions, and the priced amount of any
completions result against independent computations."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.models import OpenAIUsageBucket, OpenAIUsageResult
from worker.prices import read_csv
from worker.pricing import CATALOGUE_VERSION, PER_MILLION, Price, PriceBook, catalogue_quote, estimate_request
from worker.providers import COMPLETION_TOKEN_TYPES, LedgerLine, lines_for, openai_counts

AT = datetime(2026, 11, 1, tzinfo=UTC)
CATEGORIES = [name for name, _ in COMPLETION_TOKEN_TYPES]


def usage_lines(model: str, truth: dict[str, int], tier: tuple[tuple[str, str], ...] = ()) -> list[LedgerLine]:
    result = OpenAIUsageResult.model_validate(_documented(truth) | {"model": model})
    qualifier = "".join(f"/{name}={value}" for name, value in tier)
    return [
        LedgerLine(
            provider="openai",
            ai_organization_id="org-x",
            ai_project_id=None,
            api_version="usage_v1",
            bucket_start=AT,
            bucket_end=AT,
            line_item=f"{model}:{count.token_type}",
            currency="USD",
            amount=None,
            quantity=Decimal(count.quantity),
            unit=count.unit,
            price_model=model,
            price_token_type=count.token_type + qualifier,
            price_unit=count.price_unit,
            price_dimensions=tier,
        )
        for count in openai_counts("completions", result)
    ]


def _documented(truth: dict[str, int]) -> dict[str, int]:
    uncached = truth["input_text_tokens"] + truth["input_audio_tokens"] + truth["input_image_tokens"]
    cached = truth["input_cached_text_tokens"] + truth["input_cached_audio_tokens"] + truth["input_cached_image_tokens"]
    return truth | {
        "input_uncached_tokens": uncached,
        "input_cached_tokens": cached,
        "input_tokens": uncached + cached + truth["input_cache_write_tokens"],
        "output_tokens": truth["output_text_tokens"] + truth["output_audio_tokens"] + truth["output_image_tokens"],
    }


counts = st.integers(min_value=0, max_value=10**12)
truths = st.fixed_dictionaries(dict.fromkeys(CATEGORIES, counts))
prices = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(truth=truths, table=st.fixed_dictionaries(dict.fromkeys(CATEGORIES, prices)))
def test_override_prices_amount_to_the_plain_sum(truth: dict[str, int], table: dict[str, Decimal]) -> None:
    book = PriceBook(
        [
            Price("openai", "acme-llm", name, price, "USD", datetime(2020, 1, 1, tzinfo=UTC), 7)
            for name, price in table.items()
        ]
    )
    priced = [book.priced(line) for line in usage_lines("acme-llm", truth)]
    assert all(ok for _, ok in priced)
    lines = [line for line, _ in priced]
    expected = sum((Decimal(truth[name]) * table[name] for name in CATEGORIES), Decimal(0)) / PER_MILLION
    assert sum((line.amount for line in lines if line.amount is not None), Decimal(0)) == expected
    assert {line.metadata["price_source"] for line in lines} == {"override:7"}


def _genai_usage(truth: dict[str, int]) -> genai_prices.Usage:
    """The whole result as one genai-prices usage (its own decomposition decides each token's price)."""
    documented = _documented(truth)
    return genai_prices.Usage(
        input_tokens=documented["input_tokens"],
        cache_read_tokens=documented["input_cached_tokens"],
        cache_write_tokens=truth["input_cache_write_tokens"],
        input_audio_tokens=truth["input_audio_tokens"] + truth["input_cached_audio_tokens"],
        cache_audio_read_tokens=truth["input_cached_audio_tokens"],
        input_image_tokens=truth["input_image_tokens"] + truth["input_cached_image_tokens"],
        cache_image_read_tokens=truth["input_cached_image_tokens"],
        output_tokens=documented["output_tokens"],
        output_audio_tokens=truth["output_audio_tokens"],
        output_image_tokens=truth["output_image_tokens"],
    )


AUDIO = ("input_audio_tokens", "input_cached_audio_tokens", "output_audio_tokens")
# Models the catalogue gives audio prices (their audio tokens are priced as genai-prices prices them) and models
# it does not (audio tokens there would fall back to the text price: the worker leaves them unpriced).
AUDIO_PRICED = ("gpt-audio", "gpt-realtime", "gpt-realtime-mini")
NO_AUDIO_PRICE = ("gpt-4o", "gpt-4o-mini", "gpt-image-1", "gpt-4.1-mini", "o3", "gpt-4o-audio-preview")


@settings(max_examples=200, deadline=None)
@given(truth=truths, model=st.sampled_from(AUDIO_PRICED + NO_AUDIO_PRICE))
def test_catalogue_prices_amount_to_genai_prices_whole_calculation(truth: dict[str, int], model: str) -> None:
    """Every token the catalogue prices for this model is priced as genai-prices prices the whole result; audio
    tokens of a model without an audio price are left unpriced (never at the text price), the rest still priced."""
    book = PriceBook([])
    priced = [book.priced(line) for line in usage_lines(model, truth)]
    unpriced = {line.price_token_type for line, ok in priced if not ok}
    if model in AUDIO_PRICED:
        assert unpriced == set()
        comparable = truth
    else:
        assert unpriced == {name for name in AUDIO if truth[name] > 0}
        comparable = truth | dict.fromkeys(AUDIO, 0)
    ours = sum((line.amount for line, ok in priced if ok and line.amount is not None), Decimal(0))
    usage = _genai_usage(comparable)
    theirs = genai_prices.calc_price(usage, model, provider_id="openai", genai_request_timestamp=AT)
    assert ours == theirs.total_price


def test_audio_tokens_are_never_priced_as_text() -> None:
    """gpt-4o-audio-preview: the catalogue has only its text prices ($2.50 / $10 per million); OpenAI bills its
    audio at $40 / $80. Priced by fallback, 1M audio tokens in and out would count $12.50 instead of $120."""
    truth = dict.fromkeys(CATEGORIES, 0) | {"input_audio_tokens": 1_000_000, "output_audio_tokens": 1_000_000}
    truth |= {"input_text_tokens": 1_000_000}
    priced = {
        line.price_token_type: (line.amount, ok)
        for line, ok in map(PriceBook([]).priced, usage_lines("gpt-4o-audio-preview", truth))
    }
    assert priced["input_audio_tokens"] == (None, False)
    assert priced["output_audio_tokens"] == (None, False)
    assert priced["input_text_tokens"] == (Decimal("2.5"), True)  # its text is priced as before


def test_every_priced_line_names_the_catalogue_version() -> None:
    decoded = usage_lines("gpt-4o", dict.fromkeys(CATEGORIES, 1))[0]
    line, _ = PriceBook([]).priced(decoded)
    assert line.metadata["price_source"] == f"genai-prices {CATALOGUE_VERSION}:openai/gpt-4o"
    assert line.metadata["unit_price"] == "2.50"
    assert "price_source" not in decoded.metadata  # pricing makes a new line


def test_an_override_applies_from_its_date_and_the_catalogue_before() -> None:
    line = usage_lines("gpt-4o", dict.fromkeys(CATEGORIES, 1_000_000))[0]
    book = PriceBook(
        [Price("openai", "gpt-4o", "input_text_tokens", Decimal(2), "USD", datetime(2026, 11, 2, tzinfo=UTC), 1)]
    )
    priced, ok = book.priced(line)
    assert ok
    assert priced.amount == Decimal("2.5")  # the catalogue: the override starts later


def test_dimensions_select_variants_or_leave_the_line_unpriced() -> None:
    def quote(provider: str, model: str, unit: str, *dims: tuple[str, str]) -> Any:
        found = catalogue_quote(provider, model, unit, dims, AT)
        return None if found is None else found.unit_price

    assert quote("openai", "gpt-4o", "input_text_tokens", ("service_tier", "batch")) == Decimal("1.25")
    assert quote("anthropic", "claude-sonnet-4-5", "input_tokens", ("context_window", "200k-1M")) == Decimal(6)
    assert quote("anthropic", "claude-sonnet-4-5", "input_tokens") == Decimal(3)
    assert quote("anthropic", "claude-opus-4-8", "output_tokens", ("speed", "fast")) == Decimal(50)
    assert quote("anthropic", "claude-sonnet-4", "output_tokens", ("speed", "fast")) is None  # no fast mode
    assert quote("anthropic", "claude-sonnet-4", "input_tokens", ("inference_geo", "us")) is None
    assert quote("openai", "gpt-4o", "input_text_tokens", ("size", "1024x1024")) is None
    assert quote("openai", "omni-moderation-latest", "input_tokens") == Decimal(0)  # free
    assert quote("openai", "gpt-4o", "input_characters") is None  # priced, but not by characters
    assert quote("openai", "no-such-model", "input_tokens") is None


def test_a_line_without_any_price_stays_unpriced_unless_it_is_empty() -> None:
    lines = usage_lines("acme-llm", dict.fromkeys(CATEGORIES, 0) | {"input_text_tokens": 3})
    book = PriceBook([])
    results = {line.line_item: (ok, line.amount) for line, ok in map(book.priced, lines)}
    assert results["acme-llm:input_text_tokens"] == (False, None)
    assert results["acme-llm:output_text_tokens"] == (True, Decimal(0))


def test_an_estimate_prices_the_request_at_the_tier_of_its_own_prompt() -> None:
    """One request's context length is known (its prompt tokens): past a tier's start the catalogue bills every
    token at that tier (genai-prices' "cliff" model), so the estimate must too; the base price would halve it."""
    models = (
        ("anthropic", "claude-sonnet-4-5"),
        ("google", "gemini-2.5-pro"),
        ("openai", "gpt-4o"),
        ("openai", "gpt-5.4"),  # tiered past 272k, input and output
    )
    for provider, model in models:
        for prompt, completion in ((300_000, 1_000), (100_000, 1_000), (0, 5_000)):
            found = estimate_request(provider, model, prompt, completion, AT)
            assert found is not None
            usage = genai_prices.Usage(input_tokens=prompt, output_tokens=completion)
            theirs = genai_prices.calc_price(usage, model, provider_id=provider, genai_request_timestamp=AT)
            assert (model, prompt, found.amount) == (model, prompt, theirs.total_price)


def test_tokens_the_model_has_no_price_for_leave_the_rest_of_the_request_priced() -> None:
    """An embedding event that reports completion tokens (or a total above its prompt): the embedding model has no
    output price, which must not void the request's estimate (it counted 0); genai-prices prices its input."""
    usage = genai_prices.Usage(input_tokens=1000, output_tokens=100)
    theirs = genai_prices.calc_price(usage, "text-embedding-3-small", provider_id="openai", genai_request_timestamp=AT)
    for found in (
        estimate_request("openai", "text-embedding-3-small", 1000, 100, AT),
        estimate_request("openai", "text-embedding-3-small", 1000, None, AT, total_tokens=1100),
    ):
        assert found is not None
        assert found.amount == theirs.total_price == Decimal("0.00002")
    assert estimate_request("openai", "no-such-model-anywhere", 1000, 100, AT) is None


def test_an_event_with_only_total_tokens_is_estimated_at_the_dearer_price_not_zero() -> None:
    """Without a prompt/completion split the estimate must not silently be zero: it is the dearer of the two
    extreme splits (all prompt, all completion), checked against genai-prices' own calculation of each."""
    cases = (
        ("openai", "gpt-4o", 1_000_000),
        ("openai", "text-embedding-3-small", 1_000_000),  # no output price: all input
        ("anthropic", "claude-sonnet-4-5", 300_000),  # past the long-context tier
        ("google", "gemini-2.5-pro", 10_000),
    )
    for provider, model, tokens in cases:
        splits = (genai_prices.Usage(input_tokens=tokens), genai_prices.Usage(output_tokens=tokens))
        theirs = []
        for usage in splits:
            try:
                price = genai_prices.calc_price(usage, model, provider_id=provider, genai_request_timestamp=AT)
            except LookupError:  # genai-prices: no price for that kind of token
                continue
            theirs.append(price.total_price)
        found = estimate_request(provider, model, 0, 0, AT, total_tokens=tokens)
        assert found is not None
        assert (model, found.amount) == (model, max(theirs))
        assert estimate_request(provider, model, None, None, AT, total_tokens=tokens) == found
    # One count and total_tokens: the other count is the rest of the total (the contract's total = prompt +
    # completion; a missing count reads as 0). 150 prompt tokens and a total of 950 to gpt-4o are 0.008375 USD
    # (800 completion tokens at 10 per million), not 0.000375 (the 800 dropped).
    assert estimate_request("openai", "gpt-4o", 150, 0, AT, total_tokens=950) == estimate_request(
        "openai", "gpt-4o", 150, 800, AT
    )
    assert estimate_request("openai", "gpt-4o", 150, None, AT, total_tokens=950) == estimate_request(
        "openai", "gpt-4o", 150, 800, AT
    )
    # ... and the prompt, when only the completion is given, with the tier it reaches (300k to claude-sonnet-4-5)
    assert estimate_request("anthropic", "claude-sonnet-4-5", 0, 1_000, AT, total_tokens=301_000) == estimate_request(
        "anthropic", "claude-sonnet-4-5", 300_000, 1_000, AT
    )
    found = estimate_request("openai", "gpt-4o", 150, 0, AT, total_tokens=950)
    assert found is not None
    assert found.amount == Decimal("0.008375")
    # A total below the given count says nothing more.
    assert estimate_request("openai", "gpt-4o", 150, 0, AT, total_tokens=100) == estimate_request(
        "openai", "gpt-4o", 150, 0, AT
    )
    # A split, when given, is what counts: total_tokens is not added on top.
    split = estimate_request("openai", "gpt-4o", 100, 50, AT, total_tokens=150)
    assert split == estimate_request("openai", "gpt-4o", 100, 50, AT)
    assert estimate_request("openai", "gpt-4o", 0, 0, AT, total_tokens=0) is None


def test_a_bucket_whose_requests_average_past_a_tier_is_priced_at_that_tier() -> None:
    """OpenAI's Usage API reports no context length, but a completions result counts its requests: 10 requests of
    3,000,000 input tokens average 300,000, past gpt-5.4's 272k tier, where every token of such a request is billed
    at the tier (2x input, 1.5x output: $15 for the input, not the base $7.50). The line is priced as that many
    requests of the average size, as genai-prices prices one; a bucket whose average stays under the tier keeps the
    base price (its requests may all be short)."""

    def priced(requests: int) -> dict[str, Decimal | None]:
        bucket = OpenAIUsageBucket.model_validate(
            {
                "start_time": int(AT.timestamp()),
                "end_time": int(AT.timestamp()) + 86_400,
                "results": [
                    {
                        "object": "organization.usage.completions.result",
                        "model": "gpt-5.4",
                        "input_tokens": 3_000_000,
                        "input_cached_tokens": 1_000_000,
                        "output_tokens": 20_000,
                        "num_model_requests": requests,
                    }
                ],
            }
        )
        book = PriceBook([])
        lines = [book.priced(line)[0] for line in lines_for("openai", "usage_v1", "org-x", bucket, "completions")]
        return {line.line_item: line.amount for line in lines if line.quantity}

    def theirs(requests: int) -> Decimal:
        inputs, cached, outputs = 3_000_000 // requests, 1_000_000 // requests, 20_000 // requests
        each = genai_prices.Usage(input_tokens=inputs, cache_read_tokens=cached, output_tokens=outputs)
        one = genai_prices.calc_price(each, "gpt-5.4", provider_id="openai", genai_request_timestamp=AT).total_price
        return one * requests

    long = priced(10)
    assert long == {
        "gpt-5.4:input_text_tokens": Decimal(10),  # 2,000,000 at $5
        "gpt-5.4:input_cached_text_tokens": Decimal("0.5"),  # 1,000,000 at $0.50
        "gpt-5.4:output_text_tokens": Decimal("0.45"),  # 20,000 at $22.50
    }
    assert sum(amount or 0 for amount in long.values()) == theirs(10)
    short = priced(20)  # 150,000 input tokens a request: under the tier
    assert sum(amount or 0 for amount in short.values()) == theirs(20) == Decimal("5.55")
    assert priced(0) == short  # no request count: the base price, as before


def _vector_storage(width: int, held: int) -> list[LedgerLine]:
    """One day of a vector store holding ``held`` bytes, in buckets of ``width`` seconds (the documented shape:
    https://platform.openai.com/docs/api-reference/usage/vector_stores, ``bucket_width`` 1m, 1h or 1d)."""
    start = 1_793_491_200  # 2026-11-01T00:00:00Z
    found: list[LedgerLine] = []
    for index in range(86_400 // width):
        bucket = OpenAIUsageBucket.model_validate(
            {
                "object": "bucket",
                "start_time": start + index * width,
                "end_time": start + (index + 1) * width,
                "results": [{"object": "organization.usage.vector_stores.result", "usage_bytes": held}],
            }
        )
        found += lines_for("openai", "usage_v1", "org-x", bucket)
    return found


def test_vector_storage_held_for_a_day_costs_a_day_in_any_bucket_width() -> None:
    """``usage_bytes`` is what the stores hold in the bucket (a level, billed per GB and day), not a count of the
    bucket's events: the same gigabyte reported in 24 hourly buckets is 24 times its daily quantity. A price for
    daily buckets must not apply to hourly ones (24 x 2.40 = 57.60 for a day that costs 2.40); hourly buckets
    need a price of their own (``usage_bytes/bucket_width=1h``), and without one they stay unpriced."""
    since = datetime(2020, 1, 1, tzinfo=UTC)
    per_day = Price("openai", "vector_stores", "usage_bytes", Decimal("0.0024"), "USD", since, 1)
    per_hour = Price("openai", "vector_stores", "usage_bytes/bucket_width=1h", Decimal("0.0001"), "USD", since, 2)

    def total(width: int, *prices: Price) -> tuple[Decimal, list[str]]:
        priced = [PriceBook(list(prices), catalogue=False).priced(line) for line in _vector_storage(width, 10**9)]
        unpriced = [line.metadata["unpriced"]["token_type"] for line, ok in priced if not ok]
        return sum((line.amount for line, ok in priced if ok and line.amount is not None), Decimal(0)), unpriced

    assert total(86_400, per_day) == (Decimal("2.40"), [])
    assert total(3_600, per_day) == (Decimal(0), ["usage_bytes/bucket_width=1h"] * 24)
    assert total(3_600, per_day, per_hour) == (Decimal("2.40"), [])
    assert total(60, per_day)[1] == ["usage_bytes/bucket_width=1m"] * 1440


def test_an_imported_override_names_its_dimensions_in_the_order_lines_do(tmp_path: Path) -> None:
    """Lines carry their price dimensions in one order (``service_tier`` before ``context_window``); an override
    imported with them in another order was stored as written and never matched a line (the line stayed unpriced
    and its estimate counted instead of the negotiated price). The import stores the order lines use."""
    path = tmp_path / "prices.csv"
    path.write_text(
        "provider,model,token_type,price_per_million,effective_from\n"
        "anthropic,claude-sonnet-4-5,uncached_input_tokens/context_window=200k-1M/service_tier=batch,3.00,2026-01-01\n",
        encoding="utf-8",
    )
    (row,) = read_csv(path)
    assert row[2] == "uncached_input_tokens/service_tier=batch/context_window=200k-1M"
