"""What counts as spend, end to end: a realistic mixed stream through the broker and the real worker, against the model.

``tests/test_spend_rules.py`` and ``tests/test_spend_aggregate.py`` feed the pipeline one message per batch with
simplified payloads (one overridden model at 1 USD a token). This test produces what producers send, as the providers
document it (``tests/fixtures/providers``), to the embedded broker on three partitions per topic, lets
``cost-worker run`` drain it in whatever batches and order it fetches, and compares every budget's spend in every
period (``cost_worker_spend_many``: what the evaluation and ``budgets status`` read), the open alerts and the
``budgets status`` output of the current periods with ``tests/spend_model.py`` exactly. The stream, per seed:

- API-usage events of OpenAI, Anthropic, Google and unknown models and of none, with ``cost_usd`` as a JSON number,
  a decimal string, null or absent (estimated from the catalogue at the prices README names: gpt-4o $2.50 / $10,
  claude-sonnet-4-0 $3 / $15 per million; prompt and total only; total only), ``occurred_at`` in Z, another offset or
  nanoseconds, in random order, some of them twice, and an id now and then reused at another instant;
- OpenAI usage (completions: ``gpt-4o`` priced by the catalogue, an unpriced model, a project no mapping knows, which
  is quarantined while the rest lands), hourly pages re-polled over other hours with other content, and minute buckets
  of other hours; OpenAI costs, daily (``amount.value`` a JSON number of up to 30 decimals or a string), grouped by
  project and line item or not grouped at all, a key twice in a bucket, a revision split into parts, a re-poll that
  regroups, the open buckets of today; Anthropic usage (standard, Priority Tier with an override, ``inference_geo=us``
  unpriced; hourly) and the Anthropic cost report (cents as decimal strings, daily);
- every message on a random partition, in three waves each drained before the next (a newer revision retires the
  lines of an older one already stored; older ones arriving late change nothing), a fifth of them published twice;
- budgets in UTC, Asia/Kolkata and America/Los_Angeles (days around a DST change), organization, project and user
  (also within a project, weekly); the open alerts must be those the model's final spend reaches, and ``budgets
  status`` must show the model's spend in cents, its percentage and those alerts;
- then the missing project mapping is added and ``quarantine replay`` runs: the same comparison again, with the
  replayed lines counted as if they had been consumed in their revisions.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any

import asyncpg
import pytest

from tests.factories import add_price, dumps, make_org
from tests.kafka_helpers import INPUT_PARTITIONS, create_topics, produce
from tests.spend_model import Estimate, Ledger, Row, SpendModel, period, periods_overlapping, sum_lines
from worker import admin
from worker.app import Worker
from worker.config import BATCH_MAX_RECORDS, Settings
from worker.sql import query

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MILLION = Decimal(1_000_000)
# First days: America/Los_Angeles springs forward on 8 March 2026 and falls back on 1 November 2026.
BASE_DAYS = (datetime(2026, 3, 7, tzinfo=UTC), datetime(2026, 10, 31, tzinfo=UTC))


def seeds(spec: str) -> tuple[int, ...]:
    found: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        found += range(int(first), int(last or first) + 1)
    return tuple(found)


WAVES = 3
DRAIN_TIMEOUT_S = 60.0
# Three streams in the normal suite (~20 s); SPEND_E2E_SEEDS=1-60 (a range or a comma-separated list) runs more.
SEEDS = seeds(os.environ.get("SPEND_E2E_SEEDS", "1-3"))
# The catalogue's prices (genai-prices, as README quotes them), per million tokens: (input, cached input, output).
GPT_4O = (Decimal("2.5"), Decimal("1.25"), Decimal(10))
CLAUDE_SONNET_4 = (Decimal(3), Decimal("0.3"), Decimal(15))
EVENT_MODELS = {"gpt-4o": "openai", "claude-sonnet-4-0": "anthropic", "gemini-1.5-pro": "google", "mystery-7": None}
OPENAI_TYPES = (
    "input_text_tokens",
    "input_audio_tokens",
    "input_image_tokens",
    "input_cached_text_tokens",
    "input_cached_audio_tokens",
    "input_cached_image_tokens",
    "input_cache_write_tokens",
    "output_text_tokens",
    "output_audio_tokens",
    "output_image_tokens",
)
ANTHROPIC_TYPES = (
    "uncached_input_tokens",
    "cache_read_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_creation_5m_input_tokens",
    "output_tokens",
)
WEB_SEARCH_PER_MILLION = Decimal(10_000)  # $10 per thousand requests (genai-prices; the fixture's 10 for $0.10)
PRIORITY_PRICE = Decimal("4.5")  # the override Priority Tier input needs (the catalogue has no priority variant)
BUDGETS: tuple[tuple[str, str | None, str, str, Decimal], ...] = (  # scope, project, period, zone, amount
    ("organization", None, "daily", "UTC", Decimal(8)),
    ("organization", None, "daily", "Asia/Kolkata", Decimal(8)),
    ("organization", None, "daily", "America/Los_Angeles", Decimal(8)),
    ("organization", None, "monthly", "America/Los_Angeles", Decimal(30)),
    ("project", "proj_a", "daily", "Asia/Kolkata", Decimal(3)),
    ("project", "ws_c", "daily", "America/Los_Angeles", Decimal(3)),
    ("user", None, "daily", "UTC", Decimal("1.5")),
    ("user", "proj_a", "weekly", "Asia/Kolkata", Decimal(2)),
)
THRESHOLDS = (Decimal(10), Decimal(50), Decimal(100))
# Producers' clocks: occurred_at and collected_at with an offset other than Z (the same instants).
OFFSETS = (
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=-8)),
    timezone(timedelta(hours=13, minutes=45)),
)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _ts(moment: datetime) -> int:
    return int(moment.timestamp())


def occurred_text(rng: random.Random, at: datetime) -> str:
    """An instant as producers write it: Z, another offset, or nanoseconds (which the worker truncates to micros)."""
    choice = rng.random()
    if choice < 0.5:
        return _iso(at)
    if choice < 0.8:
        return at.astimezone(rng.choice(OFFSETS)).isoformat()
    return f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond:06d}{rng.randint(0, 999):03d}Z"


@dataclass
class World:
    org: uuid.UUID
    user: uuid.UUID
    openai_account: str
    anthropic_account: str
    projects: dict[str, uuid.UUID]
    budgets: list[dict[str, Any]] = field(default_factory=list)
    gone: uuid.UUID = field(default_factory=uuid.uuid4)  # proj_gone's project, once its mapping is added

    @property
    def account_of_project(self) -> dict[uuid.UUID, tuple[str, str]]:
        return {
            self.projects["proj_a"]: ("openai", self.openai_account),
            self.projects["proj_b"]: ("openai", self.openai_account),
            self.projects["ws_c"]: ("anthropic", self.anthropic_account),
            self.gone: ("openai", self.openai_account),
        }

    def project(self, name: str | None) -> uuid.UUID | None:
        if name == "proj_gone":
            return self.gone
        return self.projects[name] if name else None


async def make_world(db: asyncpg.Connection) -> World:
    org = await make_org(db, project_ids=("proj_a", "proj_b"))
    anthropic_account = f"anth-{uuid.uuid4().hex[:8]}"
    workspace = uuid.uuid4()
    await db.execute(
        "INSERT INTO projects (id, organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
        "VALUES ($1, $2, 'ws_c', 'anthropic', $3, 'ws_c')",
        workspace,
        org.id,
        anthropic_account,
    )
    world = World(org.id, org.users[0], org.ai_org, anthropic_account, {**org.projects, "ws_c": workspace})
    for index, (scope, project, kind, zone, amount) in enumerate(BUDGETS):
        budget = uuid.uuid4()
        name = f"b{index}-{scope}-{kind}-{zone}"
        table = {"organization": "ai_organization_budgets", "project": "ai_project_budgets", "user": "ai_budgets"}
        columns = "id, organization_id, name, amount, period, timezone, thresholds, project_id"
        values: list[Any] = [budget, org.id, name, amount, kind, zone, list(THRESHOLDS), world.project(project)]
        if scope == "organization":
            columns, values = columns.rsplit(",", 1)[0], values[:-1]
        if scope == "user":
            columns += ", user_id"
            values.append(world.user)
        placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        await db.execute(f"INSERT INTO {table[scope]} ({columns}) VALUES ({placeholders})", *values)
        world.budgets.append(
            {
                "id": budget,
                "name": name,
                "scope": scope,
                "project": world.project(project),
                "user": world.user if scope == "user" else None,
                "period": kind,
                "timezone": zone,
                "amount": amount,
            }
        )
    await add_price(db, "anthropic", "claude-sonnet-4-20250514", "uncached_input_tokens/service_tier=priority", "4.5")
    return world


# ------------------------------------------------------------------------------------------------- the stream


@dataclass
class Stream:
    """What the producers publish, and what the model expects of it."""

    world: World
    rng: random.Random
    events: list[bytes] = field(default_factory=list)
    buckets: list[tuple[datetime, bytes, list[Row], list[tuple[str, str, str, datetime, datetime]]]] = field(
        default_factory=list
    )
    estimates: list[Estimate] = field(default_factory=list)
    revision: int = 0
    last_id: str | None = None
    periods_from: datetime = datetime(2026, 1, 1, tzinfo=UTC)  # the first day the budgets' periods are checked

    def collected(self, at: datetime) -> datetime:
        """A distinct collection instant near ``at`` (no two messages share a revision)."""
        self.revision += 1
        return at + timedelta(seconds=self.revision)

    # --- API-usage events -----------------------------------------------------------------------------

    def event(self, at: datetime) -> None:
        rng, world = self.rng, self.world
        model = rng.choice(
            ["gpt-4o", "gpt-4o", "claude-sonnet-4-0", "claude-sonnet-4-0", "gemini-1.5-pro", "mystery-7"]
        )
        project = rng.choice(["proj_a", "proj_a", "proj_b", "ws_c", "ws_c", None])
        user = world.user if rng.random() < 0.6 else None
        prompt, completion = rng.randint(1_000, 60_000), rng.randint(100, 20_000)
        usage: dict[str, Any] = {"model": model}
        shape = rng.choice(["both", "both", "prompt_and_total", "total_only"])
        if shape == "both":
            usage |= {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        elif shape == "prompt_and_total":
            usage |= {"prompt_tokens": prompt, "total_tokens": prompt + completion}
        else:
            usage |= {"total_tokens": prompt + completion}
            prompt, completion = 0, prompt + completion  # the dearer extreme: all completion (output costs more)
        cost_kind = "given" if model in ("gemini-1.5-pro",) else rng.choice(["given", "string", "absent", "absent"])
        amount = Decimal(0)
        if cost_kind == "given":
            value = round(rng.uniform(0.001, 0.4), rng.choice([3, 6, 17]))
            usage["cost_usd"] = value  # a JSON number, parsed exactly as written
            amount = Decimal(repr(value))
        elif cost_kind == "string":
            text = f"{rng.randint(1, 400_000)}e-6"
            usage["cost_usd"] = text
            amount = Decimal(text)
        elif model in ("gpt-4o", "claude-sonnet-4-0"):
            price = GPT_4O if model == "gpt-4o" else CLAUDE_SONNET_4
            amount = (prompt * price[0] + completion * price[2]) / MILLION
        if cost_kind == "absent" and rng.random() < 0.3:
            usage["cost_usd"] = None
        provider = EVENT_MODELS[model]
        token_usage: dict[str, Any] | None = usage
        variant = rng.random()
        if variant < 0.06:  # a request that used no model (a list call): nothing to count, nothing to replace
            token_usage, provider, amount = None, None, Decimal(0)
        elif variant < 0.12 and "cost_usd" in usage and usage["cost_usd"] is not None:
            usage["model"], provider = None, None  # the platform's cost without a model: never replaced
        if self.last_id is None or rng.random() < 0.9:
            self.last_id = uuid.uuid4().hex
        at += timedelta(microseconds=rng.choice([0, 0, 999_999, rng.randint(0, 999_999)]))
        payload = {
            "event_id": self.last_id,  # now and then the id of the event before, at another instant: another event
            "occurred_at": occurred_text(rng, at),
            "organization_id": str(world.org),
            "project_id": str(world.projects[project]) if project else None,
            "user_id": str(user) if user else None,
            "endpoint": "/v1/orchestrations",
            "method": "POST",
            "status_code": 200,
            "response_time_ms": rng.randint(50, 3000),
            "token_usage": token_usage,
        }
        self.events.append(dumps(payload))
        if rng.random() < 0.25:  # a redelivery: the producer retried, or the relay replayed
            self.events.append(dumps(payload))
        if rng.random() < 0.1:  # a relay that re-serialized it: the same instant and numbers, written otherwise
            again = json.loads(dumps(payload))
            again["occurred_at"] = at.astimezone(rng.choice(OFFSETS)).isoformat()
            if token_usage is not None and isinstance(usage.get("cost_usd"), float):
                again["token_usage"]["cost_usd"] = str(Decimal(repr(usage["cost_usd"])).scaleb(1)) + "e-1"
            self.events.append(json.dumps(dict(reversed(again.items()))).encode())
        self.estimates.append(Estimate(world.org, world.project(project), user, at, provider, amount))

    # --- provider messages ----------------------------------------------------------------------------

    def message(
        self,
        provider: str,
        api_version: str,
        collected: datetime,
        buckets: list[dict[str, Any]],
        rows: list[Row],
        windows: list[tuple[str, str, str, datetime, datetime]],
    ) -> None:
        account = self.world.openai_account if provider == "openai" else self.world.anthropic_account
        envelope = {
            "provider": provider,
            "ai_organization_id": account,
            "api_version": api_version,
            "collected_at": _iso(collected)
            if self.rng.random() < 0.7
            else collected.astimezone(self.rng.choice(OFFSETS)).isoformat(),
            "page": {"object": "page", "data": buckets, "has_more": False, "next_page": None},
        }
        self.buckets.append((collected, dumps(envelope), sum_lines(rows), windows))

    def row(
        self, provider: str, report: str, kind: str, window: tuple[datetime, datetime], collected: datetime, **kw: Any
    ) -> Row:
        account = self.world.openai_account if provider == "openai" else self.world.anthropic_account
        return Row(
            organization_id=self.world.org,
            provider=provider,
            ai_organization_id=account,
            report=report,
            kind=kind,
            start=window[0],
            end=window[1],
            collected_at=collected,
            **kw,
        )

    def openai_usage(self, hours: list[datetime], collected: datetime, width: timedelta = HOUR) -> None:
        """One page of completions buckets (``group_by=project_id,model``), hourly or of one minute."""
        rng, buckets, rows, windows = self.rng, [], [], []
        report = "openai.usage.completions"
        for start in hours:
            window = (start, start + width)
            windows.append(("openai", self.world.openai_account, report, *window))
            results: list[dict[str, Any]] = []
            for project, model in dict.fromkeys(
                rng.sample(
                    [
                        (p, m)
                        for p in ("proj_a", "proj_b", "proj_gone", None)
                        for m in ("gpt-4o", "gpt-4o", "o-mystery")
                    ],
                    rng.randint(0, 3),
                )
            ):
                inputs, cached, outputs = rng.randint(0, 50_000), 0, rng.randint(0, 10_000)
                cached = rng.randint(0, inputs)
                results.append(
                    {
                        "object": "organization.usage.completions.result",
                        "input_tokens": inputs,
                        "output_tokens": outputs,
                        "input_cached_tokens": cached,
                        "input_audio_tokens": 0,
                        "output_audio_tokens": 0,
                        "num_model_requests": rng.randint(1, 40),
                        "project_id": project,
                        "user_id": None,
                        "api_key_id": None,
                        "model": model,
                        "batch": False,
                    }
                )
                quantities = dict.fromkeys(OPENAI_TYPES, 0) | {
                    "input_text_tokens": inputs - cached,
                    "input_cached_text_tokens": cached,
                    "output_text_tokens": outputs,
                }
                prices = {"input_text_tokens": GPT_4O[0], "input_cached_text_tokens": GPT_4O[1]}
                prices["output_text_tokens"] = GPT_4O[2]
                for token_type, n in quantities.items():
                    if model == "gpt-4o":
                        amount: Decimal | None = n * prices.get(token_type, Decimal(0)) / MILLION
                        if token_type not in prices and n:
                            amount = None
                    else:
                        amount = Decimal(0) if n == 0 else None
                    rows.append(
                        self.row(
                            "openai",
                            report,
                            "usage",
                            window,
                            collected,
                            project_id=self.world.project(project),
                            line_item=f"{model}:{token_type}",
                            amount=amount,
                            quantity=Decimal(n),
                        )
                    )
            buckets.append(
                {"object": "bucket", "start_time": _ts(start), "end_time": _ts(start + width), "results": results}
            )
        self.message("openai", "usage_v1", collected, buckets, rows, windows)

    def openai_costs(self, day: datetime, collected: datetime, *, grouped: bool) -> None:
        """One daily costs bucket, grouped by project and line item (as the collector asks) or not grouped."""
        rng, results, rows = self.rng, [], []
        window = (day, day + DAY)
        keys = (
            [
                (p, i)
                for p in ("proj_a", "proj_b", None)
                for i in ("gpt-4o-2024-08-06, input", "gpt-4o-2024-08-06, output")
            ]
            if grouped
            else [(None, None)]
        )
        for project, item in rng.sample(keys, rng.randint(0 if grouped else 1, min(3, len(keys)))):
            for _ in range(rng.choice([1, 1, 2])):  # a key twice in one bucket: summed
                value: float | str = round(rng.uniform(0, 1.5), rng.choice([2, 6, 16]))
                if rng.random() < 0.2:
                    value = f"{rng.randint(0, 150_000)}e-5"
                elif rng.random() < 0.1:  # more digits than a float or a 28-digit context holds
                    value = f"0.{rng.randint(0, 10**30):030d}"
                results.append(
                    {
                        "object": "organization.costs.result",
                        "amount": {"value": value, "currency": "usd"},
                        "line_item": item,
                        "project_id": project,
                    }
                )
                rows.append(
                    self.row(
                        "openai",
                        "openai.costs",
                        "cost",
                        window,
                        collected,
                        project_id=self.world.project(project),
                        line_item=item or "all",
                        amount=Decimal(value if isinstance(value, str) else repr(value)),
                    )
                )
        windows = [("openai", self.world.openai_account, "openai.costs", *window)]
        keys_here = sorted({(r.project_id or uuid.UUID(int=0), r.line_item) for r in rows})
        parts = [keys_here]
        if len(keys_here) > 1 and rng.random() < 0.4:  # a page limit: parts of one revision, a key in one part only
            cut = rng.randint(1, len(keys_here) - 1)
            parts = [keys_here[:cut], keys_here[cut:]]
        for part in parts:
            mine = [i for i, r in enumerate(rows) if (r.project_id or uuid.UUID(int=0), r.line_item) in part]
            bucket = {
                "object": "bucket",
                "start_time": _ts(day),
                "end_time": _ts(day + DAY),
                "results": [results[i] for i in mine],
            }
            self.message("openai", "costs_v1", collected, [bucket], [rows[i] for i in mine], windows)

    def anthropic_usage(self, hours: list[datetime], collected: datetime) -> None:
        rng, buckets, rows, windows = self.rng, [], [], []
        report = "anthropic.usage_report.messages"
        for start in hours:
            window = (start, start + HOUR)
            windows.append(("anthropic", self.world.anthropic_account, report, *window))
            results: list[dict[str, Any]] = []
            combos = [(w, t) for w in ("ws_c", None) for t in ("standard", "standard", "priority", "us")]
            for workspace, tier in dict.fromkeys(rng.sample(combos, rng.randint(0, 3))):
                if tier == "priority":
                    counts = dict.fromkeys(ANTHROPIC_TYPES, 0) | {"uncached_input_tokens": rng.randint(1, 30_000)}
                else:
                    counts = {
                        "uncached_input_tokens": rng.randint(0, 30_000),
                        "cache_read_input_tokens": rng.randint(0, 30_000),
                        "cache_creation_1h_input_tokens": 0,
                        "cache_creation_5m_input_tokens": 0,
                        "output_tokens": rng.randint(0, 8_000),
                    }
                results.append(
                    {
                        "uncached_input_tokens": counts["uncached_input_tokens"],
                        "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
                        "cache_read_input_tokens": counts["cache_read_input_tokens"],
                        "output_tokens": counts["output_tokens"],
                        "api_key_id": "apikey_01",
                        "workspace_id": workspace,
                        "model": "claude-sonnet-4-20250514",
                        "service_tier": "standard" if tier == "us" else tier,
                        "context_window": "0-200k",
                        "inference_geo": "us" if tier == "us" else "global",
                        "speed": None,
                    }
                )
                if tier != "priority" and rng.random() < 0.4:  # the web search tool: $10 per thousand searches
                    counts["web_search_requests"] = rng.randint(0, 40)
                    results[-1]["server_tool_use"] = {"web_search_requests": counts["web_search_requests"]}
                prices = {
                    "uncached_input_tokens": CLAUDE_SONNET_4[0],
                    "cache_read_input_tokens": CLAUDE_SONNET_4[1],
                    "output_tokens": CLAUDE_SONNET_4[2],
                    "web_search_requests": WEB_SEARCH_PER_MILLION,
                }
                if tier == "priority":
                    prices = {"uncached_input_tokens": PRIORITY_PRICE}
                elif tier == "us":  # the catalogue has no inference_geo=us variant: unpriced (README)
                    prices = {}
                for token_type, n in counts.items():
                    price = prices.get(token_type)
                    amount: Decimal | None = Decimal(0) if n == 0 else None if price is None else n * price / MILLION
                    rows.append(
                        self.row(
                            "anthropic",
                            report,
                            "usage",
                            window,
                            collected,
                            project_id=self.world.project(workspace),
                            line_item=f"claude-sonnet-4-20250514:{token_type}:{tier}",
                            amount=amount,
                            quantity=Decimal(n),
                            outside_cost_report=tier == "priority",
                        )
                    )
            buckets.append({"starting_at": _iso(start), "ending_at": _iso(start + HOUR), "results": results})
        self.message("anthropic", "usage_v1", collected, buckets, rows, windows)

    def anthropic_costs(self, day: datetime, collected: datetime) -> None:
        rng, results, rows = self.rng, [], []
        window = (day, day + DAY)
        choices = [
            ("ws_c", "Claude Sonnet 4 Usage - Input Tokens"),
            ("ws_c", "Claude Sonnet 4 Usage - Output Tokens"),
            (None, "Web Search"),
            (None, "Claude Sonnet 4 Usage - Input Tokens"),
        ]
        for workspace, description in rng.sample(choices, rng.randint(0, 3)):
            cents = f"{rng.randint(0, 150)}.{rng.randint(0, 99):02d}{rng.choice(['', '', '5', '0417'])}"
            results.append(
                {
                    "currency": "USD",
                    "amount": cents,
                    "workspace_id": workspace,
                    "description": description,
                    "cost_type": "tokens",
                    "context_window": "0-200k",
                    "model": "claude-sonnet-4-20250514",
                    "service_tier": "standard",
                    "token_type": "uncached_input_tokens",
                    "inference_geo": "global",
                    "speed": None,
                }
            )
            rows.append(
                self.row(
                    "anthropic",
                    "anthropic.cost_report",
                    "cost",
                    window,
                    collected,
                    project_id=self.world.project(workspace),
                    line_item=description,
                    amount=Decimal(cents) / 100,
                )
            )
        bucket = {"starting_at": _iso(day), "ending_at": _iso(day + DAY), "results": results}
        windows = [("anthropic", self.world.anthropic_account, "anthropic.cost_report", *window)]
        self.message("anthropic", "costs_v1", collected, [bucket], rows, windows)


def generate(world: World, seed: int, now: datetime) -> Stream:
    rng = random.Random(seed)
    stream = Stream(world, rng)
    base = rng.choice(BASE_DAYS)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    days = [base, base + DAY, base + 2 * DAY]
    # Hours where events and buckets meet: around UTC midnight, Kolkata midnight (18:30 UTC), LA midnight (07/08 UTC).
    hot = [0, 1, 7, 8, 9, 12, 18, 19, 23]
    for day in days:
        for _ in range(rng.randint(8, 14)):
            stream.event(
                day + HOUR * rng.choice(hot) + timedelta(minutes=rng.randint(0, 59), seconds=rng.randint(0, 59))
            )
    until_now = max(1, int((now - today) / HOUR))
    for _ in range(rng.randint(3, 6)):  # today's, before now
        at = today + HOUR * rng.randrange(until_now) + timedelta(minutes=rng.randint(0, 59))
        if at < now - timedelta(minutes=1):
            stream.event(at)
    for day in days:
        # Hourly usage of some hot hours, re-polled with other content (the newest revision is the truth).
        # A re-poll's page may reach other hours than the first one's (a moving range).
        openai_hours = sorted(rng.sample([day + HOUR * h for h in hot], 5))
        for _ in range(rng.randint(1, 3)):
            page = sorted(rng.sample(openai_hours, rng.randint(2, 5)))
            stream.openai_usage(page, stream.collected(page[-1] + HOUR * rng.randint(1, 30)))
        hours = sorted(rng.sample([day + HOUR * h for h in hot], 4))
        for _ in range(rng.randint(1, 2)):
            page = sorted(rng.sample(hours, rng.randint(2, 4)))
            stream.anthropic_usage(page, stream.collected(page[-1] + HOUR * rng.randint(1, 30)))
        # Minute buckets (bucket_width=1m) inside a hot hour, not on the hour, that no hourly page reports (another
        # width of the same hours of a report is an overlapping window, quarantined: test_spend_rules covers it).
        free = [day + HOUR * h for h in hot if day + HOUR * h not in openai_hours]
        if free and rng.random() < 0.5:
            hour = rng.choice(free)
            minutes = [hour + timedelta(minutes=m) for m in sorted(rng.sample(range(1, 60), 3))]
            for _ in range(rng.randint(1, 2)):
                stream.openai_usage(minutes, stream.collected(hour + 2 * HOUR), width=timedelta(minutes=1))
        # Daily costs: open revisions polled during the day, then closed ones; grouped, or regrouped to none.
        for after in sorted(rng.sample([3, 9, 20, 26, 30, 40], rng.randint(0, 3))):
            stream.openai_costs(day, stream.collected(day + HOUR * after), grouped=rng.random() < 0.75)
        for after in sorted(rng.sample([5, 22, 28, 50], rng.randint(0, 2))):
            stream.anthropic_costs(day, stream.collected(day + HOUR * after))
    # Today's open buckets, polled before now.
    if now - today > 2 * HOUR:
        stream.openai_costs(today, stream.collected(now - HOUR - timedelta(minutes=30)), grouped=True)
        stream.openai_usage([today], stream.collected(now - HOUR))
    stream.periods_from = days[0] - DAY
    return stream


# ------------------------------------------------------------------------------------------------- the test


def model_of(stream: Stream, *, replayed: bool) -> SpendModel:
    """The newest revision of every window; proj_gone's lines (quarantined as unattributed: no project maps them)
    only once they were replayed after the mapping was added, as if consumed then."""
    ledger = Ledger()
    for collected, _, rows, windows in sorted(stream.buckets, key=lambda b: b[0]):
        mine = [r for r in rows if replayed or r.project_id != stream.world.gone]
        ledger.apply(windows, mine, collected)
    return SpendModel(ledger.current(), stream.estimates, stream.world.account_of_project)


def budget_periods(stream: Stream, budget: dict[str, Any], now: datetime) -> Iterator[tuple[datetime, datetime]]:
    start = stream.periods_from
    yield from periods_overlapping(budget["period"], budget["timezone"], start, start + 5 * DAY)
    current = period(budget["period"], budget["timezone"], now)
    yield from periods_overlapping(budget["period"], budget["timezone"], current[0] - DAY, now + DAY)


def reached(spend: Decimal, amount: Decimal, threshold: Decimal) -> bool:
    return Fraction(spend) * 100 >= Fraction(amount) * Fraction(threshold)


async def check(
    db: asyncpg.Connection,
    settings: Settings,
    stream: Stream,
    now: datetime,
    capsys: pytest.CaptureFixture[str],
    *,
    replayed: bool,
) -> None:
    world, model = stream.world, model_of(stream, replayed=replayed)
    open_alerts = {
        (r["budget_id"], r["period_start"], r["threshold"])
        for r in await db.fetch(
            "SELECT budget_id, period_start, threshold FROM budget_alerts WHERE organization_id = $1 "
            "AND resolved_at IS NULL",
            world.org,
        )
    }
    wrong: list[str] = []
    wanted_alerts: set[tuple[uuid.UUID, datetime, Decimal]] = set()
    seen: set[tuple[uuid.UUID, datetime]] = set()
    for budget in world.budgets:
        for start, end in budget_periods(stream, budget, now):
            if (budget["id"], start) in seen:
                continue
            seen.add((budget["id"], start))
            row = await db.fetchrow(
                query("budget_spend"),
                [budget["scope"]],
                [world.org],
                [budget["project"]],
                [budget["user"]],
                [start],
                [end],
                ["USD"],
            )
            assert row is not None
            wanted = model.spend(budget["scope"], world.org, budget["project"], budget["user"], start, end)
            if row["spend"] != wanted:
                wrong.append(f"{budget['name']} {_iso(start)}: counted {row['spend']} USD, model {wanted}")
            wanted_alerts |= {(budget["id"], start, t) for t in THRESHOLDS if reached(wanted, budget["amount"], t)}
    assert not wrong, "\n".join(wrong)
    assert open_alerts == wanted_alerts, (open_alerts - wanted_alerts, wanted_alerts - open_alerts)
    # `budgets status`: each budget's current period, spend rounded half-even to cents.
    capsys.readouterr()
    assert await admin.budgets_status(settings, organization=str(world.org)) == 0
    # Columns from the right: spend / amount currency, used, alerted, thresholds, rates, unpriced.
    shown = {cells[1]: cells[-9:] for cells in map(str.split, capsys.readouterr().out.splitlines()[2:])}
    for budget in world.budgets:
        start, end = period(budget["period"], budget["timezone"], datetime.now(UTC))
        spend = model.spend(budget["scope"], world.org, budget["project"], budget["user"], start, end)
        cents = format(spend.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN), "f")
        used = Decimal(f"{round(Fraction(spend) * 1000 / Fraction(budget['amount']))}E-1")  # half-even, once
        alerted = ",".join(str(t) for t in THRESHOLDS if reached(spend, budget["amount"], t)) or "-"
        unpriced = sum(  # the current unpriced usage lines of the scope counting in the period (by their midpoint)
            1
            for r in model.rows
            if r.amount is None
            and budget["scope"] != "user"
            and (budget["scope"] == "organization" or r.project_id == budget["project"])
            and start <= r.midpoint < end
        )
        shows = (cents, f"{used}%", alerted, "-", str(unpriced or "-"))
        cells = shown[budget["name"]]
        assert (cells[0], cells[4], cells[5], cells[7], cells[8]) == shows, (budget["name"], cells)


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_realistic_stream_through_the_worker_counts_what_the_model_counts(
    seed: int, db: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    world = await make_world(db)
    stream = generate(world, seed, now)
    rng = random.Random(seed)
    events = list(stream.events)
    rng.shuffle(events)  # out of order, redeliveries anywhere
    buckets = [b[1] for b in stream.buckets]
    buckets += rng.sample(buckets, len(buckets) // 5)  # the same revision again (a relay's replay)
    rng.shuffle(buckets)  # re-polls of a window on any partition: older revisions often arrive after newer ones
    await create_topics(settings)
    # In waves, each drained before the next is published: a newer revision then retires the lines of an older one
    # already stored (within one batch the older one would never be written), and spend rises and falls in between.
    # Batch boundaries anywhere: a few messages per transaction, or all of a wave in one.
    worker = Worker(settings.model_copy(update={"batch_max_records": rng.choice([3, 20, BATCH_MAX_RECORDS])}))
    running = asyncio.create_task(worker.run())
    try:
        total = 0
        for wave in range(WAVES):
            for topic, values in ((settings.topic_api_usage, events), (settings.topic_provider_buckets, buckets)):
                mine = values[wave::WAVES]
                for partition in range(INPUT_PARTITIONS):
                    await produce(settings, topic, mine[partition::INPUT_PARTITIONS], partition=partition)
                total += len(mine)
            deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
            while total != await db.fetchval(
                "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = $1",
                settings.kafka_group_id,
            ):
                assert not running.done(), running.result()
                assert asyncio.get_running_loop().time() < deadline, f"wave {wave} not drained"
                await asyncio.sleep(0.1)
    finally:
        worker.stop.set()
    assert await asyncio.wait_for(running, DRAIN_TIMEOUT_S) == 0
    quarantined = await db.fetch("SELECT reason, detail FROM quarantine WHERE reason <> 'unattributed'")
    assert not quarantined, [dict(q) for q in quarantined]
    assert await db.fetchval("SELECT count(*) FROM api_usage WHERE organization_id = $1", world.org) == len(
        stream.estimates
    )
    await check(db, settings, stream, now, capsys, replayed=False)
    # The operator adds the missing mapping and replays: proj_gone's lines join their revisions (or, of a revision
    # a newer one replaced meanwhile, change nothing), and the budgets are evaluated as if they had been consumed.
    await db.execute(
        "INSERT INTO projects (id, organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
        "VALUES ($1, $2, 'proj_gone', 'openai', $3, 'proj_gone')",
        world.gone,
        world.org,
        world.openai_account,
    )
    assert await admin.quarantine_replay(settings, reason="unattributed", limit=10_000) == 0
    assert not await db.fetchval("SELECT count(*) FROM quarantine WHERE status = 'pending'")
    await check(db, settings, stream, now, capsys, replayed=True)
