"""Provider formats -> ledger lines, without servers: endpoints, the completions partition, reports, and the
typed outcome of results the worker cannot read."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.decode import ProviderMessage, decode_provider_message
from worker.models import OpenAIUsageResult
from worker.providers import (
    COMPLETION_TOKEN_TYPES,
    ENDPOINT_OBJECTS,
    OPENAI_REQUIRED_COUNTS,
    LedgerLine,
    completion_tokens,
)
from worker.quarantine import Quarantined, Reason, Source

SOURCE = Source("cost.provider-buckets", 0, 0)
START = 1_793_491_200  # 2026-11-01T00:00:00Z
CATEGORIES = [name for name, _ in COMPLETION_TOKEN_TYPES]


def decode(results: list[dict[str, Any]], *, endpoint: str | None = None, provider: str = "openai") -> Any:
    envelope: dict[str, Any] = {
        "provider": provider,
        "ai_organization_id": "org-x",
        "api_version": "usage_v1",
        "collected_at": "2026-11-02T00:00:00Z",
        "bucket": {"object": "bucket", "start_time": START, "end_time": START + 86_400, "results": results},
    }
    if endpoint is not None:
        envelope["endpoint"] = endpoint
    return decode_provider_message(json.dumps(envelope).encode(), SOURCE, max_bytes=1 << 20, max_results=1000)


def lines(results: list[dict[str, Any]], **kwargs: Any) -> list[LedgerLine]:
    message = decode(results, **kwargs)
    assert isinstance(message, ProviderMessage), message
    return message.lines


def test_the_issue_example_no_longer_inflates_tokens() -> None:
    """1,000 input and 300 output tokens in today's schema: 1,300 tokens of lines, not 2,900."""
    result = {
        "object": "organization.usage.completions.result",
        "input_tokens": 1000,
        "input_cached_tokens": 200,
        "input_cache_write_tokens": 100,
        "input_uncached_tokens": 700,
        "input_text_tokens": 600,
        "input_audio_tokens": 60,
        "input_image_tokens": 40,
        "input_cached_text_tokens": 200,
        "input_cached_audio_tokens": 0,
        "input_cached_image_tokens": 0,
        "output_tokens": 300,
        "output_text_tokens": 280,
        "output_audio_tokens": 20,
        "output_image_tokens": 0,
        "model": "gpt-4o",
    }
    found = {line.line_item: line.quantity for line in lines([result])}
    assert sum(q for q in found.values() if q is not None) == 1300
    assert found["gpt-4o:input_cache_write_tokens"] == 100
    assert found["gpt-4o:input_text_tokens"] == 600
    assert found["gpt-4o:output_audio_tokens"] == 20


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT_OBJECTS))
def test_reports_follow_the_object_or_the_envelope(endpoint: str) -> None:
    counted = {"model": "m", OPENAI_REQUIRED_COUNTS[endpoint][0]: 1}
    result = {"object": ENDPOINT_OBJECTS[endpoint]} | counted
    assert {line.report for line in lines([result])} == {f"openai.usage.{endpoint}"}
    assert {line.report for line in lines([counted], endpoint=endpoint)} == {f"openai.usage.{endpoint}"}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT_OBJECTS))
def test_a_result_without_its_count_is_no_usage_snapshot(endpoint: str) -> None:
    """Each endpoint's count is required and not nullable (openapi.json). Missing or null, it read as zero: an
    empty snapshot of the window that retired its stored usage (3 dall-e-3 images at 0.04 USD, re-polled with
    "images": null, went from 0.12 USD to 0). It is schema_violation, like Anthropic's result without counts."""
    for count in ({}, dict.fromkeys(OPENAI_REQUIRED_COUNTS[endpoint])):
        result = {"object": ENDPOINT_OBJECTS[endpoint], "model": "m", "num_model_requests": 3} | count
        outcome = decode([result])
        assert isinstance(outcome, Quarantined), (endpoint, count)
        assert outcome.reason is Reason.SCHEMA_VIOLATION, outcome.detail
        assert endpoint in outcome.detail
    # One count is enough for completions: the others are inferred from it.
    assert lines([{"output_tokens": 0}], endpoint="completions")


def test_a_result_without_object_nor_endpoint_is_completions() -> None:
    assert {line.report for line in lines([{"input_tokens": 3}])} == {"openai.usage.completions"}


@pytest.mark.parametrize(
    ("results", "endpoint", "reason", "named"),
    [
        (
            [{"object": "organization.usage.realtime_sessions.result", "sessions": 3}],
            None,
            Reason.UNSUPPORTED_SOURCE,
            "organization.usage.realtime_sessions.result",
        ),
        ([{"input_tokens": 1}], "realtime_sessions", Reason.UNSUPPORTED_SOURCE, "realtime_sessions"),
        (
            [{"object": "organization.usage.images.result", "images": 1}],
            "completions",
            Reason.INCONSISTENT_DATA,
            "images",
        ),
        ([{"input_tokens": 10, "input_cached_tokens": 11}], None, Reason.INCONSISTENT_DATA, "input_cached_tokens"),
        (
            [{"input_tokens": 10, "input_uncached_tokens": 5, "input_cached_tokens": 4, "input_cache_write_tokens": 0}],
            None,
            Reason.INCONSISTENT_DATA,
            "input_tokens = 10",
        ),
        (
            [{"output_tokens": 5, "output_text_tokens": 4, "output_audio_tokens": 2}],
            None,
            Reason.INCONSISTENT_DATA,
            "output_tokens",
        ),
        ([{"input_tokens": -1}], None, Reason.INVALID_AMOUNT, "input_tokens"),
        ([{"object": "organization.usage.images.result", "images": -2}], None, Reason.INVALID_AMOUNT, "images"),
    ],
)
def test_results_the_worker_cannot_read_are_quarantined_by_name(
    results: list[dict[str, Any]], endpoint: str | None, reason: Reason, named: str
) -> None:
    outcome = decode(results, endpoint=endpoint)
    assert isinstance(outcome, Quarantined)
    assert outcome.reason is reason, outcome.detail
    assert named in outcome.detail


def test_non_token_units_keep_their_unit() -> None:
    found = lines(
        [
            {"object": ENDPOINT_OBJECTS["images"], "images": 2, "size": "1024x1024", "source": "image.edit"},
            {"object": ENDPOINT_OBJECTS["audio_speeches"], "characters": 45, "model": "tts-1"},
            {"object": ENDPOINT_OBJECTS["audio_transcriptions"], "seconds": 20, "model": "whisper-1"},
            {"object": ENDPOINT_OBJECTS["vector_stores"], "usage_bytes": 1024},
            {"object": ENDPOINT_OBJECTS["code_interpreter_sessions"], "num_sessions": 1},
            {"object": ENDPOINT_OBJECTS["file_search_calls"], "num_requests": 2},
            {"object": ENDPOINT_OBJECTS["web_search_calls"], "num_requests": 3, "num_model_requests": 2},
        ]
    )
    got: list[tuple[str, Any, str | None, str | None]] = [
        (line.line_item, line.quantity, line.unit, line.price_token_type) for line in found
    ]
    assert got == [
        ("unknown-model:images:1024x1024:image.edit", 2, "images", "images/size=1024x1024/source=image.edit"),
        ("tts-1:characters", 45, "characters", "characters"),
        ("whisper-1:seconds", 20, "seconds", "seconds"),
        ("vector_stores:usage_bytes", 1024, "bytes", "usage_bytes"),
        ("code_interpreter_sessions:sessions", 1, "sessions", "sessions"),
        ("file_search_calls:calls", 2, "calls", "calls"),
        ("unknown-model:web_search_calls", 3, "calls", "web_search_calls"),
    ]


def test_anthropic_price_dimensions_are_in_the_line_item_and_the_price_key() -> None:
    envelope = {
        "provider": "anthropic",
        "ai_organization_id": "anthropic-x",
        "api_version": "usage_v1",
        "collected_at": "2026-11-02T00:00:00Z",
        "bucket": {
            "starting_at": "2026-11-01T00:00:00Z",
            "ending_at": "2026-11-02T00:00:00Z",
            "results": [
                {
                    "uncached_input_tokens": 5,
                    "model": "claude-opus-4-8",
                    "service_tier": "priority",
                    "context_window": "200k-1M",
                    "speed": "fast",
                    "inference_geo": "us",
                }
            ],
        },
    }
    message = decode_provider_message(json.dumps(envelope).encode(), SOURCE, max_bytes=1 << 20, max_results=10)
    assert isinstance(message, ProviderMessage)
    line = message.lines[0]
    assert line.report == "anthropic.usage_report.messages"
    assert line.line_item == "claude-opus-4-8:uncached_input_tokens:priority:200k-1M:fast:us"
    assert line.price_token_type == (
        "uncached_input_tokens/service_tier=priority/context_window=200k-1M/speed=fast/inference_geo=us"
    )


# --- the partition, for any combination of the documented fields -----------------------------------------

_AGGREGATES = ("input_tokens", "input_cached_tokens", "input_uncached_tokens", "output_tokens")


def _documented_fields(truth: dict[str, int]) -> dict[str, int]:
    """Every documented completions field, derived from the true counts per category (the schema's sums)."""
    fields = dict(truth)
    fields["input_uncached_tokens"] = (
        truth["input_text_tokens"] + truth["input_audio_tokens"] + truth["input_image_tokens"]
    )
    fields["input_cached_tokens"] = (
        truth["input_cached_text_tokens"] + truth["input_cached_audio_tokens"] + truth["input_cached_image_tokens"]
    )
    fields["input_tokens"] = (
        fields["input_uncached_tokens"] + fields["input_cached_tokens"] + truth["input_cache_write_tokens"]
    )
    fields["output_tokens"] = truth["output_text_tokens"] + truth["output_audio_tokens"] + truth["output_image_tokens"]
    return fields


token_counts = st.integers(min_value=0, max_value=10**12)


@settings(max_examples=300, deadline=None)
@given(
    truth=st.fixed_dictionaries(dict.fromkeys(CATEGORIES, token_counts)),
    dropped=st.sets(st.sampled_from([*CATEGORIES, "input_cached_tokens", "input_uncached_tokens"])),
)
def test_token_lines_partition_input_plus_output(truth: dict[str, int], dropped: set[str]) -> None:
    fields = _documented_fields(truth)
    # input_tokens and output_tokens are required by the schema; any other field may be missing.
    present = set(fields) - dropped
    result = OpenAIUsageResult.model_validate({name: fields[name] for name in present})
    split = completion_tokens(result)
    assert sum(split.values()) == fields["input_tokens"] + fields["output_tokens"]
    assert all(count >= 0 for count in split.values())
    for name in CATEGORIES:  # a reported category keeps its count
        if name in present:
            assert split[name] == fields[name]
    groups = {
        "input_uncached_tokens": CATEGORIES[0:3],
        "input_cached_tokens": CATEGORIES[3:6],
        "output_tokens": CATEGORIES[7:10],
    }
    for total, names in groups.items():  # a reported total is its categories' sum
        if total in present:
            assert sum(split[name] for name in names) == fields[total]
    if not dropped:
        assert split == truth  # every category exactly


def test_aggregates_are_documented_fields() -> None:
    assert set(_AGGREGATES) <= set(OpenAIUsageResult.model_fields)
    assert set(CATEGORIES) <= set(OpenAIUsageResult.model_fields)
    assert Decimal(0) == 0


def test_fields_the_worker_does_not_know_are_ignored_never_priced_twice() -> None:
    """A newer breakdown (``input_video_tokens``, say) is part of input_tokens already: no line of its own."""
    found = lines([{"input_tokens": 10, "input_video_tokens": 4, "output_tokens": 2, "model": "gpt-4o"}])
    assert sum(line.quantity or 0 for line in found) == 12
    assert not any("video" in line.line_item for line in found)


def _anthropic(api_version: str, results: list[dict[str, Any]]) -> Any:
    envelope = {
        "provider": "anthropic",
        "ai_organization_id": "org-x",
        "api_version": api_version,
        "collected_at": "2026-11-02T00:00:00Z",
        "bucket": {"starting_at": "2026-11-01T00:00:00Z", "ending_at": "2026-11-02T00:00:00Z", "results": results},
    }
    return decode_provider_message(json.dumps(envelope).encode(), SOURCE, max_bytes=1 << 20, max_results=1000)


def test_an_anthropic_cost_result_under_usage_v1_is_no_usage_snapshot() -> None:
    """Every usage field of Anthropic's usage result has a default (older results leave some out), so a cost report
    result sent as usage_v1 decoded as a result of zero tokens: an empty snapshot of the messages usage window that
    retired its real usage lines (the money vanished). A result with no usage count at all is no usage result."""
    cost = {"currency": "USD", "amount": "123.45", "workspace_id": "w", "model": "claude-sonnet-4"}
    outcome = _anthropic("usage_v1", [cost, {"model": "claude-sonnet-4", "output_tokens": 5}])
    assert isinstance(outcome, Quarantined)
    assert outcome.reason is Reason.SCHEMA_VIOLATION, outcome.detail
    assert "bucket 0" in outcome.detail
    # A usage result that reports any of its counts is read as before (an absent count is zero)
    present: list[dict[str, Any]] = [
        {"uncached_input_tokens": 0},
        {"output_tokens": 3},
        {"cache_creation": {}},
        {"server_tool_use": {}},
    ]
    for counts in present:
        assert isinstance(_anthropic("usage_v1", [{"model": "m"} | counts]), ProviderMessage), counts


def test_an_anthropic_cost_amount_is_read_in_its_currencys_lowest_unit() -> None:
    """The cost report's ``amount`` is "in lowest currency units (e.g. cents) as a decimal string": cents for USD
    ("123.45" is $1.2345), but the lowest unit of JPY is the yen and of KWD the fils (a thousandth). Divided by 100
    whatever the currency, 500 JPY counted 5 and 1234 fils 12.34 KWD instead of 1.234. A currency without a minor
    unit (gold, XAU) has no lowest unit to read the amount in: it is refused, not guessed."""
    read = {}
    for currency, amount in (("USD", "123.45"), ("JPY", "500"), ("KWD", "1234"), ("CLF", "12345"), ("EUR", "7")):
        outcome = _anthropic("costs_v1", [{"currency": currency, "amount": amount, "workspace_id": "w"}])
        assert isinstance(outcome, ProviderMessage), outcome
        [line] = outcome.lines
        read[currency] = (line.currency, line.amount)
    assert read == {
        "USD": ("USD", Decimal("1.2345")),
        "JPY": ("JPY", Decimal(500)),
        "KWD": ("KWD", Decimal("1.234")),
        "CLF": ("CLF", Decimal("1.2345")),
        "EUR": ("EUR", Decimal("0.07")),
    }
    refused = _anthropic("costs_v1", [{"currency": "XAU", "amount": "1", "workspace_id": "w"}])
    assert isinstance(refused, Quarantined)
    assert refused.reason is Reason.UNKNOWN_CURRENCY, refused.detail


@pytest.mark.parametrize("api_version", ["costs_v1", "usage_v1"])
def test_the_analytics_api_shape_is_refused_not_read_as_zero(api_version: str) -> None:
    """Anthropic's Usage and Cost Analytics API (beta; https://platform.claude.com/docs/en/manage-claude/
    usage-cost-analytics-api, ``GET /v1/organizations/analytics/cost``) returns rows of ``cost`` (in fractional
    cents) and ``group``, without ``results``: the worker does not read it, and says so."""
    row = {
        "starting_at": "2026-11-01T00:00:00Z",
        "ending_at": "2026-11-02T00:00:00Z",
        "cost": {"amount": "123.45", "currency": "USD"},
        "group": {"model": "claude-sonnet-4-5", "workspace_id": "wrkspc_01"},
    }
    envelope = {
        "provider": "anthropic",
        "ai_organization_id": "anthropic-x",
        "api_version": api_version,
        "collected_at": "2026-11-02T00:00:00Z",
        "page": {"data": [row], "has_more": False, "next_page": None},
    }
    outcome = decode_provider_message(json.dumps(envelope).encode(), SOURCE, max_bytes=1 << 20, max_results=10)
    assert isinstance(outcome, Quarantined)
    assert outcome.reason is Reason.SCHEMA_VIOLATION
    assert "results" in outcome.detail


def test_a_documented_page_of_minute_buckets_is_read_whatever_its_buckets_add_up_to() -> None:
    """OpenAI documents ``bucket_width=1m`` with up to 1,440 buckets a page
    (https://platform.openai.com/docs/api-reference/usage/vector_stores). A vector store holding 700 GB reports
    7e11 bytes in each: no row ever holds more than one bucket's lines, but the page's quantities add up to
    1.008e15, and a bound on the whole message's total quarantined the day as ``invalid_number``."""
    held = 700 * 10**9
    buckets = [
        {
            "object": "bucket",
            "start_time": START + 60 * minute,
            "end_time": START + 60 * (minute + 1),
            "results": [{"object": ENDPOINT_OBJECTS["vector_stores"], "usage_bytes": held}],
        }
        for minute in range(1440)
    ]
    envelope = {
        "provider": "openai",
        "ai_organization_id": "org-x",
        "api_version": "usage_v1",
        "collected_at": "2026-11-02T00:00:00Z",
        "endpoint": "vector_stores",
        "page": {"object": "page", "data": buckets, "has_more": False, "next_page": None},
    }
    message = decode_provider_message(json.dumps(envelope).encode(), SOURCE, max_bytes=1 << 22, max_results=50_000)
    assert isinstance(message, ProviderMessage), message
    assert len(message.lines) == 1440
    assert sum(line.quantity or 0 for line in message.lines) == 1440 * held


def test_one_buckets_lines_still_may_not_add_up_past_the_bound() -> None:
    """The bound stays where lines do add up: the results of one bucket may sum into one row."""
    outcome = decode(
        [
            {"object": ENDPOINT_OBJECTS["vector_stores"], "usage_bytes": 6 * 10**14, "project_id": "proj_a"},
            {"object": ENDPOINT_OBJECTS["vector_stores"], "usage_bytes": 6 * 10**14, "project_id": "proj_b"},
        ]
    )
    assert isinstance(outcome, Quarantined)
    assert outcome.reason is Reason.INVALID_NUMBER, outcome.detail
