"""Running a scenario: producing the stream, worker processes and a supervisor, finishing and recording.

Every worker here is a real ``python -m worker run`` process talking to real servers over real connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from tests.faults.checks import Published, assert_published, assert_tables, published, topic_of
from tests.faults.expectation import Delivered, Expected, full_expectation
from tests.faults.generator import Message, Stream
from tests.kafka_helpers import consume_all, spawn_worker
from worker.config import Settings

FINISH_TIMEOUT = 240.0  # seconds for the final worker to drain what is left


@dataclass
class Record:
    """One scenario's figures for RESULTS.md."""

    name: str
    messages: int = 0
    bad_inputs: int = 0
    faults: int = 0
    fault_kinds: list[str] = field(default_factory=list)
    lost: int = 0
    double_counted: int = 0
    duplicate_alerts: int = 0
    republished: int = 0
    alerts: int = 0
    passed: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


RESULTS: list[Record] = []


class Producer:
    """Sends messages to their partitions and remembers where each one landed (from the broker's acks)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.delivered: list[Delivered] = []
        self._producer: Any = None

    async def __aenter__(self) -> Producer:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            linger_ms=5,
            acks="all",
            request_timeout_ms=120_000,
            max_request_size=8 * 1024 * 1024,
        )
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def send(self, messages: Sequence[Message]) -> None:
        futures = []
        for message in messages:
            topic = topic_of(self.settings, message.kind)
            futures.append(
                (
                    message,
                    await self._producer.send(topic, value=message.value, key=message.key, partition=message.partition),
                )
            )
        for message, future in futures:
            metadata = await future
            assert metadata.partition == message.partition
            self.delivered.append(Delivered(message, metadata.partition, metadata.offset))


async def produce_all(settings: Settings, messages: Sequence[Message]) -> list[Delivered]:
    async with Producer(settings) as producer:
        await producer.send(messages)
    return producer.delivered


async def produce_slowly(
    settings: Settings, messages: Sequence[Message], *, chunks: int, pause: float
) -> list[Delivered]:
    """The stream in ``chunks`` parts, ``pause`` seconds apart (the worker consumes while we produce)."""
    async with Producer(settings) as producer:
        size = max(1, -(-len(messages) // chunks))
        for start in range(0, len(messages), size):
            await producer.send(messages[start : start + size])
            await asyncio.sleep(pause)
    return producer.delivered


# ------------------------------------------------------------------------------------------ processes


class Workers:
    """Worker processes of one scenario; every one is ended (by its own pid) when the scenario ends."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []
        self.kills = 0

    def log(self, name: str = "worker") -> Path:
        return self.log_dir / f"{name}.log"

    def spawn(self, *args: str, name: str = "worker", **extra: str) -> subprocess.Popen[bytes]:
        process = spawn_worker(self.settings, *args, log=self.log(name), **extra)
        self.started.append(process)
        return process

    async def wait(self, process: subprocess.Popen[bytes], timeout: float) -> int:
        return await asyncio.to_thread(process.wait, timeout)

    def signal(self, process: subprocess.Popen[bytes], sig: int) -> None:
        if process.poll() is None:
            process.send_signal(sig)
            if sig == signal.SIGKILL:
                self.kills += 1

    async def kill(self, process: subprocess.Popen[bytes]) -> None:
        self.signal(process, signal.SIGKILL)
        await self.wait(process, 30)

    async def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(process.wait, 30)

    async def wait_started(self, name: str, timeout: float = 60.0) -> None:
        """Until the worker logged that it listens (its signal handlers are installed by then: a SIGTERM
        earlier, while the interpreter is still importing, ends it like any unprepared process)."""
        deadline = time.monotonic() + timeout
        while "http_listening" not in self.logs(name, tail=10**9):
            assert time.monotonic() < deadline, f"{name} did not start: " + self.logs(name)
            await asyncio.sleep(0.1)

    def logs(self, name: str = "worker", tail: int = 4000) -> str:
        path = self.log(name)
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def count(self, needle: str, name: str = "worker") -> int:
        path = self.log(name)
        return path.read_text(errors="replace").count(needle) if path.exists() else 0


@contextlib.asynccontextmanager
async def workers(settings: Settings, log_dir: Path) -> AsyncIterator[Workers]:
    group = Workers(settings, log_dir)
    try:
        yield group
    finally:
        await group.close()


class Supervisor:
    """Restarts the worker whenever it dies, like a process manager would, until stopped."""

    def __init__(self, group: Workers, *args: str, name: str = "worker", **extra: str) -> None:
        self.group = group
        self.args = args
        self.name = name
        self.extra = extra
        self.restarts = 0
        self.process = group.spawn(*args, name=self.current, **extra)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while not self._stop.is_set():
            self._restart_if_dead()
            await asyncio.sleep(0.2)

    @property
    def current(self) -> str:
        return f"{self.name}-{self.restarts}"

    def _restart_if_dead(self) -> None:
        if self.process.poll() is not None:
            self.restarts += 1
            self.process = self.group.spawn(*self.args, name=self.current, **self.extra)

    async def stop(self) -> None:
        """Stop watching; the worker that is running (restarted if it just died) is left running."""
        self._stop.set()
        if self._task is not None:
            await self._task
        self._restart_if_dead()


# ------------------------------------------------------------------------------------------ finishing


def idle_exit(settings: Settings) -> str:
    """``--exit-when-idle`` longer than the session timeout: partitions the group still gives to a member that
    died (SIGKILL) come back to the live worker when its session expires, before the live one may call itself
    idle (idle means "every *assigned* partition caught up")."""
    return str(settings.kafka_session_timeout + 2)


async def finish(group: Workers, *, name: str = "final", **extra: str) -> None:
    """One last undisturbed worker drains whatever is left (and the outbox), then exits 0 when idle."""
    process = group.spawn("--exit-when-idle", idle_exit(group.settings), name=name, **extra)
    code = await group.wait(process, FINISH_TIMEOUT)
    assert code == 0, group.logs(name)


async def read_output(settings: Settings, expected: Expected) -> Published:
    alerts = await consume_all(
        settings, settings.topic_budget_alerts, expect=len(expected.alerts) + 2 * len(expected.resolved), timeout=60
    )
    dead = await consume_all(settings, settings.topic_dead_letter, expect=len(expected.quarantine), timeout=60)
    return published(alerts, dead)


async def verify(
    record: Record,
    db: asyncpg.Connection,
    settings: Settings,
    stream: Stream,
    delivered: list[Delivered],
    *,
    exactly_once_publish: bool,
    earlier: Expected | None = None,
) -> Expected:
    """Compute the expectation from what the broker acknowledged; record the figures; assert everything.

    ``earlier``: the verified state before revisions that only lowered spend were delivered; the alerts it had
    that the final spend no longer reaches are expected resolved (once each)."""
    expected = full_expectation(stream, delivered)
    if earlier is not None:
        assert set(expected.alerts) <= set(earlier.alerts), "lowering spend raised an alert"
        expected.resolved = {a: row for a, row in earlier.alerts.items() if a not in expected.alerts}
    record.messages = len(delivered)
    record.bad_inputs = len(expected.quarantine)
    record.alerts = len(expected.alerts)
    # The headline figures, measured before the exact assertions so a failure still reports them.
    have_events = {
        (r[0], r[1], r[2]) for r in await db.fetch("SELECT organization_id, occurred_at, event_id FROM api_usage")
    }
    have_keys = await db.fetchval("SELECT count(*) FROM cost_data")
    requests = await db.fetchval("SELECT coalesce(sum(request_count), 0) FROM project_metrics")
    record.lost = len(set(expected.api_usage) - have_events) + max(0, len(expected.cost_data) - have_keys)
    record.double_counted = max(0, requests - len(expected.api_usage)) + max(
        0, len(have_events) - len(expected.api_usage)
    )
    record.duplicate_alerts = await db.fetchval(
        "SELECT count(*) - count(DISTINCT (scope, budget_id, period_start, threshold, amount, currency)) "
        "FROM budget_alerts WHERE resolved_at IS NULL"
    )
    await assert_tables(db, expected, settings)
    found = await read_output(settings, expected)
    record.republished = found.republished
    assert_published(found, expected, settings, exactly_once=exactly_once_publish)
    return expected


# ------------------------------------------------------------------------------------------ HTTP probes


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET on the worker's HTTP port; (0, error) when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return 0, str(exc)


async def poll_ready(port: int, want: bool, timeout: float) -> float:
    """Poll /readyz until it answers ``want``; returns when (monotonic). Fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = (0, "")
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(http_get, port, "/readyz")
        if (last[0] == 200) == want and last[0] != 0:
            return time.monotonic()
        await asyncio.sleep(0.25)
    raise AssertionError(f"/readyz did not become {'ready' if want else 'not ready'} within {timeout}s: {last}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample == name and (not labels or rest.rstrip("}") == wanted):
            return float(value)
    return 0.0


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """JSON log lines of one event name."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"{event}"' not in line:
            continue
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if parsed.get("event") == event:
                found.append(parsed)
    return found


@contextlib.asynccontextmanager
async def scenario(name: str, *, timeout: float) -> AsyncIterator[Record]:
    """A bounded scenario whose figures land in RESULTS (``passed`` only if the body finished)."""
    record = Record(name)
    RESULTS.append(record)
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            yield record
        record.passed = True
    finally:
        record.seconds = time.monotonic() - started


def ends_by_topic(settings: Settings, delivered: Sequence[Delivered]) -> dict[tuple[str, int], int]:
    ends: dict[tuple[str, int], int] = {}
    for d in delivered:
        tp = (topic_of(settings, d.message.kind), d.partition)
        ends[tp] = max(ends.get(tp, 0), d.offset + 1)
    return ends


async def stored_offsets(db: asyncpg.Connection, settings: Settings) -> dict[tuple[str, int], int]:
    rows = await db.fetch(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = $1", settings.kafka_group_id
    )
    return {(r[0], r[1]): r[2] for r in rows}


async def wait_caught_up(
    db: asyncpg.Connection, settings: Settings, delivered: Sequence[Delivered], timeout: float
) -> None:
    """Until the stored offsets reach the end of every partition (the lag drained)."""
    ends = ends_by_topic(settings, delivered)
    deadline = time.monotonic() + timeout
    stored: dict[tuple[str, int], int] = {}
    while time.monotonic() < deadline:
        stored = await stored_offsets(db, settings)
        if all(stored.get(tp, 0) >= end for tp, end in ends.items()):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"not caught up within {timeout}s: stored {stored}, ends {ends}")
