"""Provider buckets -> ledger lines: one place that knows each provider's format.

Costs (``costs_v1``): one line per result, the provider's amount converted exactly (Anthropic reports a
decimal string in cents). Usage (``usage_v1``): one line per model and token type, with a deterministic
``line_item`` such as ``gpt-4o:input_uncached_tokens`` or ``claude-sonnet-4:output_tokens:batch``; the amount
is filled in later from ``model_prices`` (``pricing.py``).

Token types are disjoint, so that pricing each line never counts a token twice:
- OpenAI reports ``input_tokens`` *including* cached tokens; the worker stores ``input_uncached_tokens`` =
  input_tokens - input_cached_tokens, next to ``input_cached_tokens``. Audio tokens are reported apart from
  text tokens and stay as they are. Newer ``*_tokens`` fields are kept as reported.
- Anthropic's fields are already disjoint; ``cache_creation.ephemeral_1h_input_tokens`` becomes
  ``cache_creation_1h_input_tokens`` (5m likewise), and web searches are a ``web_search_requests`` line.
The price key is ``(provider, model, token_type)``, where a non-default tier (OpenAI ``batch``, a service
tier) prefixes the token type: ``batch/input_uncached_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Context, Decimal
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticCustomError

from worker.models import (
    AnthropicCostBucket,
    AnthropicUsageBucket,
    AnthropicUsageResult,
    OpenAICostBucket,
    OpenAIUsageBucket,
    OpenAIUsageResult,
)
from worker.quarantine import Reason

ALL_LINE_ITEMS = "all"  # line_item of a cost result the provider did not group by line item
UNKNOWN_MODEL = "unknown-model"  # usage results not grouped by model
DEFAULT_TIERS = frozenset({"default", "standard", "auto"})
TOKENS = "tokens"
REQUESTS = "requests"
# Decimal arithmetic rounds to the context's precision (28 digits by default); money has up to 46 (12 whole
# digits, 34 decimal places), so exact operations on it get a context wide enough never to round.
EXACT = Context(prec=60)


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


# Reports: one provider endpoint each. A bucket is a snapshot of one report over one window.
OPENAI_COSTS = "openai.costs"
OPENAI_USAGE = "openai.usage."  # + the Usage API endpoint: completions, embeddings, images, ...
OPENAI_DEFAULT_USAGE_ENDPOINT = "completions"
ANTHROPIC_COSTS = "anthropic.cost_report"
ANTHROPIC_USAGE = "anthropic.usage_report.messages"
# Anthropic documents that its cost report (GET /v1/organizations/cost_report) leaves Priority Tier costs out
# (they are billed differently); Priority Tier usage is tracked through the usage report instead. Source: the
# "Usage and Cost API" guide, https://platform.claude.com/docs/en/manage-claude/usage-cost-api (formerly
# https://docs.anthropic.com/en/api/usage-cost-api). So usage of that tier counts even where the cost report covers
# its hours, and it counts once: the cost report never holds it.
ANTHROPIC_TIERS_OUTSIDE_COST_REPORT = frozenset({"priority"})


def report_of(provider: str, api_version: str, endpoint: str | None = None) -> str:
    """The report a bucket of this provider and API version is a snapshot of."""
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


def _inconsistent(message: str) -> PydanticCustomError:
    return PydanticCustomError(Reason.INCONSISTENT_DATA.value, message)


def lines_for(provider: str, api_version: str, ai_organization_id: str, bucket: BaseModel) -> Iterator[LedgerLine]:
    """The ledger lines of one validated bucket (any of the four formats)."""
    report = report_of(provider, api_version)
    for line in _lines(provider, api_version, ai_organization_id, bucket):
        line.report = report
        yield line


def _lines(provider: str, api_version: str, ai_organization_id: str, bucket: BaseModel) -> Iterator[LedgerLine]:
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
                    charge.inference_geo,
                )
                or ALL_LINE_ITEMS,
                currency=charge.currency,
                amount=charge.amount.scaleb(-2, EXACT),  # cents -> units, exact (only the exponent changes)
                quantity=None,
                unit=None,
                metadata=_present(
                    model=charge.model,
                    cost_type=charge.cost_type,
                    token_type=charge.token_type,
                    context_window=charge.context_window,
                    service_tier=charge.service_tier,
                ),
            )
    elif isinstance(bucket, OpenAIUsageBucket):
        for counted in bucket.results:
            yield from _usage_lines(
                provider,
                api_version,
                ai_organization_id,
                bucket.start_time,
                bucket.end_time,
                project=counted.project_id,
                model=counted.model,
                tier="batch" if counted.batch else _tier(counted.service_tier),
                extra_suffix=None,
                counts=_openai_counts(counted),
                outside_cost_report=False,
                metadata=_present(
                    user_id=counted.user_id,
                    api_key_id=counted.api_key_id,
                    batch=counted.batch,
                    service_tier=counted.service_tier,
                    num_model_requests=counted.num_model_requests,
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
                project=tally.workspace_id,
                model=tally.model,
                tier=_tier(tally.service_tier),
                extra_suffix=tally.context_window,
                counts=_anthropic_counts(tally),
                outside_cost_report=(tally.service_tier or "").lower() in ANTHROPIC_TIERS_OUTSIDE_COST_REPORT,
                metadata=_present(
                    api_key_id=tally.api_key_id,
                    service_tier=tally.service_tier,
                    context_window=tally.context_window,
                    inference_geo=tally.inference_geo,
                ),
            )
    else:  # pragma: no cover - BUCKET_MODELS and this function change together
        raise TypeError(f"no ledger mapping for {type(bucket).__name__}")


def _usage_lines(
    provider: str,
    api_version: str,
    ai_organization_id: str,
    start: datetime,
    end: datetime,
    *,
    project: str | None,
    model: str | None,
    tier: str | None,
    extra_suffix: str | None,
    counts: dict[str, tuple[int, str]],
    metadata: dict[str, Any],
    outside_cost_report: bool,
) -> Iterator[LedgerLine]:
    model_name = model or UNKNOWN_MODEL
    for token_type, (count, unit) in counts.items():
        line_item = ":".join(part for part in (model_name, token_type, tier, extra_suffix) if part)
        yield LedgerLine(
            provider=provider,
            ai_organization_id=ai_organization_id,
            ai_project_id=project,
            api_version=api_version,
            bucket_start=start,
            bucket_end=end,
            line_item=line_item,
            currency="USD",
            amount=None,
            quantity=Decimal(count),
            unit=unit,
            price_model=model_name,
            price_token_type=f"{tier}/{token_type}" if tier else token_type,
            metadata=dict(metadata),
            outside_cost_report=outside_cost_report,
        )


def _openai_counts(usage: OpenAIUsageResult) -> dict[str, tuple[int, str]]:
    uncached = usage.input_tokens - usage.input_cached_tokens
    if uncached < 0:
        raise _inconsistent("input_cached_tokens exceeds input_tokens")
    counts = {
        "input_uncached_tokens": (uncached, TOKENS),
        "input_cached_tokens": (usage.input_cached_tokens, TOKENS),
        "output_tokens": (usage.output_tokens, TOKENS),
        "input_audio_tokens": (usage.input_audio_tokens, TOKENS),
        "output_audio_tokens": (usage.output_audio_tokens, TOKENS),
    }
    counts.update(_extra_token_counts(usage.model_extra, exclude=counts.keys() | {"input_tokens"}))
    return counts


def _anthropic_counts(usage: AnthropicUsageResult) -> dict[str, tuple[int, str]]:
    creation = usage.cache_creation
    counts = {
        "uncached_input_tokens": (usage.uncached_input_tokens, TOKENS),
        "cache_read_input_tokens": (usage.cache_read_input_tokens, TOKENS),
        "cache_creation_1h_input_tokens": (creation.ephemeral_1h_input_tokens if creation else 0, TOKENS),
        "cache_creation_5m_input_tokens": (creation.ephemeral_5m_input_tokens if creation else 0, TOKENS),
        "output_tokens": (usage.output_tokens, TOKENS),
    }
    if usage.server_tool_use is not None:
        counts["web_search_requests"] = (usage.server_tool_use.web_search_requests, REQUESTS)
    counts.update(_extra_token_counts(usage.model_extra, exclude=counts.keys()))
    return counts


def _extra_token_counts(extra: dict[str, Any] | None, *, exclude: Any) -> dict[str, tuple[int, str]]:
    """Token breakdowns newer API versions add (``*_tokens`` integers we do not model yet), as reported."""
    found: dict[str, tuple[int, str]] = {}
    for name, value in (extra or {}).items():
        if not name.endswith("_tokens") or name in exclude:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**15:
            raise PydanticCustomError(Reason.SCHEMA_VIOLATION.value, f"{name} must be a non-negative integer")
        found[name] = (value, TOKENS)
    return found


def _tier(service_tier: str | None) -> str | None:
    if service_tier is None or service_tier.lower() in DEFAULT_TIERS:
        return None
    return service_tier


def _join(*parts: str | None) -> str:
    return " / ".join(part for part in parts if part)


def _present(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}
