"""Operating the worker: HTTP probes and metrics, a real Prometheus scraping it, JSON logs, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.factories import Org, api_event, dumps, make_org
from tests.kafka_helpers import create_topics, produce, run_worker, spawn_worker
from worker import devstack
from worker.app import Worker
from worker.config import Settings


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def eventually(check: Any, timeout: float = 60.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[Worker]:
    """A worker running in this process (no idle exit) until the test ends."""
    await create_topics(settings)
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())

    async def listening() -> bool:
        return worker.http is not None and worker.http.port != 0 and worker.consumer is not None

    await eventually(listening)
    yield worker
    worker.stop.set()
    assert await asyncio.wait_for(task, 60) == 0


async def test_probes_and_metrics(db: asyncpg.Connection, settings: Settings, running: Worker) -> None:
    assert running.http is not None
    base = f"http://127.0.0.1:{running.http.port}"
    org = await make_org(db)
    assert (await asyncio.to_thread(http_get, base + "/healthz"))[0] == 200

    async def ready() -> bool:
        status, _ = await asyncio.to_thread(http_get, base + "/readyz")
        return status == 200

    await eventually(ready)
    await produce(settings, settings.topic_api_usage, [dumps(api_event(org)) for _ in range(25)] + [b"junk"])

    async def counted() -> str | None:
        _, body = await asyncio.to_thread(http_get, base + "/metrics")
        line = f'cost_worker_messages_total{{outcome="inserted",topic="{settings.topic_api_usage}"}} 25.0'
        return body if line in body else None

    body = await eventually(counted)
    for name in (
        "cost_worker_quarantined_total",
        "cost_worker_batch_size_messages_bucket",
        "cost_worker_batch_duration_seconds_bucket",
        "cost_worker_consumer_lag_messages",
        "cost_worker_last_commit_timestamp_seconds",
        "cost_worker_outbox_backlog_messages",
        "cost_worker_build_info",
        "cost_worker_assigned_partitions",
    ):
        assert name in body, name
    assert f'cost_worker_quarantined_total{{reason="not_json",topic="{settings.topic_api_usage}"}} 1.0' in body
    lag = [
        line
        for line in body.splitlines()
        if line.startswith("cost_worker_consumer_lag_messages{") and settings.topic_api_usage in line
    ]
    assert lag
    assert all(line.endswith(" 0.0") for line in lag), lag


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is installed by `make test` (deploy-tools)")
async def test_a_real_prometheus_scrapes_the_worker(
    db: asyncpg.Connection, settings: Settings, running: Worker, tmp_path: Path
) -> None:
    assert running.http is not None
    org = await make_org(db)
    published = await produce(settings, settings.topic_api_usage, [dumps(api_event(org)) for _ in range(137)])
    port = devstack.free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: cost-worker\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{running.http.port}']\n"
    )
    process = await asyncio.create_subprocess_exec(
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = f'sum(cost_worker_messages_total{{job="cost-worker",topic="{settings.topic_api_usage}"}})'
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})

        async def scraped() -> float | None:
            try:
                status, body = await asyncio.to_thread(http_get, url)
            except OSError:
                return None
            if status != 200:
                return None
            result = json.loads(body)["data"]["result"]
            value = float(result[0]["value"][1]) if result else None
            return value if value == published else None

        assert await eventually(scraped, timeout=90) == 137
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def backlog(db: asyncpg.Connection, settings: Settings, n: int) -> Org:
    await create_topics(settings)
    org = await make_org(db)
    await produce(
        settings,
        settings.topic_api_usage,
        [dumps(api_event(org, event_id=f"e{i}", project=org.projects["proj_a"], cost="0.001")) for i in range(n)],
    )
    return org


async def table_state(db: asyncpg.Connection) -> tuple[Any, ...]:
    return (
        await db.fetchval("SELECT count(*) FROM api_usage"),
        await db.fetchval("SELECT sum(cost_usd) FROM api_usage"),
        await db.fetchval("SELECT sum(request_count) FROM project_metrics"),
        await db.fetchval("SELECT sum(next_offset) FROM consumer_offsets"),
    )


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text().splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


async def wait_for_line(path: Path, event: str, timeout: float = 60.0) -> None:
    async def seen() -> bool:
        return path.exists() and any(line.get("event") == event for line in json_lines(path))  # noqa: ASYNC240

    await eventually(seen, timeout=timeout)


async def test_sigterm_mid_stream_exits_zero_and_a_restart_finishes_the_job(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    n = 20_000
    await backlog(db, settings, n)
    log = tmp_path / "worker.log"
    slow = settings.model_copy(update={"batch_max_records": 500, "shutdown_grace": 10.0})
    process = spawn_worker(slow, log=log)
    await wait_for_line(log, "batch")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, 30)
    elapsed = time.monotonic() - started
    assert code == 0, log.read_text()[-2000:]
    assert elapsed < slow.shutdown_grace
    events = [line["event"] for line in json_lines(log)]
    assert "shutdown_requested" in events
    assert events[-1] == "stopped"
    interrupted = await table_state(db)
    assert interrupted[0] < n  # it really stopped mid-stream

    assert await run_worker(settings) == 0
    finished = await table_state(db)
    assert finished[0] == n
    await db.execute("TRUNCATE api_usage, project_metrics, user_metrics, consumer_offsets")
    assert await run_worker(settings) == 0
    assert await table_state(db) == finished


def test_a_second_signal_exits_at_once(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first signal asks for a drain; the second one does not wait for it."""
    exits: list[int] = []
    monkeypatch.setattr("worker.app.os._exit", exits.append)
    worker = Worker(settings)
    worker._on_signal(signal.SIGTERM)
    assert worker.stop.is_set()
    assert worker.health.stopping
    assert exits == []
    worker._on_signal(signal.SIGINT)
    assert exits == [130]


async def test_logs_are_json_with_one_canonical_line_per_batch(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    await backlog(db, settings, 1_000)
    log = tmp_path / "worker.log"
    process = spawn_worker(settings, "--exit-when-idle", "1", log=log)
    assert await asyncio.to_thread(process.wait, 120) == 0
    lines = json_lines(log)
    raw = log.read_text().splitlines()
    assert len(lines) == len([r for r in raw if r.strip()]), "every line is a JSON object"
    batches = [line for line in lines if line["event"] == "batch"]
    assert sum(line["messages"] for line in batches) == 1_000
    for line in batches:
        for key in (
            "topics",
            "partitions",
            "outcomes",
            "quarantined",
            "duration_ms",
            "database_ms",
            "level",
            "timestamp",
        ):
            assert key in line, key
