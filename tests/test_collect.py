"""The collector against a fake provider (tests/fake_providers.py), a real broker, PostgreSQL and the worker.

Proof for issue 14: documented shapes with cursor pagination, a 429 with Retry-After, flaky 5xx, a 401 for one
account, data that changes between two polls; the ledger equals the fake provider's final truth; a collector
killed mid-poll publishes nothing of that window and the next poll completes it; no admin key in any log line,
metric, error or message.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import REGISTRY, generate_latest

from tests.factories import Org, make_org
from tests.fake_providers import (
    OPENAI_USAGE,
    Canned,
    FakeProviders,
    anthropic_cost,
    anthropic_usage,
    openai_completions,
    openai_cost,
)
from tests.kafka_helpers import consume_all, create_topics, run_worker, worker_env
from worker import logs
from worker.collect import admin, runner
from worker.collect import keys as keystore
from worker.collect.client import ProviderClient
from worker.collect.errors import KeyStoreError, ProviderAuthFailed, ProviderRejected, ProviderUnavailable
from worker.collect.publisher import CollectorPublisher
from worker.collect.runner import Collector
from worker.collect.sources import ANTHROPIC_ENDPOINTS, OPENAI_ENDPOINTS
from worker.collect.store import Account, PollerConnection
from worker.collect.windows import day_start
from worker.config import Settings
from worker.devstack import free_port
from worker.errors import ConfigError, TransientError

COSTS = "/v1/organization/costs"
COMPLETIONS = "/v1/organization/usage/completions"
A_COSTS = "/v1/organizations/cost_report"
A_USAGE = "/v1/organizations/usage_report/messages"
DAY = timedelta(days=1)
TODAY = day_start(datetime.now(UTC))
D2, D1, D0 = TODAY - 2 * DAY, TODAY - DAY, TODAY


@dataclass
class World:
    fake: FakeProviders
    settings: Settings  # the collector's (role cost_worker_collector)
    keys: dict[str, str]  # account -> admin key
    orgs: dict[str, Org]
    log: io.StringIO


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def world(db: asyncpg.Connection, settings: Settings, tmp_path: Path) -> AsyncIterator[World]:
    keys = {acc: f"sk-admin-{acc}-{uuid.uuid4().hex}" for acc in ("org-oa", "org-an", "org-bad")}
    fake = FakeProviders({("openai", "org-oa"): keys["org-oa"], ("anthropic", "org-an"): keys["org-an"]})
    url = await fake.start()
    kek = tmp_path / "kek"
    kek.write_bytes(bytes(range(32)))
    collector_settings = settings.model_copy(
        update={
            "database_role": "cost_worker_collector",
            "collect_openai_base_url": url,
            "collect_anthropic_base_url": url,
            "collect_key_encryption_key_file": kek,
            "collect_trailing_days": 2,
            "collect_backfill_start": D2.date(),
            "collect_max_retry_after": 5.0,
            "collect_retry_initial_backoff": 0.05,  # production: 1 s (test_collect_units checks the defaults)
            "collect_retry_max_backoff": 0.5,
        }
    )
    orgs = {
        "org-oa": await make_org(db, provider="openai", ai_org="org-oa", project_ids=("proj_a", "proj_b")),
        "org-an": await make_org(db, provider="anthropic", ai_org="org-an", project_ids=("wrk_a", "wrk_b")),
        "org-bad": await make_org(db, provider="openai", ai_org="org-bad", project_ids=("proj_x",)),
    }
    for account, provider in (("org-oa", "openai"), ("org-an", "anthropic"), ("org-bad", "openai")):
        await admin.add(
            collector_settings,
            organization=orgs[account].id,
            provider=provider,
            account=account,
            name=account,
            secret_file=None,
            stdin=io.StringIO(keys[account] + "\n"),
        )
    await create_topics(settings)
    buffer = io.StringIO()
    logs.configure(level="DEBUG", fmt="json", secrets=collector_settings.secrets(), stream=buffer)
    yield World(fake, collector_settings, keys, orgs, buffer)
    await fake.stop()


ORG_BAD_REFUSED = ["openai/org-bad: admin key refused"]  # the world's org-bad: the fake refuses its key
ANTHROPIC_FAILED = [f"anthropic/org-an/{endpoint.report}: failed" for endpoint in ANTHROPIC_ENDPOINTS]


async def poll_once(target: Settings | Collector, missed: list[str] = ORG_BAD_REFUSED) -> Collector:
    """``collect --once``: exactly ``missed`` not collected (its exit code says so: 3, or 0 when nothing was)."""
    collector = target if isinstance(target, Collector) else Collector(target)
    code = await asyncio.wait_for(collector.run(once=True), 60)
    assert collector.missed == missed
    assert code == (runner.EXIT_INCOMPLETE if missed else runner.EXIT_OK)
    return collector


def seed_truth(fake: FakeProviders) -> None:
    """Poll 1's truth: three days (two closed, today's open bucket) of every report."""
    fake.openai_bucket(
        "org-oa",
        COSTS,
        D2,
        [
            openai_cost("1.25", "Input tokens", "proj_a"),
            openai_cost("0.000123456789012345678", "Output tokens", "proj_a"),
        ],
    )
    fake.openai_bucket(
        "org-oa", COSTS, D1, [openai_cost("2.5", "Input tokens", "proj_a"), openai_cost("0.75", "Web search", "proj_a")]
    )
    fake.openai_bucket("org-oa", COSTS, D0, [openai_cost("0.1", "Input tokens", "proj_b")])
    fake.openai_bucket("org-oa", COMPLETIONS, D1, [openai_completions("proj_a", "gpt-4o", 1000, 200, 50)])
    fake.openai_bucket("org-oa", COMPLETIONS, D0, [openai_completions("proj_b", "gpt-4o-mini", 10, 0, 5)])
    for name in OPENAI_USAGE[1:]:
        fake.openai_bucket("org-oa", f"/v1/organization/usage/{name}", D1, [])
    fake.anthropic_bucket(
        "org-an", A_COSTS, D2, [anthropic_cost("1234.5", "wrk_a", "Claude Sonnet 4 Usage - Input Tokens")]
    )
    fake.anthropic_bucket(
        "org-an",
        A_COSTS,
        D1,
        [
            anthropic_cost("99", "wrk_b", "Claude Sonnet 4 Usage - Output Tokens"),
            anthropic_cost("10", None, "Web Search"),
        ],
    )
    fake.anthropic_bucket("org-an", A_USAGE, D1, [anthropic_usage("wrk_a", "claude-sonnet-4-20250514", 100, 20)])


def revise_truth(fake: FakeProviders) -> None:
    """Between the polls: a late revision, a line moved between projects, and today's bucket growing."""
    fake.openai_bucket(
        "org-oa",
        COSTS,
        D1,
        [openai_cost("2.75", "Input tokens", "proj_a"), openai_cost("0.75", "Web search", "proj_b")],
    )
    fake.openai_bucket(
        "org-oa",
        COSTS,
        D0,
        [openai_cost("0.1", "Input tokens", "proj_b"), openai_cost("0.3", "Output tokens", "proj_b")],
    )
    fake.anthropic_bucket(
        "org-an",
        A_COSTS,
        D1,
        [
            anthropic_cost("120.25", "wrk_b", "Claude Sonnet 4 Usage - Output Tokens"),
            anthropic_cost("10", None, "Web Search"),
        ],
    )


def cost_truth(world: World) -> set[tuple[Any, ...]]:
    """The independent model: every cost result the fake serves now, as a ledger line."""
    lines: set[tuple[Any, ...]] = set()
    oa, an = world.orgs["org-oa"], world.orgs["org-an"]
    for bucket in world.fake.buckets[("openai", "org-oa", COSTS)]:
        for r in bucket["results"]:
            amount = Decimal(r["amount"]["value"].removeprefix("__number__:"))
            start = datetime.fromtimestamp(bucket["start_time"], tz=UTC)
            lines.add((oa.projects[r["project_id"]], start, r["line_item"], amount, "USD"))
    for bucket in world.fake.buckets[("anthropic", "org-an", A_COSTS)]:
        for r in bucket["results"]:
            project = an.projects[r["workspace_id"]] if r["workspace_id"] else None
            start = datetime.fromisoformat(bucket["starting_at"])
            lines.add((project, start, r["description"], Decimal(r["amount"]) / 100, "USD"))
    return lines


async def cost_ledger(db: asyncpg.Connection) -> set[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT project_id, bucket_start_time, line_item, amount, currency FROM cost_data "
        "WHERE api_version = 'costs_v1' AND superseded_at IS NULL"
    )
    return {(r["project_id"], r["bucket_start_time"], r["line_item"], r["amount"], r["currency"]) for r in rows}


def assert_no_key(world: World, *texts: str) -> None:
    for text in texts:
        for key in world.keys.values():
            assert key not in text
            assert key[-16:] not in text  # not even the key's tail


async def costs_of_day(db: asyncpg.Connection, day: datetime) -> Decimal:
    """What the ledger counts of the OpenAI costs bucket of ``day``."""
    total: Decimal = await db.fetchval(
        "SELECT sum(amount) FROM cost_data WHERE report = 'openai.costs' AND superseded_at IS NULL "
        "AND bucket_start_time = $1",
        day,
    )
    return total


async def test_collect_end_to_end_ledger_equals_the_providers_truth(
    world: World, db: asyncpg.Connection, settings: Settings
) -> None:
    fake = world.fake
    seed_truth(fake)
    fake.script[("org-oa", COSTS)] = [Canned(429, {"Retry-After": "1"}, '{"error": {"type": "rate_limit"}}')]
    fake.script[("org-oa", COMPLETIONS)] = [Canned(500)]
    fake.script[("org-an", A_COSTS)] = [Canned(503), Canned(502)]
    auth_before = _sample("cost_worker_collect_auth_failures_total", provider="openai", account="org-bad")

    await poll_once(world.settings)

    # 429: the retry waited for Retry-After; the 5xx were retried; every page of every window was followed.
    costs = [(status, at) for acc, path, _, status, at in fake.requests if acc == "org-oa" and path == COSTS]
    assert costs[0][0] == 429
    assert costs[1][0] == 200
    assert costs[1][1] - costs[0][1] >= 0.95
    assert [s for acc, p, _, s, _ in fake.requests if acc == "org-an" and p == A_COSTS][:3] == [503, 502, 200]
    assert len([1 for acc, p, _, s, _ in fake.requests if acc == "org-oa" and p == COSTS and s == 200]) == 3  # pages
    grouped = next(q for acc, p, q, s, _ in fake.requests if p == COMPLETIONS and s == 200)
    assert grouped["group_by"] == ["project_id", "model", "batch", "service_tier"]
    # 401 for one account: stopped after one request, counted, the others went on.
    assert [p for acc, p, _, s, _ in fake.requests if acc == "?"] == [COSTS]
    assert _sample("cost_worker_collect_auth_failures_total", provider="openai", account="org-bad") == auth_before + 1
    states = await db.fetch(
        "SELECT k.ai_organization_id, s.report, s.last_collected_at FROM collector_state s "
        "JOIN organization_api_keys k ON k.id = s.account_id"
    )
    assert {(r["ai_organization_id"]) for r in states} == {"org-oa", "org-an"}
    assert len(states) == len(OPENAI_ENDPOINTS) + len(ANTHROPIC_ENDPOINTS)
    # Each window's collected_at is taken just before it is read, so a provider row's coverage ends close to when
    # the provider was asked: the costs window waited 1 s for Retry-After, the completions window read after it
    # is a second later (one revision for the whole round would leave that time's estimates counting twice).
    at = {(r["ai_organization_id"], r["report"]): r["last_collected_at"] for r in states}
    assert len(set(at.values())) == len(at)  # one revision per window
    assert at[("org-oa", "openai.usage.completions")] - at[("org-oa", "openai.costs")] >= timedelta(seconds=0.95)

    # The worker applies poll 1: the ledger is the first truth.
    assert await run_worker(settings, idle=1.5) == 0
    assert await cost_ledger(db) == cost_truth(world)

    revise_truth(fake)
    await poll_once(world.settings)
    assert await db.fetchval("SELECT count(*) FROM collector_outbox") == 0

    messages = await consume_all(settings, settings.topic_provider_buckets, expect=1, timeout=10)
    envelopes = [json.loads(m.value) for m in messages]
    assert {m.key for m in messages} == {b"org-oa", b"org-an"}
    usage = [e for e in envelopes if e["provider"] == "openai" and e["api_version"] == "usage_v1"]
    assert usage
    assert all(e["endpoint"] in OPENAI_USAGE for e in usage)
    # A bucket is never split: each (poll, report, window) is exactly one message.
    seen = [
        (
            e["collected_at"],
            e["provider"],
            e.get("endpoint"),
            e["api_version"],
            json.dumps([e["bucket"].get(k) for k in ("start_time", "starting_at")]),
        )
        for e in envelopes
    ]
    assert len(seen) == len(set(seen))

    assert await run_worker(settings, idle=1.5) == 0
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
    truth = cost_truth(world)
    ledger = await cost_ledger(db)
    # Exactly the provider's final truth (Decimal, every digit): the late revisions are applied, and the line
    # moved from proj_a to proj_b left proj_a, because the newest collected_at of a window is its whole truth
    # (issue 11's snapshot rule: the old line is kept, marked superseded, and no longer counts).
    assert ledger == truth
    moved = (world.orgs["org-oa"].projects["proj_a"], D1, "Web search", Decimal("0.75"), "USD")
    assert moved not in ledger
    superseded = await db.fetch("SELECT project_id, line_item FROM cost_data WHERE superseded_at IS NOT NULL")
    assert (moved[0], "Web search") in {(r["project_id"], r["line_item"]) for r in superseded}

    # Usage: every token the provider reported lands once, on the right project and model (the line items'
    # token-type names belong to worker/providers.py, so the model checks per project and model totals).
    usage_rows = await db.fetch(
        "SELECT project_id, split_part(line_item, ':', 1) AS model, sum(quantity) AS tokens FROM cost_data "
        "WHERE api_version = 'usage_v1' AND superseded_at IS NULL AND line_item LIKE '%tokens%' "
        "GROUP BY 1, 2 HAVING sum(quantity) > 0"
    )
    oa, an = world.orgs["org-oa"].projects, world.orgs["org-an"].projects
    assert {(r["project_id"], r["model"], r["tokens"]) for r in usage_rows} == {
        (oa["proj_a"], "gpt-4o", 1000 + 50),  # input_tokens (cached included) + output_tokens
        (oa["proj_b"], "gpt-4o-mini", 10 + 5),
        (an["wrk_a"], "claude-sonnet-4-20250514", 100 + 20),
    }

    # No admin key anywhere: logs (every failure path above logged), metrics, messages, stored rows.
    log_text = world.log.getvalue()
    assert "collect_auth_failed" in log_text
    assert "collect_window_staged" in log_text
    stored = await db.fetch("SELECT * FROM organization_api_keys")
    assert_no_key(
        world,
        log_text,
        generate_latest(REGISTRY).decode(),
        *(m.value.decode() for m in messages),
        repr([dict(r) for r in stored]),
    )


async def test_a_response_that_is_not_valid_http_fails_only_that_account(world: World, db: asyncpg.Connection) -> None:
    """A provider (or a proxy in front of it) answering something aiohttp cannot parse fails that account's
    endpoints, typed and retried; the other accounts are polled as usual and the process does not stop."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: not-a-number\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    seed_truth(world.fake)
    settings = world.settings.model_copy(
        update={"collect_anthropic_base_url": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"}
    )
    try:
        await poll_once(settings, [*ANTHROPIC_FAILED, *ORG_BAD_REFUSED])
    finally:
        server.close()
        await server.wait_closed()
    states = await db.fetch(
        "SELECT k.ai_organization_id, s.report FROM collector_state s JOIN organization_api_keys k "
        "ON k.id = s.account_id"
    )
    assert {r["report"] for r in states if r["ai_organization_id"] == "org-oa"} == {e.report for e in OPENAI_ENDPOINTS}
    assert not [r for r in states if r["ai_organization_id"] == "org-an"]
    lines = [json.loads(line) for line in world.log.getvalue().splitlines() if line.startswith("{")]
    failed = {e["report"] for e in lines if e.get("event") == "collect_endpoint_failed" and e["account"] == "org-an"}
    assert failed == {e.report for e in ANTHROPIC_ENDPOINTS}
    assert all("not valid HTTP" in e["error"] for e in lines if e.get("event") == "collect_endpoint_failed")


async def test_an_endpoint_that_never_succeeded_turns_stale_counted_from_its_key(
    world: World, db: asyncpg.Connection
) -> None:
    """No collector_state row (the endpoint never succeeded) is no excuse: it counts from when its account got
    its current key, reported as its last success, and turns stale collect_stale_after later."""
    refused = [Canned(400, body='{"error": {"type": "invalid_request_error"}}')]
    costs_failed = [*ORG_BAD_REFUSED, "openai/org-oa/openai.costs: failed"]
    labels = {"provider": "openai", "account": "org-oa", "report": "openai.costs"}
    seed_truth(world.fake)
    world.fake.script[("org-oa", COSTS)] = list(refused)
    collector = Collector(world.settings)
    await poll_once(collector, costs_failed)
    added = await db.fetchval("SELECT created_at FROM organization_api_keys WHERE ai_organization_id = 'org-oa'")
    assert _sample("cost_worker_collect_last_success_timestamp_seconds", **labels) == added.timestamp()
    assert collector.health.stale == []  # the key is new: within collect_stale_after

    # The same, three hours after the key was added (beyond the default 2 h): stale, and /readyz says so.
    await db.execute(
        "UPDATE organization_api_keys SET created_at = now() - interval '3 hours' WHERE ai_organization_id = 'org-oa'"
    )
    world.fake.script[("org-oa", COSTS)] = list(refused)
    collector = Collector(world.settings)
    await poll_once(collector, costs_failed)
    assert collector.health.stale == ["openai/org-oa/openai.costs"]  # its other reports succeeded
    collector.health.active = True
    ready, why = collector.health.readiness()
    assert not ready
    assert "openai/org-oa/openai.costs" in why
    assert _sample("cost_worker_collect_seconds_since_last_success", **labels) > 3 * 3600 - 60

    # A new key (keys rotate) starts the clock again for the endpoints it has not polled yet.
    key_id = await db.fetchval("SELECT id FROM organization_api_keys WHERE ai_organization_id = 'org-oa'")
    await admin.rotate(world.settings, key_id=key_id, secret_file=None, stdin=io.StringIO(world.keys["org-oa"] + "\n"))
    world.fake.script[("org-oa", COSTS)] = list(refused)
    collector = Collector(world.settings)
    await poll_once(collector, costs_failed)
    assert collector.health.stale == []


async def test_keys_are_readable_only_by_the_collector_role(world: World, db: asyncpg.Connection) -> None:
    for role in ("cost_worker_writer", "cost_worker_reader"):
        async with db.transaction():
            await db.execute(f"SET LOCAL ROLE {role}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await db.fetch("SELECT * FROM organization_api_keys")
    async with db.transaction():
        await db.execute("SET LOCAL ROLE cost_worker_collector")
        assert await db.fetchval("SELECT count(*) FROM organization_api_keys") == 3


async def test_keys_commands_show_fingerprints_and_rotation_resumes_a_refused_account(
    world: World, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_truth(world.fake)
    await admin.list_keys(world.settings)
    listing = capsys.readouterr().out
    assert "org-bad" in listing
    assert "sha256:" in listing
    assert_no_key(world, listing)
    await poll_once(world.settings)
    bad_id = await db.fetchval("SELECT id FROM organization_api_keys WHERE ai_organization_id = 'org-bad'")
    # The operator fixes the key: the fake now knows a new one; rotate reads it from stdin.
    new_key = f"sk-admin-rotated-{uuid.uuid4().hex}"
    world.keys["new"] = new_key
    world.fake.keys[("openai", "org-bad")] = new_key
    await admin.rotate(world.settings, key_id=bad_id, secret_file=None, stdin=io.StringIO(new_key + "\n"))
    await poll_once(world.settings, [])
    assert await db.fetchval("SELECT count(*) FROM collector_state WHERE account_id = $1", bad_id) == len(
        OPENAI_ENDPOINTS
    )
    await admin.deactivate(world.settings, key_id=bad_id)
    out = capsys.readouterr().out
    assert "rotated" in out
    assert "deactivated" in out
    assert_no_key(world, out, world.log.getvalue())


async def test_the_key_encryption_key_rotates_with_keys_rewrap(
    world: World, db: asyncpg.Connection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The KEK rotates without re-entering a single admin key: the new one current, the old one previous, `keys
    rewrap`; then the old one can go. A key sealed under a KEK the operator no longer has is named (exit 1) and
    every other key is still rewrapped."""
    seed_truth(world.fake)
    assert world.settings.collect_key_encryption_key_file is not None
    old_kek = world.settings.collect_key_encryption_key_file
    new_kek = tmp_path / "kek-new"
    new_kek.write_bytes(bytes(range(100, 132)))
    before = {r["id"]: r for r in await db.fetch("SELECT * FROM organization_api_keys")}
    rotating = world.settings.model_copy(
        update={"collect_key_encryption_key_file": new_kek, "collect_previous_key_encryption_key_file": old_kek}
    )
    # Mid-rotation, before the rewrap: the collector opens keys the old KEK wrapped.
    await poll_once(rotating)
    # A key the new KEK already wraps is left alone (a second run, or an account added mid-rotation).
    world.keys["mid"] = f"sk-admin-mid-{uuid.uuid4().hex}"
    mid = await make_org(db, provider="openai", ai_org="org-mid", project_ids=("proj_m",))
    await admin.add(
        rotating,
        organization=mid.id,
        provider="openai",
        account="org-mid",
        name="mid",
        secret_file=None,
        stdin=io.StringIO(world.keys["mid"] + "\n"),
    )
    mid_row = await db.fetchrow("SELECT * FROM organization_api_keys WHERE ai_organization_id = 'org-mid'")
    assert mid_row is not None
    assert await admin.rewrap(rotating) == admin.EXIT_OK
    assert "rewrapped 3 admin key(s)" in capsys.readouterr().out
    after = {r["id"]: r for r in await db.fetch("SELECT * FROM organization_api_keys")}
    new_id = keystore.kek_id(keystore.load_kek(new_kek))
    assert {r["kek_id"] for r in after.values()} == {new_id}
    for key_id, row in before.items():
        assert after[key_id]["key_ciphertext"] == row["key_ciphertext"]
        assert after[key_id]["fingerprint"] == row["fingerprint"]
        assert after[key_id]["wrapped_key"] != row["wrapped_key"]
    assert after[mid_row["id"]]["wrapped_key"] == mid_row["wrapped_key"]
    assert await admin.rewrap(rotating) == admin.EXIT_OK
    assert "rewrapped 0 admin key(s)" in capsys.readouterr().out
    # The old KEK gone: the collector still opens every key (org-bad is refused by the provider, as before).
    rotated = world.settings.model_copy(update={"collect_key_encryption_key_file": new_kek})
    world.fake.keys[("openai", "org-mid")] = world.keys["mid"]
    await poll_once(rotated)
    # A row under a KEK nobody has any more: named with its key id; the rest is done.
    lost = keystore.seal(bytes(32), "openai", "org-oa", world.keys["org-oa"])
    lost_id = await db.fetchval(
        "UPDATE organization_api_keys SET key_ciphertext = $1, wrapped_key = $2, kek_id = $3 "
        "WHERE ai_organization_id = 'org-oa' RETURNING id",
        lost.ciphertext,
        lost.wrapped_key,
        lost.kek_id,
    )
    newest = tmp_path / "kek-newest"
    newest.write_bytes(bytes(range(200, 232)))
    again = world.settings.model_copy(
        update={"collect_key_encryption_key_file": newest, "collect_previous_key_encryption_key_file": new_kek}
    )
    with pytest.raises(KeyStoreError, match=f"1 admin key\\(s\\) left as they were: key {lost_id}: .*another"):
        await admin.rewrap(again)
    assert "rewrapped 3 admin key(s)" in capsys.readouterr().out
    assert await db.fetchval("SELECT kek_id FROM organization_api_keys WHERE id = $1", lost_id) == lost.kek_id
    assert_no_key(world, world.log.getvalue())


async def test_a_key_file_with_a_second_line_stops_only_its_account(
    world: World, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A mounted secret rewritten with a second line (or any whitespace inside the key): `keys add` refuses it
    with one line, and at poll time only that account stops (logged); the others are polled as usual."""
    org = await make_org(db, provider="anthropic", ai_org="org-an-file", project_ids=("wrk_z",))
    key = f"sk-ant-admin-file-{uuid.uuid4().hex}"
    world.keys["org-an-file"] = key
    world.fake.keys[("anthropic", "org-an-file")] = key
    secret = tmp_path / "anthropic-key"
    secret.write_text(f"{key}\nsk-ant-admin-second-line\n")

    async def add_file_account() -> None:
        await admin.add(
            world.settings,
            organization=org.id,
            provider="anthropic",
            account="org-an-file",
            name="file",
            secret_file=secret,
        )

    # The command's input, as a key on standard input is: a config error (exit 2) naming the file.
    with pytest.raises(ConfigError, match=f"--secret-file {secret}: .*not a single token"):
        await add_file_account()
    assert not await db.fetchval("SELECT count(*) FROM organization_api_keys WHERE ai_organization_id = 'org-an-file'")
    secret.write_text(key + "\n")
    await add_file_account()
    secret.write_text(f"{key}\nsk-ant-admin-second-line\n")  # the mounted secret changes under the collector
    seed_truth(world.fake)

    await poll_once(world.settings, ["anthropic/org-an-file: admin key unreadable", *ORG_BAD_REFUSED])

    states = await db.fetch(
        "SELECT k.ai_organization_id FROM collector_state s JOIN organization_api_keys k ON k.id = s.account_id"
    )
    polled = [r["ai_organization_id"] for r in states]
    assert polled.count("org-oa") == len(OPENAI_ENDPOINTS)
    assert polled.count("org-an") == len(ANTHROPIC_ENDPOINTS)
    assert "org-an-file" not in polled
    assert not [r for r in world.fake.requests if r[0] == "org-an-file"]
    lines = [json.loads(line) for line in world.log.getvalue().splitlines() if line.startswith("{")]
    unreadable = [e for e in lines if e.get("event") == "collect_key_unreadable"]
    assert [e["account"] for e in unreadable] == ["org-an-file"]
    assert "not a single token" in unreadable[0]["error"]
    assert_no_key(world, world.log.getvalue())


async def test_keys_add_names_why_the_database_refused_a_key(world: World, db: asyncpg.Connection) -> None:
    """A second key for an account, or a key for no organization: one line naming the cause, no row stored."""
    before = await db.fetchval("SELECT count(*) FROM organization_api_keys")
    with pytest.raises(KeyStoreError, match=r"^openai account org-oa already has a key for organization"):
        await admin.add(
            world.settings,
            organization=world.orgs["org-oa"].id,
            provider="openai",
            account="org-oa",
            name="again",
            secret_file=None,
            stdin=io.StringIO(world.keys["org-oa"] + "\n"),
        )
    nobody = uuid.uuid4()
    with pytest.raises(KeyStoreError, match=rf"^no organization {nobody}$"):
        await admin.add(
            world.settings,
            organization=nobody,
            provider="openai",
            account="org-elsewhere",
            name="elsewhere",
            secret_file=None,
            stdin=io.StringIO("sk-admin-elsewhere\n"),
        )
    assert await db.fetchval("SELECT count(*) FROM organization_api_keys") == before


async def test_killed_mid_poll_publishes_nothing_of_that_window_and_the_next_poll_completes_it(
    world: World, db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    fake = world.fake
    seed_truth(fake)
    for day in (D2, D1, D0):  # three pages of completions; park the second
        fake.openai_bucket("org-oa", COMPLETIONS, day, [openai_completions("proj_a", "gpt-4o", 10, 0, 1)])
    fake.holds[COMPLETIONS] = (1, asyncio.Event())
    log_path = tmp_path / "collector.log"
    env = worker_env(world.settings)
    env["COST_WORKER_DATABASE_ROLE"] = "cost_worker_collector"
    with log_path.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "worker", "collect", "--once"), stdout=out, stderr=out, env=env
        )
    await asyncio.wait_for(fake.held.wait(), 60)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    fake.holds.pop(COMPLETIONS)[1].set()  # the parked handler ends (else the server's cleanup waits 60 s for it)

    reports = {r["report"] for r in await db.fetch("SELECT report FROM collector_state")}
    assert "openai.costs" in reports
    assert "openai.usage.completions" not in reports
    staged = await db.fetch("SELECT report FROM collector_outbox")
    assert "openai.usage.completions" not in {r["report"] for r in staged}
    before = await consume_all(settings, settings.topic_provider_buckets, expect=1, timeout=5)
    assert not [m for m in before if json.loads(m.value).get("endpoint") == "completions"]

    await poll_once(world.settings)
    after = await consume_all(settings, settings.topic_provider_buckets, expect=len(before) + 1, timeout=10)
    completions = [json.loads(m.value) for m in after if json.loads(m.value).get("endpoint") == "completions"]
    assert sorted(e["bucket"]["start_time"] for e in completions) == [int(d.timestamp()) for d in (D2, D1, D0)]
    assert len({e["collected_at"] for e in completions}) == 1
    assert_no_key(world, log_path.read_text(), world.log.getvalue())


async def test_only_the_replica_holding_the_lock_polls(world: World, database_url: str) -> None:
    seed_truth(world.fake)
    holder = await asyncpg.connect(database_url)  # another replica, mid-poll
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock(hashtextextended('cost_worker.collector', 0))")
        assert await asyncio.wait_for(Collector(world.settings).run(once=True), 60) == 1
        assert world.fake.requests == []  # the standby asked the providers nothing
        # As a process: exit 1 said nothing on stderr (only a JSON log line on stdout), unlike every other error.
        code, stderr = await _collect_once_process(
            worker_env(world.settings, COST_WORKER_DATABASE_ROLE="cost_worker_collector")
        )
        assert code == 1
        assert stderr.strip() == (
            "cost-worker: error: another replica holds the poller lock (cost_worker.collector): nothing was polled"
        )
    finally:
        await holder.close()  # the lock goes with the connection: the standby takes over
    await poll_once(world.settings)
    assert world.fake.requests


async def test_a_lost_publisher_connection_is_replaced_and_polling_goes_on(
    world: World, db: asyncpg.Connection, settings: Settings
) -> None:
    """The publisher's database connection dropped while idle (a server restart, an idle-session timeout, a NAT
    or pooler): the next delivery opens a new one; staged windows go out and the next polls run. (Before, every
    delivery failed with "connection is closed" forever, no poll ran again, and /readyz said ok.)"""
    seed_truth(world.fake)
    collector = Collector(world.settings.model_copy(update={"collect_interval": 0.3}))
    running = asyncio.ensure_future(collector.run())

    async def settled() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM collector_state")) and not await db.fetchval(
            "SELECT count(*) FROM collector_outbox"
        )

    try:
        for _ in range(300):
            await asyncio.sleep(0.1)
            if await settled():
                break
        # Only the publisher's connection: the collector role's backend that does not hold the advisory lock.
        killed = await db.fetch(
            "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a WHERE a.datname = current_database() "
            "AND a.usename = session_user AND a.pid <> pg_backend_pid() "
            "AND a.backend_type = 'client backend' "
            "AND NOT EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory')"
        )
        assert len(killed) == 1
        revise_truth(world.fake)
        requests = len(world.fake.requests)
        reconnected = drained = False
        for _ in range(300):
            await asyncio.sleep(0.1)
            reconnected = "collect_outbox_reconnecting" in world.log.getvalue()
            # Polls run every 0.3 s and stage new rows each time: the outbox is empty only between a delivery and
            # the next poll, so that moment is taken where it is seen (asking again after it raced the next poll).
            drained = await settled()
            if reconnected and len(world.fake.requests) > 2 * requests and drained:
                break
        assert reconnected
        assert len(world.fake.requests) > 2 * requests  # more than one poll after the loss
        assert drained
        assert collector.health.readiness() == (True, "ok: active poller")
        assert not running.done()
    finally:
        collector.stop.set()
        assert await asyncio.wait_for(running, 30) == 0
    messages = await consume_all(settings, settings.topic_provider_buckets, expect=1, timeout=10)
    revised = [m for m in messages if b'"value":2.75' in m.value]
    assert revised  # the revision made after the loss was published


async def test_a_lost_poller_connection_stops_the_poller_and_frees_the_lock(
    world: World, db: asyncpg.Connection
) -> None:
    """README: the advisory lock lives on the poller's own connection; when that connection is lost the poller
    stops with a transient error (`cost-worker collect` exits 1, the pod restarts) and another replica may take
    over. Unlike the publisher's connection, it is never silently replaced (a new one would not hold the lock)."""
    seed_truth(world.fake)
    collector = Collector(world.settings.model_copy(update={"collect_interval": 0.3}))
    running = asyncio.ensure_future(collector.run())
    try:
        for _ in range(300):
            await asyncio.sleep(0.1)
            if await db.fetchval("SELECT count(*) FROM collector_state"):
                break
        killed = await db.fetch(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
        )
        assert len(killed) == 1
        with pytest.raises(TransientError):
            await asyncio.wait_for(running, 30)
    finally:
        collector.stop.set()
        if not running.done():
            running.cancel()
    assert collector.health.active is False
    assert await db.fetchval("SELECT pg_try_advisory_lock(hashtextextended('cost_worker.collector', 0))")
    await db.fetchval("SELECT pg_advisory_unlock(hashtextextended('cost_worker.collector', 0))")


async def test_staged_windows_survive_a_broker_outage_and_go_out_whole_on_the_next_start(
    world: World, db: asyncpg.Connection, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_truth(world.fake)
    del world.keys["org-bad"]
    await db.execute("UPDATE organization_api_keys SET is_active = false WHERE ai_organization_id = 'org-bad'")

    async def broker_down(self: CollectorPublisher, rows: object) -> None:
        raise TransientError("broker unreachable (test)")

    monkeypatch.setattr(CollectorPublisher, "_send", broker_down)
    collector = Collector(world.settings)
    running = asyncio.ensure_future(collector.run())
    staged = 0
    for _ in range(200):  # the whole poll is staged, then delivery keeps failing
        await asyncio.sleep(0.1)
        staged = await db.fetchval("SELECT count(*) FROM collector_outbox")
        done = await db.fetchval("SELECT count(*) FROM collector_state")
        if done == len(OPENAI_ENDPOINTS) + len(ANTHROPIC_ENDPOINTS):
            break
    collector.stop.set()  # SIGTERM during the outage: the staged rows stay
    assert await asyncio.wait_for(running, 60) == 0
    assert staged > 0
    assert await db.fetchval("SELECT count(*) FROM collector_outbox") == staged
    first_poll = {r["message"] for r in await db.fetch("SELECT message FROM collector_outbox")}

    monkeypatch.undo()
    await poll_once(world.settings, [])
    assert await db.fetchval("SELECT count(*) FROM collector_outbox") == 0
    delivered = await consume_all(settings, settings.topic_provider_buckets, expect=2 * staged, timeout=15)
    assert first_poll <= {m.value for m in delivered}  # the first poll went out whole, byte for byte
    first = {datetime.fromisoformat(json.loads(m)["collected_at"]) for m in first_poll}
    second = {
        datetime.fromisoformat(json.loads(m.value)["collected_at"]) for m in delivered if m.value not in first_poll
    }
    assert first
    assert second
    assert max(first) < min(second)  # two revisions of every window: the second poll's are the newer


def test_keys_commands_as_processes_read_the_key_from_stdin_and_never_print_it(world: World, tmp_path: Path) -> None:
    env = worker_env(world.settings)
    env["COST_WORKER_DATABASE_ROLE"] = "cost_worker_collector"
    key = f"sk-admin-cli-{uuid.uuid4().hex}"
    world.keys["cli"] = key
    cli = [sys.executable, "-m", "worker"]
    added = subprocess.run(
        [
            *cli,
            "keys",
            "add",
            "--organization",
            str(world.orgs["org-oa"].id),
            "--provider",
            "anthropic",
            "--account",
            "org-cli",
        ],
        input=key + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    listed = subprocess.run([*cli, "keys", "list"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert "org-cli" in listed.stdout
    # The same account again: one clear line, no traceback, no key.
    again = subprocess.run(
        [
            *cli,
            "keys",
            "add",
            "--organization",
            str(world.orgs["org-oa"].id),
            "--provider",
            "anthropic",
            "--account",
            "org-cli",
        ],
        input=key + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert again.returncode == 1
    assert "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    empty = subprocess.run(
        [
            *cli,
            "keys",
            "add",
            "--organization",
            str(world.orgs["org-oa"].id),
            "--provider",
            "openai",
            "--account",
            "org-empty",
        ],
        input="",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert empty.returncode == 2
    assert "standard input" in empty.stderr
    env["COST_WORKER_COLLECT_ANTHROPIC_BASE_URL"] = "https://proxy-user:proxy-pass@egress.example"
    shown = subprocess.run([*cli, "check-config"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "proxy-pass" not in shown.stdout
    assert "https://proxy-user:***@egress.example" in shown.stdout
    assert_no_key(world, *(p.stdout + p.stderr for p in (added, listed, again, empty, shown)))


async def test_retry_policy_against_the_fake_provider() -> None:
    key = f"sk-admin-{uuid.uuid4().hex}"
    fake = FakeProviders({("openai", "org-1"): key})
    url = await fake.start()
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    endpoint = OPENAI_ENDPOINTS[0]
    params = endpoint.params(D1, D0 + DAY, None)
    try:
        async with aiohttp.ClientSession() as session:
            client = ProviderClient(session, max_attempts=3, max_retry_after=30.0, backoff_initial=0.5, sleep=record)
            auth = {"Authorization": f"Bearer {key}"}
            # Retry-After as an HTTP date is honoured too; then the page arrives.
            later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
            fake.script[("org-1", COSTS)] = [Canned(429, {"Retry-After": later})]
            assert (await client.get_page(url, endpoint, "org-1", auth, params))["object"] == "page"
            assert 15 <= waits[-1] <= 20
            # 5xx until the attempts run out: the last error, after exponential backoff.
            waits.clear()
            fake.script[("org-1", COSTS)] = [Canned(500), Canned(502), Canned(503)]
            with pytest.raises(ProviderUnavailable, match="HTTP 503"):
                await client.get_page(url, endpoint, "org-1", auth, params)
            assert len(waits) == 2
            assert waits[1] > waits[0] * 1.2 or waits[1] >= 1.0
            # A Retry-After beyond the ceiling fails at once (the next poll retries), never sleeping an hour.
            waits.clear()
            fake.script[("org-1", COSTS)] = [Canned(429, {"Retry-After": "3600"})]
            with pytest.raises(ProviderRejected, match="Retry-After"):
                await client.get_page(url, endpoint, "org-1", auth, params)
            assert waits == []
            # A refused key: no retry, and neither the key nor the provider's echo of it in the error.
            wrong = f"sk-admin-wrong-{uuid.uuid4().hex}"
            with pytest.raises(ProviderAuthFailed) as refused:
                await client.get_page(url, endpoint, "org-1", {"Authorization": f"Bearer {wrong}"}, params)
            assert wrong not in str(refused.value)
            assert wrong[-12:] not in repr(refused.value)
            assert waits == []
            # Connection refused: retried, then a transient error naming no URL credentials or key.
            await fake.stop()
            with pytest.raises(ProviderUnavailable, match="cannot reach"):
                await client.get_page(url, endpoint, "org-1", auth, params)
    finally:
        await fake.stop()


async def test_sigterm_stops_the_collector_cleanly(world: World, db: asyncpg.Connection, tmp_path: Path) -> None:
    seed_truth(world.fake)
    env = worker_env(world.settings)
    env["COST_WORKER_DATABASE_ROLE"] = "cost_worker_collector"
    log_path = tmp_path / "collector.log"
    with log_path.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "collect", stdout=out, stderr=out, env=env
        )
    try:
        for _ in range(300):  # a first poll completes, then the collector waits for the next interval
            await asyncio.sleep(0.1)
            if await db.fetchval("SELECT count(*) FROM collector_state") and not await db.fetchval(
                "SELECT count(*) FROM collector_outbox"
            ):
                break
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
    text = log_path.read_text()
    assert "shutdown_requested" in text
    assert_no_key(world, text)


async def test_a_poller_whose_clock_is_behind_the_last_poll_still_publishes_a_newer_revision(
    world: World, db: asyncpg.Connection, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker keeps the newest ``collected_at`` of a window and ignores older ones. A poll by a replica whose
    clock is ahead (or before the clock was stepped back by NTP) must not freeze the ledger: the next poll's
    revision is later than every revision already published for that report, whatever the clock says."""
    fake = world.fake
    seed_truth(fake)

    class Ahead(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + timedelta(hours=1)

    monkeypatch.setattr(runner, "datetime", Ahead)
    await poll_once(world.settings)
    assert await run_worker(settings, idle=1.5) == 0
    assert await cost_ledger(db) == cost_truth(world)

    monkeypatch.setattr(runner, "datetime", datetime)  # the next replica's clock is right: an hour "earlier"
    revise_truth(fake)
    await poll_once(world.settings)
    assert await run_worker(settings, idle=1.5) == 0
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
    assert await cost_ledger(db) == cost_truth(world)  # the late revisions and today's growth are applied


async def test_a_page_larger_than_one_network_read_is_read_whole(
    world: World, db: asyncpg.Connection, settings: Settings
) -> None:
    """A page arrives over many TCP reads: a day of an organization with many projects and line items is a few
    hundred kilobytes. All of it is read (not the first chunk only, which is not JSON: the window would fail on
    every poll and its money never be collected)."""
    fake = world.fake
    results = [openai_cost("0.01", f"line item {n:05d} " + "x" * 150, "proj_a") for n in range(1_500)]
    fake.openai_bucket("org-oa", COSTS, D1, results)  # about 330 kB, under the default 1 MiB message limit
    await poll_once(world.settings)
    assert "the response is not JSON" not in world.log.getvalue()
    assert await run_worker(settings, idle=1.5) == 0
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
    total = await costs_of_day(db, D1)
    assert total == Decimal("15.00")


async def test_a_bucket_within_a_raised_message_limit_is_published_and_counted(
    world: World, db: asyncpg.Connection, settings: Settings
) -> None:
    """The README's remedy for a bucket larger than COST_WORKER_MAX_MESSAGE_BYTES is to raise the limit. A bucket
    under the raised limit (here 2.5 MB under 3 MiB) must then reach the worker whole: the producer's own request
    limit must follow, else the row stays staged, retried forever, and blocks every window staged after it."""
    limit = 3 * 1_048_576
    fake = world.fake
    results = [openai_cost("0.01", f"line item {n:05d} " + "x" * 150, "proj_a") for n in range(9_000)]
    fake.openai_bucket("org-oa", COSTS, D1, results)
    collector = world.settings.model_copy(update={"max_message_bytes": limit})
    await poll_once(collector)
    assert await db.fetchval("SELECT count(*) FROM collector_outbox") == 0
    assert await run_worker(settings.model_copy(update={"max_message_bytes": limit}), idle=1.5) == 0
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
    total = await costs_of_day(db, D1)
    assert total == Decimal("90.00")


async def test_a_bucket_with_more_results_than_the_worker_takes_waits_instead_of_being_quarantined(
    world: World, db: asyncpg.Connection, settings: Settings
) -> None:
    """The worker quarantines a message of more than COST_WORKER_MAX_RESULTS_PER_MESSAGE results, and a
    quarantined message is no revision. Published anyway, the window's state would advance and, once the day left
    the trailing re-read, the bucket would never be read again: its money lost even after the limit is raised. So
    the collector refuses it like an oversized bucket: the window waits and is read whole once the limit allows."""
    fake = world.fake
    results = [openai_cost("0.01", f"line item {n}", "proj_a") for n in range(150)]
    fake.openai_bucket("org-oa", COSTS, D1, results)
    small = {"max_results_per_message": 100}
    await poll_once(world.settings.model_copy(update=small), [*ORG_BAD_REFUSED, "openai/org-oa/openai.costs: failed"])
    assert "more than COST_WORKER_MAX_RESULTS_PER_MESSAGE" in world.log.getvalue()
    assert await db.fetchval("SELECT count(*) FROM collector_state WHERE report = 'openai.costs'") == 0
    assert await run_worker(settings.model_copy(update=small), idle=1.5) == 0
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0

    await poll_once(world.settings)  # the limit raised
    assert await run_worker(settings, idle=1.5) == 0
    total = await costs_of_day(db, D1)
    assert total == Decimal("1.50")


async def test_a_bucket_the_provider_serves_again_on_the_next_page_is_counted_once(
    world: World, db: asyncpg.Connection, settings: Settings
) -> None:
    """A provider whose cursor points at the last bucket it served (not past it) serves that bucket again on the
    next page, whole. Taken as a bucket "continued on the next page", its results were appended to themselves and
    the worker summed each line twice: the day cost double."""
    fake = world.fake
    seed_truth(fake)
    fake.page_size, fake.overlap = 2, 1  # pages [D2, D1], [D1, D0]
    await poll_once(world.settings)
    assert await run_worker(settings, idle=1.5) == 0
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
    assert await costs_of_day(db, D1) == Decimal("3.25")  # 2.5 + 0.75, once
    assert await cost_ledger(db) == cost_truth(world)


async def test_openai_windows_never_ask_for_an_end_time_in_the_future(
    world: World, db: asyncpg.Connection, settings: Settings
) -> None:
    """The window ends at the end of today's open bucket, the next midnight. Sent as ``end_time``, that is in the
    provider's future, which the API is reported to refuse (HTTP 400): every OpenAI window failed on every poll and
    no OpenAI money was ever collected. Without ``end_time`` the report runs up to now, open bucket included."""
    fake = world.fake
    seed_truth(fake)
    await poll_once(world.settings)
    openai = [(query, status) for acc, path, query, status, _ in fake.requests if acc == "org-oa"]
    assert openai
    assert [status for _, status in openai if status != 200] == []
    assert all("end_time" not in query for query, _ in openai)
    assert await run_worker(settings, idle=1.5) == 0
    assert await costs_of_day(db, D0) == Decimal("0.1")  # the open bucket
    assert await cost_ledger(db) == cost_truth(world)


@pytest.mark.parametrize("open_end_days", [31, None])
async def test_a_window_longer_than_a_report_covers_from_one_start_is_read_whole(
    world: World, db: asyncpg.Connection, settings: Settings, open_end_days: int | None
) -> None:
    """A first poll from a backfill start 40 days back (or the poll after an outage of weeks) asks for one window
    from its start, without an end. A report that covers 31 days from a start it was given without an end (as
    Anthropic documents for its analytics API) answered the first 31 days, has_more false; the state moved to the
    end of today, so the nine days after were never asked for again: their money was lost for good. (A report that
    runs up to now answers every day at once: each day is still counted once.)"""
    fake = world.fake
    fake.page_size, fake.open_end_days = 31, open_end_days
    start = D0 - 40 * DAY
    for n in range(41):
        fake.openai_bucket("org-oa", COSTS, start + n * DAY, [openai_cost("1", "Input tokens", "proj_a")])
    backfill = world.settings.model_copy(update={"collect_backfill_start": start.date()})
    await poll_once(backfill)
    assert await run_worker(settings, idle=1.5) == 0
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
    total = await db.fetchval(
        "SELECT sum(amount) FROM cost_data WHERE report = 'openai.costs' AND superseded_at IS NULL"
    )
    assert total == Decimal("41")


async def test_retry_after_is_read_on_the_providers_clock_and_honoured_on_a_5xx_too() -> None:
    """A Retry-After date is a moment on the provider's clock: read against ours, a provider clock an hour behind
    made a 20 s wait no wait at all (every attempt spent at once on a rate-limited provider), and an hour ahead
    made it an hour (the request failed). The response's Date says what the provider's clock reads. A 503 with
    Retry-After (RFC 9110: how long the service expects to be unavailable) is waited for like a 429's."""
    key = f"sk-admin-{uuid.uuid4().hex}"
    fake = FakeProviders({("openai", "org-1"): key})
    url = await fake.start()
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    endpoint = OPENAI_ENDPOINTS[0]
    params = endpoint.params(D1, D0 + DAY, None)
    auth = {"Authorization": f"Bearer {key}"}
    try:
        async with aiohttp.ClientSession() as session:
            client = ProviderClient(session, max_attempts=3, max_retry_after=30.0, backoff_initial=0.5, sleep=record)
            for skew in (timedelta(hours=-1), timedelta(hours=1)):
                theirs = datetime.now(UTC) + skew
                headers = {
                    "Date": email.utils.format_datetime(theirs, usegmt=True),
                    "Retry-After": email.utils.format_datetime(theirs + timedelta(seconds=20), usegmt=True),
                }
                waits.clear()
                fake.script[("org-1", COSTS)] = [Canned(429, headers)]
                assert (await client.get_page(url, endpoint, "org-1", auth, params))["object"] == "page"
                assert waits == [20.0], skew
            waits.clear()
            fake.script[("org-1", COSTS)] = [Canned(503, {"Retry-After": "7"})]
            assert (await client.get_page(url, endpoint, "org-1", auth, params))["object"] == "page"
            assert waits == [7.0]
    finally:
        await fake.stop()


async def test_a_deactivated_account_leaves_the_freshness_metrics_and_raises_no_stale_alert(
    world: World, db: asyncpg.Connection
) -> None:
    """`keys deactivate` stops polling an account. Its freshness series stayed in the registry with their last
    values, the timestamp frozen: two hours later CostCollectorStale (time() - last success > 2 h) fired for an
    account nobody polls any more, and kept firing until the collector restarted."""
    seed_truth(world.fake)
    await poll_once(world.settings)
    labels = {"provider": "anthropic", "account": "org-an", "report": "anthropic.cost_report"}
    assert _sample("cost_worker_collect_last_success_timestamp_seconds", **labels) > 0
    key_id = await db.fetchval("SELECT id FROM organization_api_keys WHERE ai_organization_id = 'org-an'")
    await admin.deactivate(world.settings, key_id=key_id)
    await poll_once(world.settings)
    for name in (
        "cost_worker_collect_last_success_timestamp_seconds",
        "cost_worker_collect_seconds_since_last_success",
        "cost_worker_collect_newest_bucket_end_timestamp_seconds",
    ):
        assert REGISTRY.get_sample_value(name, labels) is None, name
    oa = {"provider": "openai", "account": "org-oa", "report": "openai.costs"}
    assert _sample("cost_worker_collect_last_success_timestamp_seconds", **oa) > 0  # the active ones stay


async def test_a_refused_account_is_tried_again_after_the_auth_retry_interval(
    world: World, db: asyncpg.Connection
) -> None:
    """A provider's transient 401 (an incident on its side) stopped the account until its key changed or the pod
    restarted: its money was no longer collected, for good. Now a refused key waits
    COST_WORKER_COLLECT_AUTH_RETRY_INTERVAL, then is tried once more (one request): 200s, and the account is polled
    again as before; refused again, it waits another interval."""
    seed_truth(world.fake)
    await db.execute("UPDATE organization_api_keys SET is_active = false WHERE ai_organization_id = 'org-bad'")
    oa = {"provider": "openai", "account": "org-oa"}
    failures = _sample("cost_worker_collect_auth_failures_total", **oa)
    collector = Collector(world.settings.model_copy(update={"collect_auth_retry_interval": 1.0}))
    world.fake.script[("org-oa", COSTS)] = [Canned(401)]  # one glitch, then 200s

    def asked() -> int:
        return len([1 for acc, *_ in world.fake.requests if acc == "org-oa"])

    await asyncio.wait_for(collector.run(once=True), 60)
    assert asked() == 1  # the first request refused: the account's other endpoints were not asked
    assert _sample("cost_worker_collect_auth_failures_total", **oa) == failures + 1
    assert _sample("cost_worker_collect_account_refused", **oa) == 1
    await asyncio.wait_for(collector.run(once=True), 60)  # within the interval: not asked again
    assert asked() == 1
    assert "collect_account_stopped" in world.log.getvalue()

    await asyncio.sleep(1.1)
    await asyncio.wait_for(collector.run(once=True), 60)
    assert asked() > 1
    polled = await db.fetchval(
        "SELECT count(*) FROM collector_state s JOIN organization_api_keys k ON k.id = s.account_id "
        "WHERE k.ai_organization_id = 'org-oa'"
    )
    assert polled == len(OPENAI_ENDPOINTS)  # every endpoint of the account collected again
    assert _sample("cost_worker_collect_auth_failures_total", **oa) == failures + 1
    assert REGISTRY.get_sample_value("cost_worker_collect_account_refused", oa) is None

    # Refused again on the try after the interval: one request, counted, and another interval to wait. (A 403 is
    # one endpoint's missing permission: test_a_403_on_one_endpoint_refuses_that_endpoint_only.)
    world.fake.script[("org-oa", COSTS)] = [Canned(401), Canned(401)]
    before = asked()
    await asyncio.wait_for(collector.run(once=True), 60)
    assert asked() == before + 1
    await asyncio.sleep(1.1)
    await asyncio.wait_for(collector.run(once=True), 60)
    assert asked() == before + 2  # the one try, not every endpoint
    assert _sample("cost_worker_collect_auth_failures_total", **oa) == failures + 3
    await asyncio.wait_for(collector.run(once=True), 60)
    assert asked() == before + 2
    assert _sample("cost_worker_collect_account_refused", **oa) == 1


async def test_a_403_on_one_endpoint_refuses_that_endpoint_only(world: World, db: asyncpg.Connection) -> None:
    """An admin key allowed to read usage but not costs (a 403 on /costs, 200 elsewhere) stopped the whole account
    until the auth retry interval: none of its usage was collected for the permission it lacked on one report.
    Now a 403 refuses that endpoint only (tried again after COST_WORKER_COLLECT_AUTH_RETRY_INTERVAL, at once after
    a new key); the account's other endpoints go on; the gauge, the log line and --once's missed list name the
    endpoint. A 401 (the key itself refused) still refuses the whole account."""
    seed_truth(world.fake)
    await db.execute("UPDATE organization_api_keys SET is_active = false WHERE ai_organization_id = 'org-bad'")
    oa = {"provider": "openai", "account": "org-oa"}
    costs = {**oa, "report": "openai.costs"}
    refusals = _sample("cost_worker_collect_endpoint_refusals_total", **costs)
    account_failures = _sample("cost_worker_collect_auth_failures_total", **oa)
    collector = Collector(world.settings.model_copy(update={"collect_auth_retry_interval": 1.0}))
    world.fake.script[("org-oa", COSTS)] = [Canned(403), Canned(403)]

    def asked(path: str) -> int:
        return len([1 for acc, p, *_ in world.fake.requests if acc == "org-oa" and p == path])

    async def polled() -> set[str]:
        rows = await db.fetch(
            "SELECT s.report FROM collector_state s JOIN organization_api_keys k ON k.id = s.account_id "
            "WHERE k.ai_organization_id = 'org-oa'"
        )
        return {r["report"] for r in rows}

    await poll_once(collector, ["openai/org-oa/openai.costs: endpoint refused (HTTP 403)"])
    assert asked(COSTS) == 1
    assert await polled() == {e.report for e in OPENAI_ENDPOINTS} - {"openai.costs"}  # the rest was collected
    assert not collector.refusals.refused  # the account is not refused (its gauge is process-wide: not asked)
    assert _sample("cost_worker_collect_endpoint_refused", **costs) == 1
    assert _sample("cost_worker_collect_endpoint_refusals_total", **costs) == refusals + 1
    assert _sample("cost_worker_collect_auth_failures_total", **oa) == account_failures  # not the account's key
    lines = [json.loads(line) for line in world.log.getvalue().splitlines() if line.startswith("{")]
    [refused] = [e for e in lines if e.get("event") == "collect_endpoint_refused"]
    assert (refused["account"], refused["report"], refused["status"]) == ("org-oa", "openai.costs", 403)

    # Within the interval: that endpoint is not asked, the others are.
    completions = asked(COMPLETIONS)
    code = await asyncio.wait_for(collector.run(once=True), 60)
    assert code == runner.EXIT_INCOMPLETE
    [missed] = collector.missed
    assert missed.startswith("openai/org-oa/openai.costs: endpoint refused (HTTP 403, next try in ")
    assert asked(COSTS) == 1
    assert asked(COMPLETIONS) > completions
    assert "collect_endpoint_stopped" in world.log.getvalue()

    # After the interval: tried again (one request), refused again, counted again.
    await asyncio.sleep(1.1)
    await poll_once(collector, ["openai/org-oa/openai.costs: endpoint refused (HTTP 403)"])
    assert asked(COSTS) == 2
    assert _sample("cost_worker_collect_endpoint_refusals_total", **costs) == refusals + 2

    # The permission granted: the next try is accepted, the endpoint collected, its gauge series gone.
    await asyncio.sleep(1.1)
    await poll_once(collector, [])
    assert await polled() == {e.report for e in OPENAI_ENDPOINTS}
    assert REGISTRY.get_sample_value("cost_worker_collect_endpoint_refused", costs) is None
    assert "collect_endpoint_resumed" in world.log.getvalue()


async def test_collect_once_exits_non_zero_when_the_poll_did_not_collect_everything(
    world: World, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """`collect --once` from a cron job or a Kubernetes Job: it exited 0 even when every endpoint failed, so the
    job "succeeded" while no money was collected. Now 3 (EXIT_INCOMPLETE) when any endpoint failed or any account
    was refused, with one line naming what was missed; 0 only when every endpoint of every active account was read
    and published."""
    seed_truth(world.fake)
    world.fake.script[("org-an", A_COSTS)] = [Canned(400, body='{"error": {"type": "invalid_request_error"}}')]
    # org-bad's key is refused (401), org-an's cost report fails (400), the rest is read.
    assert await asyncio.wait_for(Collector(world.settings).run(once=True), 60) == runner.EXIT_INCOMPLETE
    lines = [json.loads(line) for line in world.log.getvalue().splitlines() if line.startswith("{")]
    [incomplete] = [e for e in lines if e.get("event") == "collect_round_incomplete"]
    assert incomplete["missed"] == [
        "anthropic/org-an/anthropic.cost_report: failed",
        "openai/org-bad: admin key refused",
    ]

    # The same as a process: exit 3 and one line on stderr naming what was missed.
    env = worker_env(world.settings)
    env["COST_WORKER_DATABASE_ROLE"] = "cost_worker_collector"
    world.fake.script[("org-an", A_COSTS)] = [Canned(500)] * 10  # beyond every retry
    env["COST_WORKER_COLLECT_MAX_ATTEMPTS"] = "2"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "collect",
        "--once",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 3
    stderr = err.decode()
    assert "cost-worker: error: the poll did not collect everything" in stderr
    assert "anthropic/org-an/anthropic.cost_report: failed" in stderr
    assert "openai/org-bad: admin key refused" in stderr
    assert_no_key(world, stderr)

    # Everything read and published: 0.
    world.fake.script.clear()
    await db.execute("UPDATE organization_api_keys SET is_active = false WHERE ai_organization_id = 'org-bad'")
    assert await asyncio.wait_for(Collector(world.settings).run(once=True), 60) == 0
    assert await db.fetchval("SELECT count(*) FROM collector_outbox") == 0


async def _collect_once_process(env: dict[str, str]) -> tuple[int | None, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "collect", "--once", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, err.decode()


@pytest.mark.parametrize("service", ["database", "kafka"])
async def test_collect_once_gives_up_on_an_unreachable_database_or_broker(world: World, service: str) -> None:
    """`collect --once` from a CronJob while PostgreSQL or the broker is down waited for it without limit: a job
    hung until someone noticed. Now it waits COST_WORKER_COLLECT_ONCE_MAX_WAIT, then exits 1 with one line naming
    the service and the setting (the long-running collector still waits as long as it takes)."""
    env = worker_env(world.settings, COST_WORKER_DATABASE_ROLE="cost_worker_collector")
    env["COST_WORKER_COLLECT_ONCE_MAX_WAIT"] = "2"
    closed = f"127.0.0.1:{free_port()}"
    if service == "database":
        env["COST_WORKER_DATABASE_URL"] = f"postgresql://postgres@{closed}/postgres"
    else:
        env["COST_WORKER_KAFKA_BOOTSTRAP_SERVERS"] = closed
    code, stderr = await _collect_once_process(env)
    assert code == 1, stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("cost-worker: error:")]
    assert line.startswith(f"cost-worker: error: {service} unreachable for ")
    assert "COST_WORKER_COLLECT_ONCE_MAX_WAIT" in line


async def test_collect_once_gives_up_publishing_when_the_broker_keeps_failing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker reachable at the start, then failing every delivery: `--once` retried publishing without limit.
    Now it stops after COST_WORKER_COLLECT_ONCE_MAX_WAIT; the windows stay staged for the next start and the exit
    code is 3, naming them."""
    seed_truth(world.fake)

    async def failing(_: CollectorPublisher) -> None:
        raise TransientError("broker down")

    monkeypatch.setattr(CollectorPublisher, "drain", failing)
    collector = Collector(world.settings.model_copy(update={"collect_once_max_wait": 1.0}))
    assert await asyncio.wait_for(collector.run(once=True), 60) == runner.EXIT_INCOMPLETE
    assert any(m.startswith("staged windows left unpublished") for m in collector.missed), collector.missed
    assert "collect_publish_left_for_next_start" in world.log.getvalue()


async def test_collect_once_gives_up_a_poll_the_database_keeps_failing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round failing on the database after the poller lock was taken (a statement timeout, a serialization
    failure on every try) was retried without limit by `--once`. Now it gives up after
    COST_WORKER_COLLECT_ONCE_MAX_WAIT with exit 3, saying why."""

    async def failing(_: PollerConnection) -> list[Account]:
        raise TransientError("statement timeout")

    monkeypatch.setattr(PollerConnection, "accounts", failing)
    collector = Collector(world.settings.model_copy(update={"collect_once_max_wait": 1.0}))
    assert await asyncio.wait_for(collector.run(once=True), 60) == runner.EXIT_INCOMPLETE
    [missed] = collector.missed
    assert missed.startswith("the poll failed on the database or the broker for over COST_WORKER_COLLECT_ONCE_MAX_WAIT")
    assert "statement timeout" in missed


async def test_a_response_header_no_clock_can_read_is_ignored_and_polling_goes_on(world: World) -> None:
    """A provider (or a proxy in front of it) sending a Retry-After of superscript digits, or a Date in a year no
    clock holds: the client raised a bare ValueError / OverflowError, which no part of the collector expects, so
    the whole collector stopped (exit 1, "internal error") and no account was polled. The header counts as
    absent: a 429 without a usable Retry-After backs off like a 5xx, a 200 is read."""
    seed_truth(world.fake)
    far = "Mon, 01 Jan 99999999999 00:00:00 GMT"
    world.fake.script[("org-oa", COSTS)] = [Canned(429, {"Retry-After": "\u00b2"}), Canned(503, {"Retry-After": far})]
    world.fake.script[("org-an", A_COSTS)] = [Canned(503, {"Date": far})]
    await poll_once(world.settings)  # every endpoint of the good accounts read; only org-bad missed
    assert [s for acc, p, _, s, _ in world.fake.requests if acc == "org-oa" and p == COSTS][:3] == [429, 503, 200]


async def test_an_error_body_nested_too_deep_to_parse_fails_only_its_endpoint(world: World) -> None:
    """The error type of an unexpected status is read from its body (the documented error object). A body nested
    deeper than Python's parser recurses (a broken proxy, a hostile endpoint) raised RecursionError, which ended
    the whole collector ("internal error") instead of failing that one endpoint until the next poll."""
    seed_truth(world.fake)
    world.fake.script[("org-an", A_USAGE)] = [Canned(400, body="[" * 100_000)]
    await poll_once(world.settings, [f"anthropic/org-an/{ANTHROPIC_ENDPOINTS[1].report}: failed", *ORG_BAD_REFUSED])


async def test_collect_once_stopped_mid_poll_exits_incomplete(world: World) -> None:
    """SIGTERM (a Job's deadline, a node drain) while `collect --once` reads a window: the window is abandoned,
    nothing of it staged. It exited 0 as if the poll had collected everything; now 3, saying it was stopped."""
    seed_truth(world.fake)
    for day in (D2, D1, D0):
        world.fake.openai_bucket("org-oa", COMPLETIONS, day, [openai_completions("proj_a", "gpt-4o", 10, 0, 1)])
    world.fake.holds[COMPLETIONS] = (1, asyncio.Event())  # the second page is parked
    collector = Collector(world.settings)
    running = asyncio.ensure_future(collector.run(once=True))
    try:
        await asyncio.wait_for(world.fake.held.wait(), 60)
        collector.stop.set()
        assert await asyncio.wait_for(running, 30) == runner.EXIT_INCOMPLETE
    finally:
        world.fake.holds.pop(COMPLETIONS)[1].set()
        if not running.done():
            running.cancel()
    assert "the poll was stopped before it finished" in collector.missed
