"""What to ask each provider: every endpoint the collector polls, with its grouping and its request shape.

Documented at:
- OpenAI costs: https://platform.openai.com/docs/api-reference/usage/costs (``GET /v1/organization/costs``;
  ``bucket_width`` 1d only, ``group_by`` project_id and line_item, ``limit`` up to 180 buckets).
- OpenAI usage: https://platform.openai.com/docs/api-reference/usage (``GET /v1/organization/usage/<endpoint>``;
  ``limit`` up to 31 daily buckets; each endpoint documents its own ``group_by`` values).
- Anthropic: https://docs.anthropic.com/en/api/admin-api/usage-cost/get-cost-report and
  .../get-messages-usage-report (``starting_at``/``ending_at`` RFC 3339, ``limit`` up to 31 daily buckets,
  ``x-api-key`` and ``anthropic-version`` headers; grouping the messages usage by ``speed`` requires the
  ``anthropic-beta: fast-mode-2026-02-01`` header, as the page's ``group_by`` parameter says).
Every endpoint pages with ``has_more`` and the ``next_page`` cursor (sent back as ``page``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Provider = Literal["openai", "anthropic"]
DAY = "1d"
OPENAI_COSTS_PAGE_LIMIT = 180  # buckets per page, the documented maximum for 1d
DAILY_PAGE_LIMIT = 31  # buckets per page, the documented maximum for 1d (OpenAI usage, Anthropic)
ANTHROPIC_VERSION = "2023-06-01"  # the anthropic-version header the Admin API documents
ANTHROPIC_FAST_MODE_BETA = "fast-mode-2026-02-01"  # the anthropic-beta value that grouping by ``speed`` requires


@dataclass(frozen=True)
class Endpoint:
    """One report of one provider: where it lives and how the collector groups it."""

    provider: Provider
    report: str  # the ledger's report name (COORDINATION.md): openai.costs, openai.usage.<name>, ...
    path: str
    api_version: Literal["usage_v1", "costs_v1"]
    group_by: tuple[str, ...]
    page_limit: int
    usage_endpoint: str | None = None  # OpenAI usage only: the envelope's ``endpoint``
    beta: str | None = None  # Anthropic only: the ``anthropic-beta`` header a grouping needs

    def headers(self, auth: dict[str, str]) -> dict[str, str]:
        """``auth`` (from ``headers``) and the beta header this endpoint needs. Holds the key: never log it."""
        return auth if self.beta is None else {**auth, "anthropic-beta": self.beta}

    def params(self, start: datetime, end: datetime, page: str | None) -> list[tuple[str, str]]:
        """The query string of one page request (``group_by`` repeated, as both APIs document arrays).

        Neither end is sent (``end`` is always the open bucket's end, the next midnight): OpenAI's ``end_time``
        in the future is refused (HTTP 400 "end_time must not be in the future", reported in
        nesszer/Win-CodexBar#191: every OpenAI window failed on every poll), and "now" by our clock may be in the
        provider's future too; Anthropic's ``ending_at`` returns buckets that "end before" it, which may or may
        not include the open bucket ending exactly there. Without them both reports run up to now, open bucket
        included."""
        if self.provider == "openai":
            params = [
                ("start_time", str(int(start.timestamp()))),
                ("bucket_width", DAY),
                ("limit", str(self.page_limit)),
            ]
            params += [("group_by", field) for field in self.group_by]
        else:
            params = [
                ("starting_at", _rfc3339(start)),
                ("bucket_width", DAY),
                ("limit", str(self.page_limit)),
            ]
            params += [("group_by[]", field) for field in self.group_by]
        if page is not None:
            params.append(("page", page))
        return params


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def headers(provider: Provider, admin_key: str) -> dict[str, str]:
    """Authentication headers. The returned dict holds the key: never log it."""
    if provider == "openai":
        return {"Authorization": f"Bearer {admin_key}"}
    return {"x-api-key": admin_key, "anthropic-version": ANTHROPIC_VERSION}


def _openai_usage(name: str, *group_by: str) -> Endpoint:
    return Endpoint(
        provider="openai",
        report=f"openai.usage.{name}",
        path=f"/v1/organization/usage/{name}",
        api_version="usage_v1",
        group_by=("project_id", *group_by),
        page_limit=DAILY_PAGE_LIMIT,
        usage_endpoint=name,
    )


# Grouped by project and by every field that changes the price (model, batch, service tier, image size and
# source, web search context level, vector store; Anthropic's context window, inference geo and speed: fast mode
# bills at its own, higher rates, so ungrouped it would be estimated at standard prices); not by user or API
# key, which only multiply the rows.
OPENAI_ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        provider="openai",
        report="openai.costs",
        path="/v1/organization/costs",
        api_version="costs_v1",
        group_by=("project_id", "line_item"),
        page_limit=OPENAI_COSTS_PAGE_LIMIT,
    ),
    _openai_usage("completions", "model", "batch", "service_tier"),
    _openai_usage("embeddings", "model"),
    _openai_usage("moderations", "model"),
    _openai_usage("images", "model", "size", "source"),
    _openai_usage("audio_speeches", "model"),
    _openai_usage("audio_transcriptions", "model"),
    _openai_usage("vector_stores"),
    _openai_usage("code_interpreter_sessions"),
    _openai_usage("file_search_calls", "vector_store_id"),
    _openai_usage("web_search_calls", "model", "context_level"),
)

ANTHROPIC_ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        provider="anthropic",
        report="anthropic.cost_report",
        path="/v1/organizations/cost_report",
        api_version="costs_v1",
        group_by=("workspace_id", "description"),
        page_limit=DAILY_PAGE_LIMIT,
    ),
    Endpoint(
        provider="anthropic",
        report="anthropic.usage_report.messages",
        path="/v1/organizations/usage_report/messages",
        api_version="usage_v1",
        group_by=("workspace_id", "model", "service_tier", "context_window", "inference_geo", "speed"),
        page_limit=DAILY_PAGE_LIMIT,
        beta=ANTHROPIC_FAST_MODE_BETA,
    ),
)

ENDPOINTS: dict[Provider, tuple[Endpoint, ...]] = {"openai": OPENAI_ENDPOINTS, "anthropic": ANTHROPIC_ENDPOINTS}


def bucket_bounds(provider: Provider, bucket: dict[str, object]) -> tuple[object, object]:
    """The window of one provider bucket, as the provider wrote it (the key that merges pages)."""
    if provider == "openai":
        return bucket.get("start_time"), bucket.get("end_time")
    return bucket.get("starting_at"), bucket.get("ending_at")
