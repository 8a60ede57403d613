"""The hostile input corpus (tests/hostile/): every bad message is quarantined with its reason, mirrored to the
dead-letter topic, and changes nothing else; the good messages around it land exactly. Plus the circuit
breaker, which stops the worker when a stream is nothing but garbage.

The end-to-end tests run the worker as a real process (``python -m worker run``): the claims are about the
process - it never restarts, it exits 0 (or, for the breaker, non-zero with one line on stderr) - and a
hostile message that crashed it would show as exactly that, not as an exception inside the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from decimal import Context, Decimal, localcontext
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from tests.factories import FakeRecord
from tests.feeding import Feeder
from tests.hostile.corpus import HERE, TOPICS, Hostile, World, load, manifest
from tests.kafka_helpers import consume_all, create_topics, spawn_worker, worker_env
from worker.config import Settings
from worker.providers import COMPLETION_TOKEN_TYPES
from worker.quarantine import Reason

NOV1 = 1761955200  # 2025-11-01T00:00:00Z
DAY = 86400
EXACT = Context(prec=60)  # wide enough that no sum of valid amounts is rounded
IN_CONTEXT = {"unknown_organization", "unknown_project", "unknown_user", "conflicting_duplicate"}
WORKER_TIMEOUT = 300.0  # seconds; a bound against hangs on a busy 2-core machine, not a speed claim


# ------------------------------------------------------------------------------------------- the corpus


def test_the_corpus_covers_every_reason_and_every_file() -> None:
    entries = manifest()
    assert len(entries) >= 60
    reasons = Counter(entry["reason"] for entry in entries)
    assert set(reasons) == {reason.value for reason in Reason}, "every reason code has at least one example"
    for topic in TOPICS:
        assert sum(1 for e in entries if e.get("file", "").startswith(topic) or e.get("topic") == topic) >= 30
    named = {e["file"] for e in entries if "file" in e} | {e["original"] for e in entries if "original" in e}
    on_disk = {str(p.relative_to(HERE)) for topic in TOPICS for p in (HERE / topic).iterdir()}
    assert on_disk == named, "every file is in the manifest and every manifest file exists"
    assert len({e.get("file") or e["generate"] + e["topic"] for e in entries}) == len(entries)


def topic_name(settings: Settings, topic: str) -> str:
    return settings.topic_api_usage if topic == "api_usage" else settings.topic_provider_buckets


async def test_each_hostile_message_alone_gets_its_reason(db: asyncpg.Connection, feeder: Feeder) -> None:
    """Pipeline level, one message per batch, no broker: pinpoints the file when the end-to-end test fails."""
    world = await World.arrange(db)
    corpus = load(world.ids())
    wrong = []
    for hostile in corpus:
        topic = topic_name(feeder.settings, hostile.topic)
        try:
            if hostile.original is not None:
                outcome = await feeder.apply([feeder.record(topic, hostile.original)])
                assert outcome.messages[(topic, "inserted")] == 1, f"{hostile.name}: the original did not land"
            record = feeder.record(topic, hostile.value or b"")
            record = FakeRecord(topic, 0, record.offset, hostile.value, hostile.key, hostile.headers)
            outcome = await feeder.apply([record])
        except Exception as exc:
            wrong.append(f"{hostile.name}: expected {hostile.reason}, the batch failed: {type(exc).__name__}: {exc}")
            continue
        got = dict(outcome.quarantined)
        if got != {(topic, hostile.reason): 1}:
            detail = await db.fetchval(
                "SELECT detail FROM quarantine WHERE source_topic = $1 AND source_offset = $2", topic, record.offset
            )
            wrong.append(f"{hostile.name}: expected {hostile.reason}, got {got or 'accepted'} ({detail})")
    assert not wrong, "\n".join(wrong)
    assert await db.fetchval("SELECT count(*) FROM quarantine") == len(corpus)
    # The originals only: the stored day an hourly bucket overlaps.
    assert await db.fetchval("SELECT count(*) FROM cost_data") == len(COMPLETION_TOKEN_TYPES)
    assert await db.fetchval("SELECT sum(quantity) FROM cost_data") == OVERLAPPED_DAY_TOKENS
    assert await db.fetchval("SELECT array_agg(event_id) FROM api_usage") == ["hostile-reused"]  # the original


# The original of provider_buckets/openai-usage-hour-inside-a-stored-day.json: a daily usage bucket of this many
# input tokens, which lands (one line per completions token type) before the hourly bucket inside it is refused.
OVERLAPPED_DAY_TOKENS = 4000

# ------------------------------------------------------------------------------------------- good messages


@dataclass
class Good:
    """The good messages published around the hostile ones, and what they must add up to."""

    events: list[bytes] = field(default_factory=list)
    pages: list[bytes] = field(default_factory=list)
    event_ids: set[str] = field(default_factory=set)
    event_cost: Decimal = Decimal(0)
    cost: dict[str, Decimal] = field(  # provider -> sum of costs_v1 amounts
        default_factory=lambda: {"openai": Decimal(0), "anthropic": Decimal(0)}
    )
    tokens: Counter[str] = field(default_factory=Counter)  # provider -> sum of usage_v1 token quantities
    requests: int = 0  # Anthropic web searches
    ledger_rows: int = 0


def number(template: dict[str, Any], **raw: str) -> bytes:
    """JSON with some values written as raw number literals (exact, whatever their digits)."""
    text = json.dumps(template)
    for name, literal in raw.items():
        text = text.replace(f'"@{name}@"', literal)
    return text.encode()


def good_stream(world: World, events: int, pages: int) -> Good:
    good = Good()
    result: dict[str, Any]
    with localcontext(EXACT):
        for i in range(events):
            # 30 decimal places; half as JSON numbers, half as decimal strings
            cost = Decimal(f"0.{i:03d}123456789012345678901234567")
            event = {
                "event_id": f"good-{i}",
                "occurred_at": f"2025-11-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
                "organization_id": str(world.org.id),
                "project_id": str(world.project),
                "user_id": str(world.user),
                "endpoint": "/v1/chat/completions",
                "method": "POST",
                "status_code": 200 if i % 5 else 503,
                "response_time_ms": 100 + i,
                "token_usage": {
                    "prompt_tokens": i,
                    "completion_tokens": 2 * i,
                    "total_tokens": 3 * i,
                    "cost_usd": str(cost) if i % 2 else "@cost@",
                },
            }
            good.events.append(number(event, cost=str(cost)))
            good.event_ids.add(f"good-{i}")
            good.event_cost += cost
        for i in range(pages):
            kind = i % 4
            if kind == 0:  # OpenAI costs: two results of one line item (summed exactly) and one without project
                big = Decimal(f"{i % 9 + 1}234567890.1234567890123456789012345678901234")  # 44 digits
                tiny = Decimal("1E-34")
                org_level = Decimal(f"{i}.5")
                results = [
                    {"amount": {"value": "@big@", "currency": "usd"}, "line_item": f"good-{i}", "project_id": "proj_a"},
                    {
                        "amount": {"value": "@tiny@", "currency": "usd"},
                        "line_item": f"good-{i}",
                        "project_id": "proj_a",
                    },
                    {"amount": {"value": "@org@", "currency": "USD"}, "line_item": f"good-{i}-org", "project_id": None},
                ]
                bucket = {"start_time": NOV1 + i * DAY, "end_time": NOV1 + (i + 1) * DAY, "results": results}
                page = envelope("openai", world.org.ai_org, "costs_v1", bucket)
                good.pages.append(number(page, big=str(big), tiny=str(tiny), org=str(org_level)))
                good.cost["openai"] += big + tiny + org_level
                good.ledger_rows += 2
            elif kind == 1:  # Anthropic costs: a decimal string of cents with 45 significant digits
                cents = Decimal(f"{i % 9 + 1}9999999999.1234567890123456789012345678901234")
                result = {
                    "amount": str(cents),
                    "currency": "USD",
                    "workspace_id": "wrkspc_a",
                    "description": f"good-{i}",
                }
                hour = i // 28 % 24  # distinct hourly windows: windows of one report never overlap
                bucket = {
                    "starting_at": f"2025-11-{1 + i % 28:02d}T{hour:02d}:00:00Z",
                    "ending_at": f"2025-11-{1 + i % 28:02d}T{hour:02d}:59:00Z",
                    "results": [result],
                }
                good.pages.append(
                    json.dumps(envelope("anthropic", world.anthropic.ai_org, "costs_v1", bucket)).encode()
                )
                good.cost["anthropic"] += cents.scaleb(-2)
                good.ledger_rows += 1
            elif kind == 2:  # OpenAI usage: five token lines per result
                result = {"model": f"good-model-{i}", "project_id": "proj_a", "input_tokens": 1000 + i}
                result |= {"input_cached_tokens": 100, "output_tokens": 10 * i + 1}
                bucket = {"start_time": NOV1 + i * DAY, "end_time": NOV1 + (i + 1) * DAY, "results": [result]}
                good.pages.append(json.dumps(envelope("openai", world.org.ai_org, "usage_v1", bucket)).encode())
                good.tokens["openai"] += 1000 + i + 10 * i + 1
                good.ledger_rows += len(COMPLETION_TOKEN_TYPES)  # the completions partition
            else:  # Anthropic usage: five token lines and one web-search line per result
                result = {
                    "uncached_input_tokens": 1000 + i,
                    "cache_read_input_tokens": i,
                    "cache_creation": {"ephemeral_1h_input_tokens": 1, "ephemeral_5m_input_tokens": 2},
                    "output_tokens": 5 * i + 1,
                    "server_tool_use": {"web_search_requests": 1},
                    "model": "claude-good",
                    "workspace_id": "wrkspc_a",
                }
                bucket = {
                    "starting_at": f"2025-12-{1 + i % 28:02d}T{i % 24:02d}:00:00Z",
                    "ending_at": f"2025-12-{1 + i % 28:02d}T{i % 24:02d}:30:00Z",
                    "results": [result],
                }
                good.pages.append(
                    json.dumps(envelope("anthropic", world.anthropic.ai_org, "usage_v1", bucket)).encode()
                )
                good.tokens["anthropic"] += 1000 + i + i + 1 + 2 + 5 * i + 1
                good.requests += 1
                good.ledger_rows += 6
    return good


def envelope(provider: str, ai_org: str, version: str, bucket: dict[str, Any]) -> dict[str, Any]:
    return {
        "provider": provider,
        "ai_organization_id": ai_org,
        "api_version": version,
        "collected_at": "2025-12-31T00:00:00Z",
        "page": {"object": "page", "data": [bucket], "has_more": False},
    }


# ------------------------------------------------------------------------------------------- publishing


@dataclass(frozen=True)
class Sent:
    topic: str
    partition: int
    offset: int


async def publish(
    settings: Settings, corpus: list[Hostile], good: Good, partitions: int
) -> tuple[dict[tuple[str, int, int], Hostile], Counter[tuple[str, int]]]:
    """Each hostile message right after a good one, round-robin over the partitions (an original goes just
    before its reuse, in the same partition). Returns where each hostile message landed, and per-partition
    message counts."""
    plan: list[tuple[str, bytes | None, bytes | None, tuple[tuple[str, bytes | None], ...], int, Hostile | None]] = []
    turn = 0
    for kind, goods in (("api_usage", good.events), ("provider_buckets", good.pages)):
        topic = topic_name(settings, kind)
        hostile = [h for h in corpus if h.topic == kind]
        assert len(goods) >= len(hostile), "at least one good message per hostile one (the breaker stays shut)"
        for index, value in enumerate(goods):
            plan.append((topic, value, None, (), turn % partitions, None))
            turn += 1
            if index < len(hostile):
                item = hostile[index]
                if item.original is not None:
                    plan.append((topic, item.original, None, (), turn % partitions, None))
                plan.append((topic, item.value, item.key, item.headers, turn % partitions, item))
                turn += 1
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=5, max_request_size=16 * 1024 * 1024
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=value, key=key, partition=partition, headers=list(headers))
            for topic, value, key, headers, partition, _ in plan
        ]
        sent = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    where: dict[tuple[str, int, int], Hostile] = {}
    per_partition: Counter[tuple[str, int]] = Counter()
    for (topic, *_, planned), metadata in zip(plan, sent, strict=True):
        per_partition[(topic, metadata.partition)] += 1
        if planned is not None:
            where[(topic, metadata.partition, metadata.offset)] = planned
    return where, per_partition


# ------------------------------------------------------------------------------------------- end to end


async def test_hostile_corpus_end_to_end(db: asyncpg.Connection, settings: Settings, tmp_path: Path) -> None:
    await create_topics(settings)
    world = await World.arrange(db)
    corpus = load(world.ids())
    count = Counter(h.topic for h in corpus)
    good = good_stream(world, events=count["api_usage"] + 10, pages=count["provider_buckets"] + 10)
    where, per_partition = await publish(settings, corpus, good, partitions=3)
    assert len(where) == len(corpus)

    log = tmp_path / "worker.log"
    process = spawn_worker(settings, "--exit-when-idle", "3", log=log)
    try:
        code = await asyncio.to_thread(process.wait, WORKER_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    lines = log.read_text(errors="replace").splitlines()
    assert code == 0, "\n".join(lines[-30:])
    assert not [line for line in lines if '"level": "error"' in line], "the worker logged an error"
    assert sum('"event": "stopped"' in line for line in lines) == 1

    # Every hostile message is quarantined exactly once, with its reason, its bytes, its key and its headers.
    rows = await db.fetch(
        "SELECT source_topic, source_partition, source_offset, reason, detail, payload, message_key, headers "
        "FROM quarantine"
    )
    stored = {(r["source_topic"], r["source_partition"], r["source_offset"]): r for r in rows}
    assert len(rows) == len(stored)
    missing = [where[at].name for at in where.keys() - stored.keys()]
    unexpected = [(at, stored[at]["reason"], stored[at]["detail"]) for at in stored.keys() - where.keys()]
    assert not missing, f"not quarantined: {missing}"
    assert not unexpected, f"quarantined but not hostile: {unexpected}"
    wrong = [
        f"{where[at].name}: expected {where[at].reason}, got {row['reason']} ({row['detail']})"
        for at, row in stored.items()
        if row["reason"] != where[at].reason
    ]
    assert not wrong, "\n".join(wrong)
    for at, row in stored.items():
        hostile = where[at]
        assert bytes(row["payload"]) == (hostile.value or b""), hostile.name
        assert bytes(row["message_key"]) == hostile.key, hostile.name
        if hostile.headers:
            assert json.loads(row["headers"]) == {
                "trace\ufffdid": "a\ufffdb\ufffd",  # NUL and an invalid byte, made storable
                "source": "hostile",
                "no-value": None,
            }

    # ...and mirrored to the dead-letter topic, once, naming its source and reason.
    dead = await consume_all(settings, settings.topic_dead_letter, expect=len(corpus), timeout=90)
    assert len(dead) == len(corpus)
    mirrored = {}
    for record in dead:
        headers = {name: value.decode() for name, value in record.headers}
        at = (headers["source_topic"], int(headers["source_partition"]), int(headers["source_offset"]))
        mirrored[at] = headers["reason"]
        payload = where[at].value or b""
        assert record.value == payload[: settings.dead_letter_max_bytes], where[at].name
        assert headers["truncated"] == str(len(payload) > settings.dead_letter_max_bytes).lower()
    assert mirrored == {at: hostile.reason for at, hostile in where.items()}
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0

    # The good messages around them all landed, to the last decimal place.
    assert set(await db.fetchval("SELECT array_agg(event_id) FROM api_usage")) == good.event_ids | {"hostile-reused"}
    original = await db.fetchrow("SELECT endpoint, cost_usd FROM api_usage WHERE event_id = 'hostile-reused'")
    assert original is not None
    assert (original["endpoint"], original["cost_usd"]) == ("/v1/chat/completions", Decimal("0.5"))
    expected_cost = Decimal("0.5").fma(1, good.event_cost, EXACT)  # + the original, without rounding
    assert await db.fetchval("SELECT sum(cost_usd) FROM api_usage") == expected_cost
    assert await db.fetchval("SELECT sum(estimated_cost_usd) FROM project_metrics") == expected_cost
    assert await db.fetchval("SELECT sum(request_count) FROM project_metrics") == len(good.event_ids) + 1
    ledger = {
        (r["provider"], r["api_version"], r["unit"]): (r["amount"], r["quantity"], r["rows"])
        for r in await db.fetch(
            "SELECT provider, api_version::text, unit, sum(amount) AS amount, sum(quantity) AS quantity, "
            "count(*) AS rows FROM cost_data GROUP BY 1, 2, 3"
        )
    }
    assert ledger[("openai", "costs_v1", None)][0] == good.cost["openai"]
    assert ledger[("anthropic", "costs_v1", None)][0] == good.cost["anthropic"]
    assert ledger[("openai", "usage_v1", "tokens")][1] == good.tokens["openai"] + OVERLAPPED_DAY_TOKENS
    assert ledger[("anthropic", "usage_v1", "tokens")][1] == good.tokens["anthropic"]
    assert ledger[("anthropic", "usage_v1", "requests")][1] == good.requests
    assert sum(rows for *_, rows in ledger.values()) == good.ledger_rows + len(COMPLETION_TOKEN_TYPES)
    owners = {r["organization_id"] for r in await db.fetch("SELECT DISTINCT organization_id FROM cost_data")}
    assert owners == {world.org.id, world.anthropic.id}

    # Everything was consumed, once.
    offsets = {
        (r["topic"], r["partition"]): r["next_offset"]
        for r in await db.fetch("SELECT topic, partition, next_offset FROM consumer_offsets")
    }
    assert offsets == dict(per_partition)


# ------------------------------------------------------------------------------------------- the circuit breaker


async def test_a_stream_of_only_garbage_stops_the_worker_before_quarantining_it_all(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    await create_topics(settings)
    world = await World.arrange(db)
    # The corpus's API events that are bad on their own (not by reference or history), many reasons.
    garbage = [
        h.value
        for h in load(world.ids())
        if h.topic == "api_usage" and h.reason not in IN_CONTEXT and h.value is not None and len(h.value) < 100_000
    ]
    stream = [garbage[i % len(garbage)] for i in range(400)]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(settings.topic_api_usage, value=v) for v in stream])
    finally:
        await producer.stop()

    small = settings.model_copy(update={"batch_max_records": 25, "breaker_min_messages": 100})
    with (tmp_path / "worker.log").open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "worker", "run", "--exit-when-idle", "3"),
            stdout=out,
            stderr=asyncio.subprocess.PIPE,
            env=worker_env(small),
        )
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), WORKER_TIMEOUT)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 1, (tmp_path / "worker.log").read_text()[-3000:]
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("cost-worker: error: circuit breaker open: "), lines[0]
    assert "not_json" in lines[0]
    assert "Traceback" not in (tmp_path / "worker.log").read_text()

    # Batches before the breaker opened were quarantined; the one that opened it was rolled back, and the
    # rest of the stream was never touched.
    quarantined = await db.fetchval("SELECT count(*) FROM quarantine")
    assert 0 < quarantined < small.breaker_min_messages
    assert await db.fetchval("SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets") == quarantined
    assert await db.fetchval("SELECT count(*) FROM api_usage") == 0
