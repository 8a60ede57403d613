"""A fake OpenAI + Anthropic admin API for the collector's tests (aiohttp, on 127.0.0.1).

Response shapes follow the providers' documentation pages:
- OpenAI costs: https://platform.openai.com/docs/api-reference/usage/costs  (``GET /v1/organization/costs``:
  page object ``{"object": "page", "data": [bucket], "has_more", "next_page"}``; bucket ``{"object": "bucket",
  "start_time", "end_time", "results": [{"object": "organization.costs.result", "amount": {"value", "currency"},
  "line_item", "project_id"}]}``; unix-second bounds; ``Authorization: Bearer``).
- OpenAI usage: https://platform.openai.com/docs/api-reference/usage/completions (and the sibling pages of each
  endpoint): results ``organization.usage.<endpoint>.result`` with the counts and the grouped fields.
- Anthropic: https://docs.anthropic.com/en/api/admin-api/usage-cost/get-cost-report and
  https://docs.anthropic.com/en/api/admin-api/usage-cost/get-messages-usage-report (``{"data": [{"starting_at",
  "ending_at", "results"}], "has_more", "next_page"}``; ``amount`` a decimal string in cents; ``x-api-key``).
Every endpoint pages with an opaque cursor: ``page_size`` buckets per page, ``next_page`` sent back as ``page``.

The truth is ``self.buckets[(provider, account, path)]``: a list of buckets, which tests edit between polls.
``script`` queues canned answers (a 429 with Retry-After, a 500) before the real one; ``hold`` parks requests of
a path until released (to kill a collector mid-poll). Error bodies echo the key, as a careless provider might, so
that the tests prove the collector never repeats a body.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

NUMBER = "__number__:"  # a string value starting with this is written as a bare JSON number

OPENAI_USAGE = (
    "completions",
    "embeddings",
    "moderations",
    "images",
    "audio_speeches",
    "audio_transcriptions",
    "vector_stores",
    "code_interpreter_sessions",
    "file_search_calls",
    "web_search_calls",
)


@dataclass
class Canned:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(provider: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    if provider == "openai":
        return datetime.fromtimestamp(int(value), tz=UTC)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class FakeProviders:
    def __init__(self, keys: dict[tuple[str, str], str], *, page_size: int = 1) -> None:
        self.keys = keys  # (provider, account) -> the admin key the fake accepts
        self.page_size = page_size
        # Buckets the next page repeats from the end of this one (a cursor that points at the last bucket served,
        # not past it): a provider that serves a bucket again on the next page.
        self.overlap = 0
        # Days a request without an end covers from its start, when set (else: up to now). Anthropic documents
        # this for its Usage and Cost Analytics API ("when omitted, the earlier of now and starting_at plus 31
        # days"); the legacy reports do not say what they do without an end.
        self.open_end_days: int | None = None
        self.buckets: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        self.script: dict[tuple[str, str], list[Canned]] = defaultdict(list)  # (account, path) -> answers
        self.holds: dict[str, tuple[int, asyncio.Event]] = {}  # path -> (requests served first, released)
        self.served: dict[str, int] = defaultdict(int)
        self.held = asyncio.Event()  # set when a request is parked
        self.requests: list[tuple[str, str, dict[str, list[str]], int, float]] = []  # (account, path, query, status, t)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- server --------------------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/organization/costs", self._openai)
        app.router.add_get("/v1/organization/usage/{endpoint}", self._openai)
        app.router.add_get("/v1/organizations/cost_report", self._anthropic)
        app.router.add_get("/v1/organizations/usage_report/messages", self._anthropic)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        for _, event in self.holds.values():
            event.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- handlers ------------------------------------------------------------------------------------------

    async def _openai(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        return await self._serve(request, "openai", key)

    async def _anthropic(self, request: web.Request) -> web.Response:
        if request.headers.get("anthropic-version") != "2023-06-01":
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error"}}, status=400)
        beta = {value.strip() for value in request.headers.get("anthropic-beta", "").split(",")}
        if "speed" in request.query.getall("group_by[]", []) and "fast-mode-2026-02-01" not in beta:
            # get-messages-usage-report: "Grouping by speed requires the fast-mode-2026-02-01 beta header."
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error"}}, status=400)
        return await self._serve(request, "anthropic", request.headers.get("x-api-key", ""))

    async def _serve(self, request: web.Request, provider: str, key: str) -> web.Response:
        path = request.path
        account = next((acc for (prov, acc), k in self.keys.items() if prov == provider and k == key), None)
        query = {name: request.query.getall(name) for name in request.query}
        if account is None:
            self.requests.append(("?", path, query, 401, time.monotonic()))
            refusal = {"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}}
            return web.json_response(refusal, status=401)
        end_time = request.query.get("end_time")
        if provider == "openai" and end_time is not None and int(end_time) > time.time():
            # Reported of the real API (nesszer/Win-CodexBar#191, a poller asking for costs and usage up to the
            # next midnight): an end_time in the future is refused, "end_time must not be in the future".
            self.requests.append((account, path, query, 400, time.monotonic()))
            refusal = {"error": {"message": "end_time must not be in the future", "type": "invalid_request_error"}}
            return web.json_response(refusal, status=400)
        if path in self.holds and self.served[path] >= self.holds[path][0]:
            self.held.set()
            await self.holds[path][1].wait()
        self.served[path] += 1
        queue = self.script.get((account, path))
        if queue:
            canned = queue.pop(0)
            self.requests.append((account, path, query, canned.status, time.monotonic()))
            return web.Response(status=canned.status, headers=canned.headers, text=canned.body or f"oops {key}")
        self.requests.append((account, path, query, 200, time.monotonic()))
        group_key = "group_by" if provider == "openai" else "group_by[]"
        start = _parse_time(provider, request.query.get("start_time" if provider == "openai" else "starting_at"))
        end = _parse_time(provider, request.query.get("end_time" if provider == "openai" else "ending_at"))
        assert start is not None, "start is required by both APIs"
        if end is None and self.open_end_days is not None:
            end = start + timedelta(days=self.open_end_days)
        assert request.query.get("bucket_width", "1d") == "1d"
        assert query.get(group_key), "the collector always groups"
        chosen = [b for b in self.buckets[(provider, account, path)] if self._within(provider, b, start, end)]
        offset = int(base64.b64decode(request.query["page"]).decode()) if "page" in request.query else 0
        limit = min(int(request.query.get("limit", "7")), self.page_size)
        page = chosen[offset : offset + limit]
        more = offset + limit < len(chosen)
        following = offset + limit - min(self.overlap, limit - 1)
        cursor = base64.b64encode(str(following).encode()).decode() if more else None
        if provider == "openai":
            body: dict[str, Any] = {"object": "page", "data": page, "has_more": more, "next_page": cursor}
        else:
            body = {"data": page, "has_more": more, "next_page": cursor}
        # Numbers with every digit the test chose (Python floats would round them): the marker strings become
        # bare JSON numbers.
        text = re.sub(r'"' + NUMBER + r'(-?[0-9.eE+-]+)"', r"\1", json.dumps(body))
        return web.Response(text=text, content_type="application/json")

    @staticmethod
    def _within(provider: str, bucket: dict[str, Any], start: datetime, end: datetime | None) -> bool:
        if provider == "openai":
            b_start = datetime.fromtimestamp(bucket["start_time"], tz=UTC)
            b_end = datetime.fromtimestamp(bucket["end_time"], tz=UTC)
        else:
            b_start = _parse_time(provider, bucket["starting_at"])  # type: ignore[assignment]
            b_end = _parse_time(provider, bucket["ending_at"])  # type: ignore[assignment]
        return b_start >= start and (end is None or b_end <= end)

    # --- building the truth --------------------------------------------------------------------------------

    def openai_bucket(self, account: str, path: str, day: datetime, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Add (or replace) the bucket of ``day``."""
        start = int(day.timestamp())
        bucket = {"object": "bucket", "start_time": start, "end_time": start + 86_400, "results": results}
        self._put(("openai", account, path), bucket, "start_time")
        return bucket

    def anthropic_bucket(self, account: str, path: str, day: datetime, results: list[dict[str, Any]]) -> dict[str, Any]:
        end = datetime.fromtimestamp(day.timestamp() + 86_400, tz=UTC)
        bucket = {"starting_at": _iso(day), "ending_at": _iso(end), "results": results}
        self._put(("anthropic", account, path), bucket, "starting_at")
        return bucket

    def _put(self, where: tuple[str, str, str], bucket: dict[str, Any], key: str) -> None:
        kept = [b for b in self.buckets[where] if b[key] != bucket[key]]
        self.buckets[where] = sorted([*kept, bucket], key=lambda b: b[key])


def openai_cost(value: str, line_item: str, project_id: str | None) -> dict[str, Any]:
    """One result of https://platform.openai.com/docs/api-reference/usage/costs_object (value as a JSON number)."""
    return {
        "object": "organization.costs.result",
        "amount": {"value": NUMBER + value, "currency": "usd"},
        "line_item": line_item,
        "project_id": project_id,
    }


def openai_completions(project_id: str, model: str, input_tokens: int, cached: int, output: int) -> dict[str, Any]:
    """https://platform.openai.com/docs/api-reference/usage/completions_object, grouped by project and model."""
    return {
        "object": "organization.usage.completions.result",
        "input_tokens": input_tokens,
        "output_tokens": output,
        "input_cached_tokens": cached,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": 3,
        "project_id": project_id,
        "user_id": None,
        "api_key_id": None,
        "model": model,
        "batch": False,
        "service_tier": "default",
    }


def anthropic_cost(cents: str, workspace: str | None, description: str) -> dict[str, Any]:
    """One result of the cost report (amount: a decimal string in cents, per the documentation)."""
    return {
        "currency": "USD",
        "amount": cents,
        "workspace_id": workspace,
        "description": description,
        "cost_type": None,
        "context_window": None,
        "model": None,
        "service_tier": None,
        "token_type": None,
    }


def anthropic_usage(workspace: str | None, model: str, uncached: int, output: int) -> dict[str, Any]:
    """One result of the messages usage report, grouped by workspace and the price dimensions."""
    return {
        "uncached_input_tokens": uncached,
        "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
        "cache_read_input_tokens": 0,
        "output_tokens": output,
        "server_tool_use": {"web_search_requests": 0},
        "api_key_id": None,
        "workspace_id": workspace,
        "model": model,
        "service_tier": "standard",
        "context_window": "0-200k",
        "inference_geo": None,
        "speed": "standard",  # the collector groups by speed (with the fast-mode beta header)
    }
