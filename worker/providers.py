"""Provider buckets -> ledger lines: one place that knows each provider's format.

Every line names its *report* (``LedgerLine.report``): ``openai.costs``, ``openai.usage.<endpoint>``,
``anthropic.cost_report``, ``anthropic.usage_report.messages``.

Costs (``costs_v1``): one line per result, the provider's amount converted exactly (Anthropic reports a
decimal string in the currency's lowest unit: cents of USD); every dimension the provider reports (model, token
type, context window, service tier, speed, inference geo) is kept, in the line item and the metadata, as reported.

Usage (``usage_v1``): lines of deterministic ``line_item`` such as ``gpt-4o:input_text_tokens`` or
``claude-sonnet-4:uncached_input_tokens:batch:0-200k``; the amount is filled in later (``pricing.py``).
OpenAI's Usage API has one endpoint per kind of usage, told apart by the result's ``object``
(``ENDPOINT_OBJECTS``; the source of truth is ``openapi.json`` of openai/openai-openapi):

- completions: the token lines *partition* ``input_tokens + output_tokens``, every token in exactly one
  category (``COMPLETION_TOKEN_TYPES``): per the field descriptions, input = uncached + cached + cache write,
  uncached = text + audio + image, cached = text + audio + image, output = text + audio + image. A breakdown
  the result does not report is the remainder of its total; a breakdown that does not add up is
  ``inconsistent_data``. Fields the worker does not know are ignored (they would count tokens twice).
- embeddings, moderations: ``input_tokens``; images: ``images`` per model, size and source; audio speeches:
  ``characters``; audio transcriptions: ``seconds``; vector stores: ``usage_bytes``; code interpreter:
  ``sessions``; file search and web search: ``calls``.
- a result ``object`` the worker does not know is ``unsupported_source`` (never stored as zero).

Anthropic's token fields are already disjoint; ``cache_creation.ephemeral_1h_input_tokens`` becomes
``cache_creation_1h_input_tokens`` (5m likewise), and web searches are a ``web_search_requests`` line.

The price key is ``(provider, model, token type)``, where the token type carries every non-default price
dimension as ``/name=value`` in the order of ``PRICE_DIMENSIONS``: ``output_tokens``,
``uncached_input_tokens/service_tier=batch/context_window=200k-1M``, ``images/size=1024x1024/source=image.edit``,
``usage_bytes/bucket_width=1h`` (vector storage is a level held through the bucket: ``LEVEL_ENDPOINTS``).
(OpenAI's ``batch`` is the tier ``batch``.) ``LedgerLine.price_unit`` and ``price_dimensions`` tell the
catalogue the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from worker.errors import InvalidInput
from worker.limits import EXACT
from worker.models import (
    AnthropicCostBucket,
    AnthropicUsageBucket,
    AnthropicUsageResult,
    OpenAICostBucket,
    OpenAIUsageBucket,
    OpenAIUsageResult,
    minor_unit_digits,
)
from worker.quarantine import Reason

ALL_LINE_ITEMS = "all"  # line_item of a cost result the provider did not group by line item
UNKNOWN_MODEL = "unknown-model"  # usage results not grouped by model
TOKENS = "tokens"
REQUESTS = "requests"

# --- reports ----------------------------------------------------------------------------------------------
OPENAI_COSTS = "openai.costs"
OPENAI_USAGE = "openai.usage."  # + the endpoint
ANTHROPIC_COSTS = "anthropic.cost_report"
ANTHROPIC_USAGE = "anthropic.usage_report.messages"
OPENAI_DEFAULT_USAGE_ENDPOINT = "completions"  # a usage bucket with no results and no envelope endpoint

# Usage API endpoint -> the ``object`` of its results (openapi.json, components.schemas.Usage*Result).
ENDPOINT_OBJECTS: dict[str, str] = {
    "completions": "organization.usage.completions.result",
    "embeddings": "organization.usage.embeddings.result",
    "moderations": "organization.usage.moderations.result",
    "images": "organization.usage.images.result",
    "audio_speeches": "organization.usage.audio_speeches.result",
    "audio_transcriptions": "organization.usage.audio_transcriptions.result",
    "vector_stores": "organization.usage.vector_stores.result",
    "code_interpreter_sessions": "organization.usage.code_interpreter_sessions.result",
    "file_search_calls": "organization.usage.file_searches.result",
    "web_search_calls": "organization.usage.web_searches.result",
}
OBJECT_ENDPOINTS = {obj: endpoint for endpoint, obj in ENDPOINT_OBJECTS.items()}

# --- price dimensions -------------------------------------------------------------------------------------
PRICE_DIMENSIONS = ("service_tier", "context_window", "speed", "inference_geo", "size", "source", "bucket_width")
# Values that price like the dimension's absence.
DEFAULT_DIMENSION_VALUES: dict[str, frozenset[str]] = {
    "service_tier": frozenset({"default", "standard", "auto"}),
    "context_window": frozenset({"0-200k"}),
    "speed": frozenset({"standard"}),
    "inference_geo": frozenset({"global", "not_available"}),
    "size": frozenset(),  # images: each size and source has its own price
    "source": frozenset(),
    "bucket_width": frozenset({"1d"}),  # levels (vector store bytes): a price is per bucket of this width
}
# Usage API endpoints whose count is a level held through the bucket (bytes stored), not a count of the bucket's
# events: priced per bucket, so the bucket's width is a price dimension (``bucket_width``). Their price (billed
# per GB and day) is per daily bucket; an hourly bucket holding as much is a 24th of it, and needs a price of its
# own rather than the daily one 24 times a day.
LEVEL_ENDPOINTS = frozenset({"vector_stores"})

# Completions token categories: (line token type, genai-prices usage key). Their quantities partition
# input_tokens + output_tokens.
COMPLETION_TOKEN_TYPES: tuple[tuple[str, str], ...] = (
    ("input_text_tokens", "input_text_tokens"),
    ("input_audio_tokens", "input_audio_tokens"),
    ("input_image_tokens", "input_image_tokens"),
    ("input_cached_text_tokens", "cache_text_read_tokens"),
    ("input_cached_audio_tokens", "cache_audio_read_tokens"),
    ("input_cached_image_tokens", "cache_image_read_tokens"),
    ("input_cache_write_tokens", "cache_write_tokens"),
    ("output_text_tokens", "output_text_tokens"),
    ("output_audio_tokens", "output_audio_tokens"),
    ("output_image_tokens", "output_image_tokens"),
)
ANTHROPIC_TOKEN_UNITS = {
    "uncached_input_tokens": "input_tokens",
    "cache_read_input_tokens": "cache_read_tokens",
    "cache_creation_1h_input_tokens": "cache_write_1h_tokens",
    "cache_creation_5m_input_tokens": "cache_write_5m_tokens",
    "output_tokens": "output_tokens",
    "web_search_requests": "web_searches",
}
# Every token type (or other unit's name) of each provider -> the genai-prices usage key it is priced by (None:
# the catalogue has no price for it; an override can give one).
TOKEN_TYPE_UNITS: dict[str, dict[str, str | None]] = {
    "openai": {
        **dict(COMPLETION_TOKEN_TYPES),
        "input_tokens": "input_tokens",
        "images": None,
        "characters": "input_characters",
        "seconds": "audio_seconds",
        "usage_bytes": None,
        "sessions": None,
        "calls": "storage_searches",
        "web_search_calls": "web_searches",
    },
    "anthropic": dict(ANTHROPIC_TOKEN_UNITS),
}


@dataclass(slots=True)
class LedgerLine:
    """One provider line before attribution (provider ids) and, for usage, before pricing."""

    provider: str
    ai_organization_id: str
    ai_project_id: str | None
    api_version: str
    bucket_start: datetime
    bucket_end: datetime
    line_item: str
    currency: str
    amount: Decimal | None
    quantity: Decimal | None
    unit: str | None
    price_model: str | None = None  # usage only: what model_prices is looked up by
    price_token_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    report: str = ""  # the provider endpoint this line is a snapshot of (``report_of``)
    outside_cost_report: bool = False  # usage the provider's cost report omits: never replaced by cost rows
    price_unit: str | None = None  # the genai-prices usage key the catalogue prices the line by
    price_dimensions: tuple[tuple[str, str], ...] = ()  # non-default price dimensions, PRICE_DIMENSIONS order
    # The input tokens of the result's average request (its input tokens over its request count, rounded up), where
    # the result counts its requests and reports no context window (OpenAI completions): the tier of a price tiered
    # by context length that such a request reaches (``pricing``).
    request_input_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Count:
    """One usage quantity of a result: its token type (or other unit's name), unit and catalogue key."""

    token_type: str
    quantity: int
    unit: str
    price_unit: str | None


# Anthropic documents that its cost report (GET /v1/organizations/cost_report) leaves Priority Tier costs out
# (they are billed differently); Priority Tier usage is tracked through the usage report instead. Source: the
# "Usage and Cost API" guide, https://platform.claude.com/docs/en/manage-claude/usage-cost-api (formerly
# https://docs.anthropic.com/en/api/usage-cost-api). So usage of that tier counts even where the cost report covers
# its hours, and it counts once: the cost report never holds it.
ANTHROPIC_TIERS_OUTSIDE_COST_REPORT = frozenset({"priority"})


def report_of(provider: str, api_version: str, endpoint: str | None = None) -> str:
    """The report a bucket of this provider and API version (and OpenAI usage endpoint) is a snapshot of."""
    if provider == "openai":
        if api_version == "costs_v1":
            return OPENAI_COSTS
        return OPENAI_USAGE + (endpoint or OPENAI_DEFAULT_USAGE_ENDPOINT)
    return ANTHROPIC_COSTS if api_version == "costs_v1" else ANTHROPIC_USAGE


def window_of(bucket: BaseModel) -> tuple[datetime, datetime]:
    """The window of a validated bucket (any of the four formats)."""
    if isinstance(bucket, OpenAICostBucket | OpenAIUsageBucket):
        return bucket.start_time, bucket.end_time
    if isinstance(bucket, AnthropicCostBucket | AnthropicUsageBucket):
        return bucket.starting_at, bucket.ending_at
    raise TypeError(f"no window for {type(bucket).__name__}")  # pragma: no cover - models change together


def bucket_reports(provider: str, api_version: str, lines: list[LedgerLine], endpoint: str | None) -> list[str]:
    """The reports a bucket is a snapshot of: those of its lines, or (no lines) the envelope's endpoint's."""
    found = sorted({line.report for line in lines})
    return found or [report_of(provider, api_version, endpoint)]


def _inconsistent(message: str) -> InvalidInput:
    return InvalidInput(Reason.INCONSISTENT_DATA, message)


def lines_for(
    provider: str, api_version: str, ai_organization_id: str, bucket: BaseModel, endpoint: str | None = None
) -> Iterator[LedgerLine]:
    """The ledger lines of one validated bucket (any of the four formats); ``endpoint`` is the envelope's."""
    if isinstance(bucket, OpenAICostBucket):
        for cost in bucket.results:
            yield LedgerLine(
                provider=provider,
                ai_organization_id=ai_organization_id,
                ai_project_id=cost.project_id,
                api_version=api_version,
                bucket_start=bucket.start_time,
                bucket_end=bucket.end_time,
                line_item=cost.line_item or ALL_LINE_ITEMS,
                currency=cost.amount.currency,
                amount=cost.amount.value,
                quantity=cost.quantity,
                unit=cost.quantity_unit,
                metadata=_present(api_key_id=cost.api_key_id),
                report=OPENAI_COSTS,
            )
    elif isinstance(bucket, AnthropicCostBucket):
        for charge in bucket.results:
            yield LedgerLine(
                provider=provider,
                ai_organization_id=ai_organization_id,
                ai_project_id=charge.workspace_id,
                api_version=api_version,
                bucket_start=bucket.starting_at,
                bucket_end=bucket.ending_at,
                line_item=charge.description
                or _join(
                    charge.model,
                    charge.cost_type,
                    charge.token_type,
                    charge.context_window,
                    _tier(charge.service_tier),
                    charge.speed,
                    charge.inference_geo,
                )
                or ALL_LINE_ITEMS,
                currency=charge.currency,
                # the lowest unit (cents of USD, yen, fils of KWD) -> units, exact (only the exponent changes)
                amount=charge.amount.scaleb(-minor_unit_digits(charge.currency), EXACT),
                quantity=None,
                unit=None,
                metadata=_present(
                    model=charge.model,
                    cost_type=charge.cost_type,
                    token_type=charge.token_type,
                    context_window=charge.context_window,
                    service_tier=charge.service_tier,
                    speed=charge.speed,
                    inference_geo=charge.inference_geo,
                ),
                report=ANTHROPIC_COSTS,
            )
    elif isinstance(bucket, OpenAIUsageBucket):
        if endpoint is not None and endpoint not in ENDPOINT_OBJECTS:
            raise InvalidInput(Reason.UNSUPPORTED_SOURCE, f"unknown usage endpoint {endpoint[:64]}")
        for counted in bucket.results:
            name = _endpoint_of(counted, endpoint)
            tier = "batch" if counted.batch else _tier(counted.service_tier)
            yield from _usage_lines(
                provider,
                api_version,
                ai_organization_id,
                bucket.start_time,
                bucket.end_time,
                report=OPENAI_USAGE + name,
                project=counted.project_id,
                model=_openai_model(name, counted),
                suffixes=(*_openai_suffixes(name, counted), tier),
                dimensions=_dimensions(
                    service_tier=tier,
                    size=counted.size,
                    source=counted.source,
                    bucket_width=_width(bucket.start_time, bucket.end_time) if name in LEVEL_ENDPOINTS else None,
                ),
                counts=(counts := openai_counts(name, counted)),
                outside_cost_report=False,
                request_input_tokens=_average_request_input(name, counted, counts),
                metadata=_present(
                    user_id=counted.user_id,
                    api_key_id=counted.api_key_id,
                    batch=counted.batch,
                    service_tier=counted.service_tier,
                    num_model_requests=counted.num_model_requests or None,
                    size=counted.size,
                    source=counted.source,
                    vector_store_id=counted.vector_store_id,
                    context_level=counted.context_level,
                ),
            )
    elif isinstance(bucket, AnthropicUsageBucket):
        for tally in bucket.results:
            yield from _usage_lines(
                provider,
                api_version,
                ai_organization_id,
                bucket.starting_at,
                bucket.ending_at,
                report=ANTHROPIC_USAGE,
                project=tally.workspace_id,
                model=tally.model or UNKNOWN_MODEL,
                suffixes=(_tier(tally.service_tier), tally.context_window, tally.speed, tally.inference_geo),
                dimensions=_dimensions(
                    service_tier=tally.service_tier,
                    context_window=tally.context_window,
                    speed=tally.speed,
                    inference_geo=tally.inference_geo,
                ),
                counts=anthropic_counts(tally),
                outside_cost_report=(tally.service_tier or "").lower() in ANTHROPIC_TIERS_OUTSIDE_COST_REPORT,
                metadata=_present(
                    api_key_id=tally.api_key_id,
                    service_tier=tally.service_tier,
                    context_window=tally.context_window,
                    speed=tally.speed,
                    inference_geo=tally.inference_geo,
                    account_id=tally.account_id,
                    service_account_id=tally.service_account_id,
                ),
            )
    else:  # pragma: no cover - BUCKET_MODELS and this function change together
        raise TypeError(f"no ledger mapping for {type(bucket).__name__}")


def _endpoint_of(result: OpenAIUsageResult, envelope_endpoint: str | None) -> str:
    if result.object is None:
        return envelope_endpoint or OPENAI_DEFAULT_USAGE_ENDPOINT
    name = OBJECT_ENDPOINTS.get(result.object)
    if name is None:
        raise InvalidInput(Reason.UNSUPPORTED_SOURCE, f"unknown usage result object {result.object}")
    if envelope_endpoint is not None and name != envelope_endpoint:
        raise _inconsistent(f"a {result.object} in a bucket of the {envelope_endpoint} endpoint")
    return name


def _openai_model(endpoint: str, result: OpenAIUsageResult) -> str:
    if endpoint in ("vector_stores", "code_interpreter_sessions", "file_search_calls"):
        return endpoint  # not per model: the tool is what is priced
    return result.model or UNKNOWN_MODEL


def _openai_suffixes(endpoint: str, result: OpenAIUsageResult) -> tuple[str | None, ...]:
    if endpoint == "images":
        return (result.size, result.source)
    if endpoint == "web_search_calls":
        return (result.context_level,)
    if endpoint == "file_search_calls":
        return (result.vector_store_id,)
    return ()


def _usage_lines(
    provider: str,
    api_version: str,
    ai_organization_id: str,
    start: datetime,
    end: datetime,
    *,
    report: str,
    project: str | None,
    model: str,
    suffixes: tuple[str | None, ...],
    dimensions: tuple[tuple[str, str], ...],
    counts: list[Count],
    metadata: dict[str, Any],
    outside_cost_report: bool,
    request_input_tokens: int | None = None,
) -> Iterator[LedgerLine]:
    qualifier = "".join(f"/{name}={value}" for name, value in dimensions)
    for count in counts:
        yield LedgerLine(
            provider=provider,
            ai_organization_id=ai_organization_id,
            ai_project_id=project,
            api_version=api_version,
            bucket_start=start,
            bucket_end=end,
            line_item=":".join(part for part in (model, count.token_type, *suffixes) if part),
            currency="USD",
            amount=None,
            quantity=Decimal(count.quantity),
            unit=count.unit,
            price_model=model,
            price_token_type=count.token_type + qualifier,
            metadata=dict(metadata),
            report=report,
            price_unit=count.price_unit,
            price_dimensions=dimensions,
            outside_cost_report=outside_cost_report,
            request_input_tokens=request_input_tokens,
        )


def _average_request_input(endpoint: str, result: OpenAIUsageResult, counts: list[Count]) -> int | None:
    """The input tokens of a completions result's average request, rounded up (a total above requests x a tier's
    start proves requests past it), or None without a request count."""
    if endpoint != "completions" or not result.num_model_requests:
        return None
    inputs = sum(count.quantity for count in counts if count.token_type.startswith("input_"))
    return -(-inputs // result.num_model_requests)


# The count each Usage API endpoint's result must report (openapi.json: required, not nullable). A result without
# it is no usage result: read as zero it would be an empty snapshot of its window, retiring the usage stored for
# it. A completions result needs one of its token counts (missing breakdowns are inferred from the others).
OPENAI_REQUIRED_COUNTS: dict[str, tuple[str, ...]] = {
    "completions": (
        "input_tokens",
        "output_tokens",
        "input_cached_tokens",
        "input_cache_write_tokens",
        "input_uncached_tokens",
        *(name for name, _ in COMPLETION_TOKEN_TYPES if name != "input_cache_write_tokens"),
    ),
    "embeddings": ("input_tokens",),
    "moderations": ("input_tokens",),
    "images": ("images",),
    "audio_speeches": ("characters",),
    "audio_transcriptions": ("seconds",),
    "vector_stores": ("usage_bytes",),
    "code_interpreter_sessions": ("num_sessions",),
    "file_search_calls": ("num_requests",),
    "web_search_calls": ("num_requests",),
}


def openai_counts(endpoint: str, result: OpenAIUsageResult) -> list[Count]:
    """The quantities of one Usage API result of the given endpoint (``schema_violation`` without its count)."""
    required = OPENAI_REQUIRED_COUNTS[endpoint]
    if all(getattr(result, name) is None for name in required):
        wanted = "any token count" if endpoint == "completions" else required[0]
        raise InvalidInput(Reason.SCHEMA_VIOLATION, f"a {endpoint} usage result without {wanted} (missing or null)")
    if endpoint == "completions":
        split = completion_tokens(result)
        return [Count(name, split[name], TOKENS, unit) for name, unit in COMPLETION_TOKEN_TYPES]
    if endpoint in ("embeddings", "moderations"):
        return [Count("input_tokens", result.input_tokens or 0, TOKENS, "input_tokens")]
    if endpoint == "images":
        return [Count("images", result.images or 0, "images", None)]
    if endpoint == "audio_speeches":
        return [Count("characters", result.characters or 0, "characters", "input_characters")]
    if endpoint == "audio_transcriptions":
        return [Count("seconds", result.seconds or 0, "seconds", "audio_seconds")]
    if endpoint == "vector_stores":
        return [Count("usage_bytes", result.usage_bytes or 0, "bytes", None)]
    if endpoint == "code_interpreter_sessions":
        return [Count("sessions", result.num_sessions or 0, "sessions", None)]
    if endpoint == "file_search_calls":
        return [Count("calls", result.num_requests or 0, "calls", "storage_searches")]
    assert endpoint == "web_search_calls", endpoint
    return [Count("web_search_calls", result.num_requests or 0, "calls", "web_searches")]


def completion_tokens(result: OpenAIUsageResult) -> dict[str, int]:
    """Completions tokens by category (``COMPLETION_TOKEN_TYPES``), adding up to input + output exactly.

    Reported fields keep their values. What the result leaves out is inferred from the schema's sums: the
    uncached group (else the cached group, else the cache writes) takes what input_tokens has beyond the
    rest, and within a group the first unreported part (text first) takes what its total has beyond the
    reported parts; other unreported parts are zero. Sums that cannot hold are ``inconsistent_data``.
    """
    uncached_parts = (result.input_text_tokens, result.input_audio_tokens, result.input_image_tokens)
    cached_parts = (result.input_cached_text_tokens, result.input_cached_audio_tokens, result.input_cached_image_tokens)
    # input = uncached + cached + cache write; a group's total is known if reported or if all its parts are
    slots = [
        _total(result.input_uncached_tokens, uncached_parts),
        _total(result.input_cached_tokens, cached_parts),
        result.input_cache_write_tokens,
    ]
    floors = [_known(uncached_parts), _known(cached_parts), 0]
    missing = [index for index, value in enumerate(slots) if value is None]
    for index in missing[1:] if result.input_tokens is not None else missing:
        slots[index] = floors[index]
    known = [value for value in slots if value is not None]
    if result.input_tokens is not None and missing:
        if sum(known) > result.input_tokens:
            raise _inconsistent(
                f"input_cached_tokens + input_cache_write_tokens + input_uncached_tokens (as reported or summed "
                f"from their parts) exceed input_tokens ({sum(known)} > {result.input_tokens})"
            )
        slots[missing[0]] = result.input_tokens - sum(known)
    elif result.input_tokens is not None and sum(known) != result.input_tokens:
        raise _inconsistent(
            f"input_uncached_tokens + input_cached_tokens + input_cache_write_tokens = {sum(known)}, "
            f"but input_tokens = {result.input_tokens}"
        )
    uncached_total, cached_total, write = slots
    assert write is not None
    uncached = _group("input_uncached_tokens", uncached_total, uncached_parts)
    cached = _group("input_cached_tokens", cached_total, cached_parts)
    output = _group(
        "output_tokens",
        result.output_tokens,
        (result.output_text_tokens, result.output_audio_tokens, result.output_image_tokens),
    )
    return dict(zip([name for name, _ in COMPLETION_TOKEN_TYPES], (*uncached, *cached, write, *output), strict=True))


def _total(total: int | None, parts: tuple[int | None, ...]) -> int | None:
    if total is not None:
        return total
    return None if any(part is None for part in parts) else sum(part for part in parts if part is not None)


def _known(parts: tuple[int | None, ...]) -> int:
    return sum(part for part in parts if part is not None)


def _group(name: str, total: int | None, parts: tuple[int | None, ...]) -> tuple[int, ...]:
    """A group's parts given its total: the first unreported part is the remainder, other unreported ones zero;
    with no total, the reported parts are all there is."""
    known = sum(part for part in parts if part is not None)
    if total is None:
        return tuple(part or 0 for part in parts)
    missing = [index for index, part in enumerate(parts) if part is None]
    if not missing:
        if known != total:
            raise _inconsistent(f"the parts of {name} add up to {known}, but {name} = {total}")
        return tuple(part or 0 for part in parts)
    if known > total:
        raise _inconsistent(f"the reported parts of {name} exceed it ({known} > {total})")
    resolved = [part or 0 for part in parts]
    resolved[missing[0]] = total - known
    return tuple(resolved)


def anthropic_counts(usage: AnthropicUsageResult) -> list[Count]:
    creation = usage.cache_creation
    counts = [
        Count("uncached_input_tokens", usage.uncached_input_tokens, TOKENS, "input_tokens"),
        Count("cache_read_input_tokens", usage.cache_read_input_tokens, TOKENS, "cache_read_tokens"),
        Count(
            "cache_creation_1h_input_tokens",
            creation.ephemeral_1h_input_tokens if creation else 0,
            TOKENS,
            "cache_write_1h_tokens",
        ),
        Count(
            "cache_creation_5m_input_tokens",
            creation.ephemeral_5m_input_tokens if creation else 0,
            TOKENS,
            "cache_write_5m_tokens",
        ),
        Count("output_tokens", usage.output_tokens, TOKENS, "output_tokens"),
    ]
    if usage.server_tool_use is not None:
        counts.append(Count("web_search_requests", usage.server_tool_use.web_search_requests, REQUESTS, "web_searches"))
    return counts


def _dimensions(**values: str | None) -> tuple[tuple[str, str], ...]:
    """The non-default price dimensions, in PRICE_DIMENSIONS order."""
    found = []
    for name in PRICE_DIMENSIONS:
        value = values.get(name)
        if value is not None and value.lower() not in DEFAULT_DIMENSION_VALUES[name]:
            found.append((name, value))
    return tuple(found)


def _width(start: datetime, end: datetime) -> str:
    """A bucket's width as the Usage API's ``bucket_width`` names it (``1d``, ``1h``, ``1m``; else in seconds)."""
    seconds = int((end - start).total_seconds())
    for unit, length in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % length == 0:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


def _tier(service_tier: str | None) -> str | None:
    if service_tier is None or service_tier.lower() in DEFAULT_DIMENSION_VALUES["service_tier"]:
        return None
    return service_tier


def _join(*parts: str | None) -> str:
    return " / ".join(part for part in parts if part)


def _present(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}
