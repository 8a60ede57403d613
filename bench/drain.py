"""The worker as a real process (``python -m worker run --exit-when-idle N``), watched from outside: stored
offsets (the end-to-end truth), resident memory, CPU time of the worker, PostgreSQL and the broker, the
worker's own /metrics, and where the database time went (pg_stat_statements)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from bench import procs
from bench.services import Servers
from worker import devstack
from worker.sql import queries

POLL = 0.05  # seconds between looks at consumer_offsets and at the process
SCRAPE = 1.0  # seconds between /metrics scrapes
OFFSETS_SUM = "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets WHERE group_id = $1"
# WAL the server wrote during a drain (the whole server: the benchmark's other databases are idle then).
WAL_LSN = "SELECT pg_current_wal_lsn()::text"
WAL_SINCE = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint"


@dataclass(frozen=True)
class Topics:
    api_usage: str
    buckets: str
    alerts: str
    dead_letter: str


def worker_env(
    servers: Servers, db_url: str, group: str, topics: Topics, *, metrics_port: int, extra: dict[str, str]
) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("COST_WORKER_")}
    env.update(
        {
            "COST_WORKER_DATABASE_URL": db_url,
            "COST_WORKER_DATABASE_ROLE": "cost_worker_writer",
            "COST_WORKER_KAFKA_BOOTSTRAP_SERVERS": servers.bootstrap,
            "COST_WORKER_KAFKA_GROUP_ID": group,
            "COST_WORKER_KAFKA_PRODUCER_IDEMPOTENCE": "false",  # Tansu has no idempotent producer
            "COST_WORKER_TOPIC_API_USAGE": topics.api_usage,
            "COST_WORKER_TOPIC_PROVIDER_BUCKETS": topics.buckets,
            "COST_WORKER_TOPIC_BUDGET_ALERTS": topics.alerts,
            "COST_WORKER_TOPIC_DEAD_LETTER": topics.dead_letter,
            "COST_WORKER_METRICS_HOST": "127.0.0.1",
            "COST_WORKER_METRICS_PORT": str(metrics_port),
            "COST_WORKER_LOG_FORMAT": "json",
        }
    )
    env.update(extra)
    return env


class WorkerProcess:
    """``python -m worker run --exit-when-idle IDLE``, optionally under a profiler command prefix."""

    def __init__(self, env: dict[str, str], log: Path, *, idle: float, prefix: list[str] | None = None) -> None:
        self.env = env
        self.log = log
        self.idle = idle
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_url = f"http://127.0.0.1:{env['COST_WORKER_METRICS_PORT']}/metrics"
        self.rusage: Any = None
        self._child: int | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [*self.prefix, sys.executable, "-m", "worker", "run", "--exit-when-idle", str(self.idle)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    @property
    def pid(self) -> int:
        """The worker's pid (under a profiler prefix: the profiler's child, once it exists)."""
        assert self.proc is not None
        if not self.prefix:
            return self.proc.pid
        if self._child is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                self._child = int(children[0])
        return self._child or self.proc.pid

    def poll_exit(self) -> int | None:
        """Reap the process if it ended, keeping its resource usage (ru_maxrss: its peak RSS)."""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            self.proc.returncode = -1
            return -1
        if pid == 0:
            return None
        self.rusage = rusage
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return self.proc.returncode

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.poll_exit()
            if code is not None:
                return code
            await asyncio.sleep(POLL)
        self.terminate()
        return await self.wait(15.0) if timeout > 15 else -9

    def terminate(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)


def parse_metrics(text: str) -> dict[str, Any]:
    """The worker metrics the benchmark reports: per-stage batch time, batch sizes, budget evaluation."""
    out: dict[str, Any] = {"batch_stage_seconds": {}, "budget_evaluation": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "cost_worker_batch_duration_seconds_sum":
                out["batch_stage_seconds"].setdefault(labels["stage"], {})["sum"] = value
            elif name == "cost_worker_batch_duration_seconds_count":
                out["batch_stage_seconds"].setdefault(labels["stage"], {})["count"] = value
            elif name == "cost_worker_batch_size_messages_sum":
                out["batch_messages_sum"] = value
            elif name == "cost_worker_batch_size_messages_count":
                out["batches"] = value
            elif name == "cost_worker_budget_evaluation_duration_seconds_sum":
                out["budget_evaluation"].setdefault(labels["trigger"], {})["sum"] = value
            elif name == "cost_worker_budget_evaluation_duration_seconds_count":
                out["budget_evaluation"].setdefault(labels["trigger"], {})["count"] = value
            elif name == "cost_worker_budget_evaluations_total":
                out.setdefault("budget_periods_evaluated", {})[labels["trigger"]] = value
            elif name == "cost_worker_messages_total":
                out.setdefault("messages", {})[f"{labels['topic']}:{labels['outcome']}"] = value
            elif name == "cost_worker_quarantined_total":
                out.setdefault("quarantined", {})[f"{labels['topic']}:{labels['reason']}"] = value
    for stage in out["batch_stage_seconds"].values():
        count = stage.get("count") or 0
        stage["mean_ms"] = round(stage.get("sum", 0.0) / count * 1000, 2) if count else None
    for trigger in out["budget_evaluation"].values():
        count = trigger.get("count") or 0
        trigger["mean_ms"] = round(trigger.get("sum", 0.0) / count * 1000, 3) if count else None
    if out.get("batches"):
        out["mean_batch_messages"] = round(out.get("batch_messages_sum", 0) / out["batches"], 1)
    return out


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            return parse_metrics(await response.text())
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


# ------------------------------------------------------------------------------------- pg_stat_statements


_LITERALS = re.compile(r"'(?:[^']|'')*'|\$\d+|\b\d+(?:\.\d+)?\b")


def _normalize(text: str) -> str:
    """Statement text with parameters and literals as ``?`` (pg_stat_statements turns literals into $n)."""
    return " ".join(_LITERALS.sub("?", text).split())


def _statement_name(text: str) -> str:
    """The worker's name for a statement (``worker/sql/queries.sql``): the longest common normalized prefix."""
    seen = _normalize(text)
    best, best_length = "", 0
    for name, statement in queries().items():
        known = _normalize(statement)
        length = next(
            (i for i, (a, b) in enumerate(zip(seen, known, strict=False)) if a != b), min(len(seen), len(known))
        )
        if length > best_length:
            best, best_length = name, length
    if best_length >= min(60, len(seen)):
        return best
    return seen[:60]


async def statements_available(servers: Servers) -> bool:
    conn = await asyncpg.connect(servers.server_url)
    try:
        loaded = "pg_stat_statements" in (await conn.fetchval("SHOW shared_preload_libraries"))
        if loaded:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return bool(loaded)
    finally:
        await conn.close()


async def statements_reset(servers: Servers) -> None:
    conn = await asyncpg.connect(servers.server_url)
    try:
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def statements_top(servers: Servers, database: str, limit: int = 10) -> list[dict[str, Any]]:
    """The worker's statements (its role's) that took the most database time in ``database`` since the last
    reset, named after ``worker/sql/queries.sql``."""
    conn = await asyncpg.connect(servers.server_url)
    try:
        rows = await conn.fetch(
            "SELECT query, calls, total_exec_time, rows, shared_blks_hit, shared_blks_read, shared_blks_dirtied, "
            "wal_bytes FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1) "
            "AND userid = 'cost_worker_writer'::regrole "
            "ORDER BY total_exec_time DESC LIMIT $2",
            database,
            limit,
        )
    finally:
        await conn.close()
    return [
        {
            "statement": _statement_name(row["query"]),
            "calls": row["calls"],
            "total_ms": round(row["total_exec_time"], 1),
            "mean_ms": round(row["total_exec_time"] / row["calls"], 3) if row["calls"] else None,
            "rows": row["rows"],
            "blocks_hit": row["shared_blks_hit"],
            "blocks_read": row["shared_blks_read"],
            "blocks_dirtied": row["shared_blks_dirtied"],
            "wal_mb": round(float(row["wal_bytes"]) / 1e6, 1),
        }
        for row in rows
    ]


# ------------------------------------------------------------------------------------- the drain

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def ready_at(log: Path) -> float | None:
    """Unix time at which the worker had joined the group and sought its partitions (``positions_synced``)."""
    try:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if '"positions_synced"' in line:
                stamp = json.loads(line)["timestamp"]
                return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (OSError, ValueError, KeyError):
        return None
    return None


def rate_until(samples: list[tuple[float, int]], start: float, mark: int, units_per_message: float) -> float | None:
    """Units per second from ``start`` until the stored offsets first reached ``mark`` messages."""
    reached = next((t for t, n in samples if n >= mark), None)
    if reached is None or reached <= start:
        return None
    return units_per_message * mark / (reached - start)


async def drain(
    servers: Servers,
    *,
    label: str,
    database: str,
    group: str,
    topics: Topics,
    end: int,
    units: int,
    unit: str,
    idle: float,
    workdir: Path,
    extra_env: dict[str, str],
    stop_at: int | None = None,
    max_seconds: float | None = None,
    timeout: float = 3_600.0,
    prefix: list[str] | None = None,
    with_statements: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the worker until the stored offsets of ``group`` sum to ``end`` (every produced offset stored in
    the database together with its data), then until it exits by itself (idle). ``units`` events or ledger
    lines were carried by those ``end`` messages. With ``stop_at``, stop (SIGTERM) once that many messages
    are stored instead; with ``max_seconds`` (after start), stop then, whatever is stored (``time_boxed``:
    the figures then cover the messages stored by the last commit seen).

    ``per_second`` counts from the moment the worker had joined the group and sought its partitions (its
    log's ``positions_synced``) to the moment the last offset was stored: process start-up and the group
    join (half the session timeout on the development broker) are not throughput. ``progress`` is called
    with the stored messages at every look (the run's progress display)."""
    db_url = servers.url(database)
    port = devstack.free_port()
    env = worker_env(servers, db_url, group, topics, metrics_port=port, extra=extra_env)
    log = workdir / f"worker-{label}.log"
    process = WorkerProcess(env, log, idle=idle, prefix=prefix)
    target = min(stop_at, end) if stop_at else end
    watch = await asyncpg.connect(db_url)
    await watch.execute("CHECKPOINT")
    statements = with_statements and await statements_available(servers)
    if statements:
        await statements_reset(servers)
    pg_before = procs.tree_cpu(servers.postmaster_pid) if servers.postmaster_pid else None
    broker_before = procs.cpu_seconds(servers.broker_pid) if servers.broker_pid else None
    wal_before = await watch.fetchval(WAL_LSN)
    wal_bytes: int | None = None
    samples: list[tuple[float, int]] = []
    rss_samples: list[tuple[float, int]] = []
    metrics: dict[str, Any] | None = None
    hwm_kib = 0
    done_at: float | None = None
    time_boxed = False
    worker_cpu: float | None = None
    pg_after: dict[int, float] | None = None
    broker_after: float | None = None
    spawned = time.time()
    started = time.perf_counter()
    process.start()
    try:
        async with aiohttp.ClientSession() as session:
            last_scrape = 0.0
            while time.perf_counter() - started < timeout:
                now = time.perf_counter()
                stored = int(await watch.fetchval(OFFSETS_SUM, group))
                samples.append((now - started, stored))
                if progress is not None:
                    progress(stored)
                rss = procs.status_kib(process.pid, "VmRSS")
                hwm = procs.status_kib(process.pid, "VmHWM")
                if rss is not None:
                    rss_samples.append((now - started, rss))
                hwm_kib = max(hwm_kib, hwm or 0)
                if now - last_scrape >= SCRAPE:
                    metrics = await scrape(session, process.metrics_url) or metrics
                    last_scrape = now
                boxed = max_seconds is not None and now - started > max_seconds and stored > 0
                if stored >= target or boxed:
                    if boxed and stored < target:
                        time_boxed = True
                        now = started + next(t for t, n in samples if n >= stored)
                    # What was stored (a batch may overshoot ``stop_at``), when it was: the first sample showing it.
                    target = min(stored, end)
                    done_at = now - started
                    worker_cpu = procs.cpu_seconds(process.pid)
                    pg_after = procs.tree_cpu(servers.postmaster_pid) if servers.postmaster_pid else None
                    broker_after = procs.cpu_seconds(servers.broker_pid) if servers.broker_pid else None
                    wal_bytes = int(await watch.fetchval(WAL_SINCE, wal_before))
                    metrics = await scrape(session, process.metrics_url) or metrics
                    break
                if process.poll_exit() is not None:
                    break
                await asyncio.sleep(POLL)
            if stop_at or time_boxed:
                process.terminate()
            # Until it leaves by itself: the high-water mark is read while it still exists.
            while process.poll_exit() is None and time.perf_counter() - started < timeout + idle + 30:
                hwm_kib = max(hwm_kib, procs.status_kib(process.pid, "VmHWM") or 0)
                await asyncio.sleep(POLL)
        code = await process.wait(idle + 30)
        top = await statements_top(servers, database) if statements else []
        rows = await watch.fetchrow(
            "SELECT (SELECT count(*) FROM api_usage) AS api_usage, (SELECT count(*) FROM cost_data) AS cost_data, "
            "(SELECT count(*) FROM quarantine) AS quarantine"
        )
    finally:
        process.terminate()
        await watch.close()
    assert rows is not None
    # The worker's own high-water mark (VmHWM, polled until it exits). Not wait4's ru_maxrss: Linux carries
    # the pre-exec image's peak into it, and a child forked from this benchmark process starts with the
    # parent's resident pages (hundreds of MB of prepared backlog), which every drain would then report.
    peak_kib = hwm_kib
    per_message = units / end
    ready = ready_at(log)
    ready_seconds = ready - spawned if ready is not None else None
    first = next(((t, n) for t, n in samples if n > 0), None)
    result: dict[str, Any] = {
        "label": label,
        "unit": unit,
        "units": round(per_message * target),
        "messages": target,
        "backlog_messages": end,
        "complete": done_at is not None and not time_boxed,
        "time_boxed": time_boxed,
        "exit_code": code,
        "ready_seconds": round(ready_seconds, 3) if ready_seconds is not None else None,
        "first_commit_seconds": round(first[0], 3) if first else None,
        "done_seconds": round(done_at, 3) if done_at is not None else None,
        "per_second": None,
        "wall_per_second": round(per_message * target / done_at, 1) if done_at else None,
        "after_first_batch_per_second": None,
        "prefix_per_second": {},
        "peak_rss_mb": round(peak_kib * 1024 / 1e6, 1),
        "rss_samples_mb": _thin([(round(t, 2), round(kib * 1024 / 1e6, 1)) for t, kib in rss_samples]),
        "progress": _thin([(round(t, 2), n) for t, n in samples]),
        "samples": samples,  # full resolution, for the runner (removed before the results are written)
        "cpu_seconds": {
            "worker": round(worker_cpu, 2) if worker_cpu is not None else None,
            "postgres": round(procs.tree_delta(pg_before, pg_after), 2) if pg_before and pg_after else None,
            "broker": round(broker_after - broker_before, 2)
            if broker_after is not None and broker_before is not None
            else None,
        },
        "wal_bytes": wal_bytes,
        "worker_metrics": metrics,
        "statements": top,
        "rows_after": dict(rows),
    }
    if done_at is not None:
        start = ready_seconds if ready_seconds is not None else 0.0
        rate = rate_until(samples, start, target, per_message)
        result["per_second"] = round(rate, 1) if rate else None
        result["per_second_basis"] = "from positions_synced" if ready_seconds is not None else "from process start"
        if first is not None and first[1] < target:
            after = per_message * (target - first[1]) / (done_at - first[0])
            result["after_first_batch_per_second"] = round(after, 1)
        for fraction in FRACTIONS:
            mark = max(1, round(end * fraction))
            if mark <= target:
                prefix_rate = rate_until(samples, start, mark, per_message)
                result["prefix_per_second"][str(fraction)] = round(prefix_rate, 1) if prefix_rate else None
    return result


def _thin(points: list[tuple[float, Any]], keep: int = 400) -> list[tuple[float, Any]]:
    if len(points) <= keep:
        return points
    step = len(points) / keep
    return [points[int(i * step)] for i in range(keep)] + [points[-1]]
