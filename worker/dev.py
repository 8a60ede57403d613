"""``cost-worker dev``: the whole system on a laptop, with a demo stream and a summary.

With no URLs configured it starts an embedded PostgreSQL (data under ``--state-dir``) and the embedded
Kafka-protocol broker on free loopback ports, recreates the ``cost_worker_dev`` database (the broker keeps
nothing across restarts, so neither does the demo database), migrates, seeds a demo organization, publishes a
demo stream (duplicates, a revision, a few bad messages included), runs the worker until it is idle, and
prints a summary. Then it keeps the worker running until Ctrl-C, unless ``--once``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib.resources import files
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import SecretStr

from worker import admin, devstack, kafka, logs, store
from worker.app import Worker
from worker.config import Settings
from worker.errors import UsageError
from worker.migrate import migrate

DEV_DATABASE = "cost_worker_dev"
DEMO_ORG = UUID("0d3c0000-0000-4000-8000-000000000001")
ALICE = "0d3c0000-0000-4000-8000-0000000000a1"
BOB = "0d3c0000-0000-4000-8000-0000000000b0"
ASSISTANT = "0d3c0000-0000-4000-8000-0000000000f1"
SEARCH = "0d3c0000-0000-4000-8000-0000000000f2"
CLAUDE_APPS = "0d3c0000-0000-4000-8000-0000000000f3"
DEMO_IDLE = 2.0  # seconds of quiet after which the demo run is over
DEMO_EVENT_SPAN = timedelta(hours=5)  # the demo's API events lie at most this long before now, and within today
TOPIC_PARTITIONS = 3
DEV_SESSION_TIMEOUT = 6.0  # seconds, with the embedded broker


def main(settings: Settings, *, state_dir: Path, once: bool) -> int:
    logs.configure(
        level=settings.log_level,
        fmt="console" if settings.log_format == "auto" else settings.log_format,
        secrets=settings.secrets(),
    )
    state_dir = state_dir.resolve()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a parent that cannot exist, no permission
        raise UsageError([f"--state-dir {state_dir}: cannot use it as a directory: {exc.strerror or exc}"]) from None
    return asyncio.run(_main(settings, state_dir, once))


async def _main(settings: Settings, state_dir: Path, once: bool) -> int:
    broker: devstack.EmbeddedBroker | None = None
    updates: dict[str, Any] = {}
    embedded = settings.database_url is None or settings.kafka_bootstrap_servers is None
    try:
        if settings.database_url is None:
            server = devstack.start_postgres(state_dir / "postgres")
            admin_url = server.url("postgres")
            await store.recreate_database(admin_url, DEV_DATABASE)
            updates["database_url"] = SecretStr(server.url(DEV_DATABASE))
            updates["database_role"] = settings.database_role or "cost_worker_writer"
        if settings.kafka_bootstrap_servers is None:
            broker = devstack.start_broker(log_path=state_dir / "broker.log")
            updates["kafka_bootstrap_servers"] = broker.bootstrap_servers
            updates["kafka_producer_idempotence"] = False  # the embedded broker does not support it
            # Tansu completes a group join only after a fraction of the session timeout: keep it short so
            # the demo starts in seconds (real Kafka needs no such thing).
            updates["kafka_session_timeout"] = min(settings.kafka_session_timeout, DEV_SESSION_TIMEOUT)
            updates["kafka_heartbeat_interval"] = min(settings.kafka_heartbeat_interval, DEV_SESSION_TIMEOUT / 3)
        if not _port_free(settings.metrics_host, settings.metrics_port):
            updates["metrics_port"] = 0
        settings = settings.model_copy(update=updates)

        report = await migrate(settings.dsn())
        print(f"database: {len(report.applied)} migration(s) applied")
        conn = await store.connect(settings.dsn())
        try:
            await store.run_script(conn, files("worker.sql").joinpath("demo_seed.sql").read_text(encoding="utf-8"))
        finally:
            await conn.close()
        await kafka.ensure_topics(
            settings,
            {
                settings.topic_provider_buckets: TOPIC_PARTITIONS,
                settings.topic_api_usage: TOPIC_PARTITIONS,
                settings.topic_budget_alerts: 1,
                settings.topic_dead_letter: 1,
            },
        )
        published = await publish_demo(settings)
        print(f"published {published} demo messages; running the worker until it is idle...")
        await Worker(settings).run(exit_when_idle=DEMO_IDLE)
        await summary(settings)
        _connection_help(settings, state_dir)
        if once:
            if embedded:
                print("  (--once: the embedded servers stop now; run `cost-worker dev` without --once to keep them)")
            return 0
        print("\nthe worker keeps running (Ctrl-C to stop); publish more to the topics above.")
        worker = Worker(settings)
        worker.install_signal_handlers()
        return await worker.run()
    finally:
        if broker is not None:
            broker.stop()


def _port_free(host: str, port: int) -> bool:
    if port == 0:
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# ================================================================================================ demo stream


def demo_stream(now: datetime, seed: int = 42) -> tuple[list[bytes], list[bytes]]:
    """API events (with duplicates and a few bad ones) and provider envelopes (with a revision)."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible demo, not security
    events: list[bytes] = []
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    # Today only (UTC): yesterday's hours belong to the provider buckets below, which replace the estimates they
    # cover, and on the 1st they are last month. So the budgets' crossings do not depend on the time of day or
    # the day of the month the demo runs (tests/unit/test_demo_prices.py).
    span = min(DEMO_EVENT_SPAN, now - day)
    projects = [
        (ASSISTANT, "gpt-4o", Decimal("0.35")),
        (SEARCH, "gpt-4o", Decimal("0.02")),
        (CLAUDE_APPS, "claude-sonnet-4", Decimal("0.05")),
    ]
    for i in range(300):
        project, model, typical = projects[i % 3]
        user = ALICE if i % 4 == 0 else BOB
        at = now - span * (rng.randint(1, 300) / 300)
        cost = (typical * Decimal(rng.randint(50, 150)) / 100).quantize(Decimal("0.000001"))
        prompt = rng.randint(100, 3000)
        completion = rng.randint(50, 1500)
        events.append(
            _json(
                {
                    "event_id": f"demo-{i:04d}",
                    "occurred_at": at.isoformat(),
                    "organization_id": str(DEMO_ORG),
                    "project_id": project,
                    "user_id": user,
                    "endpoint": "/v1/orchestrations",
                    "method": "POST",
                    "status_code": 500 if i % 37 == 0 else 200,
                    "response_time_ms": rng.randint(200, 4000),
                    "token_usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                        "model": model,
                        # every tenth event comes without the platform's cost: the catalogue estimates it
                        **({} if i % 10 == 5 else {"cost_usd": str(cost)}),
                    },
                }
            )
        )
    events += rng.sample(events, 20)  # a producer retrying: duplicates
    events += [
        b'{"event_id": "broken", ',  # truncated JSON
        _json(
            {
                "event_id": "ghost",
                "occurred_at": now.isoformat(),
                "organization_id": str(DEMO_ORG),
                "project_id": "0d3c0000-0000-4000-8000-00000000dead",
                "endpoint": "/v1/x",
                "method": "GET",
                "status_code": 200,
            }
        ),  # a project that does not exist
        _json(
            {
                "event_id": "refund",
                "occurred_at": now.isoformat(),
                "organization_id": str(DEMO_ORG),
                "endpoint": "/v1/x",
                "method": "GET",
                "status_code": 200,
                "token_usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "cost_usd": -5},
            }
        ),
    ]
    rng.shuffle(events)

    yesterday, before = day - timedelta(days=1), day - timedelta(days=2)
    buckets = [
        _envelope(
            "openai",
            "org-acme",
            "costs_v1",
            now - timedelta(hours=20),
            [
                _openai_costs(
                    before,
                    [
                        ("proj_assistant", "gpt-4o, input", "18.40"),
                        ("proj_assistant", "gpt-4o, output", "22.10"),
                        ("proj_search", "gpt-4o, input", "3.05"),
                        (None, "fine-tuning", "12.00"),
                    ],
                ),
                _openai_costs(
                    yesterday, [("proj_assistant", "gpt-4o, input", "19.00"), ("proj_search", "gpt-4o, input", "2.75")]
                ),
            ],
        ),
        # A later revision of yesterday's bucket: it wins, whatever order the two arrive in.
        _envelope(
            "openai",
            "org-acme",
            "costs_v1",
            now - timedelta(hours=2),
            [
                _openai_costs(
                    yesterday, [("proj_assistant", "gpt-4o, input", "21.30"), ("proj_search", "gpt-4o, input", "2.90")]
                ),
            ],
        ),
        _envelope(
            "openai",
            "org-acme",
            "usage_v1",
            now - timedelta(hours=2),
            [
                {
                    "object": "bucket",
                    "start_time": int(yesterday.timestamp()),
                    "end_time": int(day.timestamp()),
                    "results": [
                        {
                            "object": "organization.usage.completions.result",
                            "input_tokens": 2_000_000,
                            "input_cached_tokens": 500_000,
                            "input_cache_write_tokens": 0,
                            "input_uncached_tokens": 1_500_000,
                            "input_text_tokens": 1_480_000,
                            "input_audio_tokens": 0,
                            "input_image_tokens": 20_000,
                            "input_cached_text_tokens": 500_000,
                            "input_cached_audio_tokens": 0,
                            "input_cached_image_tokens": 0,
                            "output_tokens": 400_000,
                            "output_text_tokens": 400_000,
                            "output_audio_tokens": 0,
                            "output_image_tokens": 0,
                            "num_model_requests": 1200,
                            "project_id": "proj_assistant",
                            "model": "gpt-4o",
                            "user_id": None,
                            "api_key_id": None,
                            "batch": None,
                            "service_tier": None,
                        }
                    ],
                }
            ],
        ),
        _envelope(
            "openai",
            "org-acme",
            "usage_v1",
            now - timedelta(hours=2),
            [
                {
                    "object": "bucket",
                    "start_time": int(yesterday.timestamp()),
                    "end_time": int(day.timestamp()),
                    "results": [
                        {
                            "object": "organization.usage.embeddings.result",
                            "input_tokens": 40_000_000,
                            "num_model_requests": 9000,
                            "project_id": "proj_search",
                            "model": "text-embedding-3-small",
                            "user_id": None,
                            "api_key_id": None,
                        }
                    ],
                }
            ],
            endpoint="embeddings",
        ),
        _envelope(
            "openai",
            "org-acme",
            "usage_v1",
            now - timedelta(hours=2),
            [
                {
                    "object": "bucket",
                    "start_time": int(yesterday.timestamp()),
                    "end_time": int(day.timestamp()),
                    "results": [
                        {
                            "object": "organization.usage.web_searches.result",
                            "num_requests": 310,
                            "num_model_requests": 300,
                            "project_id": "proj_search",
                            "model": "gpt-4o",
                            "user_id": None,
                            "api_key_id": None,
                            "context_level": None,
                        }
                    ],
                }
            ],
            endpoint="web_search_calls",
        ),
        _envelope(
            "anthropic",
            "anthropic-acme",
            "costs_v1",
            now - timedelta(hours=3),
            [
                {
                    "starting_at": _iso(yesterday),
                    "ending_at": _iso(day),
                    "results": [
                        {
                            "amount": "734.5",
                            "currency": "USD",
                            "workspace_id": "wrkspc_claude",
                            "description": "Claude Sonnet 4 Usage - Input Tokens",
                            "model": "claude-sonnet-4",
                            "cost_type": "tokens",
                            "token_type": "uncached_input_tokens",
                        }
                    ],
                }
            ],
        ),
        _envelope(
            "anthropic",
            "anthropic-acme",
            "usage_v1",
            now - timedelta(hours=3),
            [
                {
                    "starting_at": _iso(yesterday),
                    "ending_at": _iso(day),
                    "results": [
                        {
                            "uncached_input_tokens": 2_448_333,
                            "cache_read_input_tokens": 100_000,
                            "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
                            "output_tokens": 90_000,
                            "server_tool_use": {"web_search_requests": 40},
                            "model": "claude-sonnet-4",
                            "workspace_id": "wrkspc_claude",
                            "service_tier": "standard",
                            "context_window": "0-200k",
                        }
                    ],
                }
            ],
        ),
        _envelope(
            "openai",
            "org-unknown",
            "costs_v1",
            now - timedelta(hours=1),
            [_openai_costs(yesterday, [(None, "all", "1.00")])],
        ),  # a provider account no project maps to
    ]
    buckets.insert(0, buckets.pop(1))  # the revision arrives before the original
    return events, buckets


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _envelope(
    provider: str, ai_org: str, version: str, collected: datetime, buckets: list[Any], *, endpoint: str | None = None
) -> bytes:
    body: dict[str, Any] = {
        "provider": provider,
        "ai_organization_id": ai_org,
        "api_version": version,
        "collected_at": _iso(collected),
        "page": {"object": "page", "data": buckets, "has_more": False},
    }
    if endpoint is not None:
        body["endpoint"] = endpoint
    return _json(body)


def _openai_costs(start: datetime, results: list[tuple[str | None, str, str]]) -> dict[str, Any]:
    return {
        "object": "bucket",
        "start_time": int(start.timestamp()),
        "end_time": int((start + timedelta(days=1)).timestamp()),
        "results": [
            {
                "object": "organization.costs.result",
                "amount": {"value": float(value), "currency": "usd"},
                "line_item": line_item,
                "project_id": project,
            }
            for project, line_item, value in results
        ],
    }


async def publish_demo(settings: Settings) -> int:
    events, buckets = demo_stream(datetime.now(UTC))
    producer = kafka.Producer(settings)
    await producer.start()
    try:
        deliveries = [await producer.send(settings.topic_api_usage, e) for e in events]
        deliveries += [await producer.send(settings.topic_provider_buckets, b) for b in buckets]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
    return len(events) + len(buckets)


# ================================================================================================ summary


async def summary(settings: Settings) -> None:
    db = await store.Database.open(settings.dsn(), role=settings.database_role, max_size=1)
    try:
        async with db.transaction() as tx:
            await tx.set_tenants({DEMO_ORG})
            counts = await tx.report("report_table_counts")
            projects = await tx.report("report_project_spend", [DEMO_ORG])
            reasons = await tx.report("report_quarantine_reasons")
            alerts = await tx.report("report_alerts")
            pricing = await tx.report("report_usage_pricing")
    finally:
        await db.close()
    print("\n== rows per table")
    print(admin.table(["table", "rows"], [(r["table_name"], r["rows"]) for r in counts]))
    print("\n== spend per project (all time, USD)")
    print(
        admin.table(
            ["project", "provider costs", "priced usage", "platform estimate", "requests"],
            [(r["project"], r["provider_costs"], r["priced_usage"], r["estimate"], r["requests"]) for r in projects],
        )
    )
    print("\n== usage lines by price source (`cost-worker prices unpriced` lists what has none)")
    print(admin.table(["source", "lines", "amount"], [(r["source"], r["lines"], r["amount"]) for r in pricing]))
    print("\n== quarantined, by reason")
    print(admin.table(["reason", "messages"], [(r["reason"], r["messages"]) for r in reasons]) if reasons else "none")
    print("\n== budget alerts raised")
    print(
        admin.table(
            ["budget", "scope", "threshold %", "spend", "amount", "used %", "period start"],
            [
                (
                    r["budget_name"],
                    r["scope"],
                    r["threshold"],
                    r["spend"],
                    r["amount"],
                    r["percent_used"],
                    r["period_start"],
                )
                for r in alerts
            ],
        )
        if alerts
        else "none"
    )
    print("\n== budgets now")
    with contextlib.redirect_stderr(None):
        await admin.budgets_status(settings, organization=str(DEMO_ORG))


def _connection_help(settings: Settings, state_dir: Path) -> None:
    print("\n== connect")
    print(f"  PostgreSQL:  psql '{settings.dsn()}'")
    print(
        f"  Kafka:       {settings.kafka_bootstrap_servers}  (topics: {settings.topic_api_usage}, "
        f"{settings.topic_provider_buckets}, {settings.topic_budget_alerts}, {settings.topic_dead_letter})"
    )
    print(f"  state:       {state_dir}")
    print(
        f"  env:         COST_WORKER_DATABASE_URL='{settings.dsn()}' "
        f"COST_WORKER_DATABASE_ROLE={settings.database_role or ''} "
        f"COST_WORKER_KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} "
        f"COST_WORKER_KAFKA_PRODUCER_IDEMPOTENCE={str(settings.kafka_producer_idempotence).lower()}"
    )
