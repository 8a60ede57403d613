"""Builders for test data: platform rows (inserted as superuser) and input messages (as producers send them)."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from worker.migrate import migrate, schema_dir


@dataclass(frozen=True)
class FakeRecord:
    """A stand-in for aiokafka's ConsumerRecord when a test drives the pipeline directly."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass
class Org:
    id: uuid.UUID
    ai_org: str
    projects: dict[str, uuid.UUID] = field(default_factory=dict)  # provider project id -> project
    users: list[uuid.UUID] = field(default_factory=list)


async def make_org(
    db: asyncpg.Connection,
    *,
    provider: str = "openai",
    ai_org: str | None = None,
    project_ids: tuple[str, ...] = ("proj_a",),
    users: int = 1,
    legacy: dict[str, str] | None = None,
) -> Org:
    """An organization with projects mapped to provider project ids, and some users."""
    org = Org(id=uuid.uuid4(), ai_org=ai_org or f"org-{uuid.uuid4().hex[:8]}")
    await db.execute(
        "INSERT INTO organizations (id, name, slug) VALUES ($1, $2, $3)", org.id, "Org", f"org-{org.id.hex[:12]}"
    )
    for _ in range(users):
        user = uuid.uuid4()
        await db.execute(
            "INSERT INTO users (id, organization_id, email, username) VALUES ($1, $2, $3, $3)",
            user,
            org.id,
            f"{user.hex[:12]}@example.com",
        )
        org.users.append(user)
    for pid in project_ids:
        project = uuid.uuid4()
        await db.execute(
            "INSERT INTO projects (id, organization_id, name, ai_provider, ai_organization_id, ai_project_id) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            project,
            org.id,
            pid,
            provider,
            org.ai_org,
            pid,
        )
        org.projects[pid] = project
    for legacy_id, name in (legacy or {}).items():
        project = uuid.uuid4()
        await db.execute(
            "INSERT INTO projects (id, organization_id, name, openai_project_id) VALUES ($1, $2, $3, $4)",
            project,
            org.id,
            name,
            legacy_id,
        )
        org.projects[legacy_id] = project
    return org


async def add_price(
    db: asyncpg.Connection,
    provider: str,
    model: str,
    token_type: str,
    per_million: str,
    *,
    effective_from: datetime = datetime(2020, 1, 1, tzinfo=UTC),
    currency: str = "USD",
) -> None:
    await db.execute(
        "INSERT INTO model_prices (provider, model, token_type, price_per_million, currency, effective_from) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        provider,
        model,
        token_type,
        Decimal(per_million),
        currency,
        effective_from,
    )


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def api_event(
    org: Org,
    *,
    event_id: str | None = None,
    project: uuid.UUID | None = None,
    user: uuid.UUID | None = None,
    occurred_at: str = "2026-11-21T10:00:00.123Z",
    cost: str | float = 0.028,
    status: int = 200,
    latency: int = 840,
    prompt: int = 150,
    completion: int = 800,
    model: str = "gpt-4",
) -> dict[str, Any]:
    return {
        "event_id": event_id or uuid.uuid4().hex,
        "occurred_at": occurred_at,
        "organization_id": str(org.id),
        "project_id": str(project) if project else None,
        "user_id": str(user) if user else None,
        "endpoint": "/v1/orchestrations",
        "method": "POST",
        "status_code": status,
        "response_time_ms": latency,
        "token_usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "model": model,
            "cost_usd": cost,
        },
    }


def envelope(
    provider: str,
    ai_org: str,
    api_version: str,
    buckets: list[dict[str, Any]],
    *,
    collected_at: str = "2026-11-20T06:00:00Z",
    single: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = (
        {"bucket": buckets[0]}
        if single
        else {"page": {"object": "page", "data": buckets, "has_more": False, "next_page": None}}
    )
    return {
        "provider": provider,
        "ai_organization_id": ai_org,
        "api_version": api_version,
        "collected_at": collected_at,
        **body,
    }


def openai_cost_bucket(start: str, end: str, results: list[tuple[str | None, str | None, Any]]) -> dict[str, Any]:
    """results: (project_id, line_item, amount value)."""
    return {
        "object": "bucket",
        "start_time": ts(start),
        "end_time": ts(end),
        "results": [
            {
                "object": "organization.costs.result",
                "amount": {"value": value, "currency": "usd"},
                "line_item": line_item,
                "project_id": project,
            }
            for project, line_item, value in results
        ],
    }


def openai_usage_bucket(start: str, end: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    full = []
    for result in results:
        item = {
            "object": "organization.usage.completions.result",
            "input_tokens": 0,
            "output_tokens": 0,
            "input_cached_tokens": 0,
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
            "num_model_requests": 1,
            "project_id": None,
            "user_id": None,
            "api_key_id": None,
            "model": None,
            "batch": None,
        }
        item.update(result)
        full.append(item)
    return {"object": "bucket", "start_time": ts(start), "end_time": ts(end), "results": full}


def anthropic_cost_bucket(start: str, end: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"starting_at": start, "ending_at": end, "results": results}


def anthropic_usage_bucket(start: str, end: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"starting_at": start, "ending_at": end, "results": results}


async def change_budget(db: asyncpg.Connection, statement: str, *args: Any, at: datetime) -> None:
    """Run an UPDATE of a budget table as if the platform ran it at ``at``: the version of the terms it wrote
    (budget_terms, migration 0033: since now()) holds from ``at`` instead. Tests whose periods lie in the past
    change their budgets "during" those periods this way; a change made today holds for ended periods no more."""
    async with db.transaction():
        await db.execute(statement, *args)
        await db.execute("UPDATE budget_terms SET valid_from = $1 WHERE valid_from = now()", at)


async def migrate_before(database_url: str, tmp_path: Path, version: int) -> None:
    """Migrate the database with this repository's migrations before ``version`` only: the database an upgrade test
    starts from (a copy of the schema directory under ``tmp_path``)."""
    before = tmp_path / "schema"
    shutil.copytree(schema_dir(), before)
    for path in (before / "migrations").glob("*.sql"):
        if int(path.name[:4]) >= version:
            path.unlink()
    await migrate(database_url, directory=before)
