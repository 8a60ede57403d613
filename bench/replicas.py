"""N worker processes on one consumer group (issue 18 item 5): the same backlog drained by 1, 2 and 3 replicas,
each run into a fresh database, watched from outside like a single drain (``bench.drain``).

A run with N > 1 starts N - 1 processes, and the N-th once the first batch is stored: a replica added to a
running group, as an autoscaler adds one, which makes the group rebalance while it works. Per run: the rate
from the moment the first member had its partitions to the last stored offset, and the rate once the group
had settled (every member holding its final partitions: the N-replica rate); the rebalance time (the new
replica's start -> group settled, from the workers' own ``partitions_assigned`` / ``positions_synced`` log
lines) and the longest stall of the stored offsets in it; the consumer lag (produced minus stored offsets)
over time and when the group settled; CPU of the workers, PostgreSQL and the broker.

All replicas share the machine with PostgreSQL and the broker: on 2 cores a second worker process competes
with PostgreSQL for the same cores, so the figures show what the machine allows, not what N replicas give
where the database has cores of its own (README's capacity model says how to read them).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import procs
from bench.drain import POLL, Topics, WorkerProcess, worker_env
from bench.services import Servers
from worker import devstack

COUNTS = (1, 2, 3)  # worker processes per run (the topics have 3 partitions: a 4th would idle)
OFFSETS = "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1"
GROUP_EVENTS = ("partitions_assigned", "partitions_revoked", "positions_synced")
SETTLED_MIN_SECONDS = 1.0  # a settled rate over less than this is not reported (the backlog ran out)
JOIN_WAIT = 30.0
# Members caught up wait this long before leaving by themselves: a run stops them (SIGTERM) when it has
# measured, so that none leaves the group while another joins (a small backlog is stored quickly).
IDLE_EXIT = 60.0  # seconds a run waits, its backlog stored, for the added replica to be in the group


def log_events(log: Path, names: tuple[str, ...] = GROUP_EVENTS) -> list[tuple[float, str, dict[str, Any]]]:
    """(unix time, event, record) of the named events in a worker's JSON log, in order."""
    found = []
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if not any(f'"{name}"' in line for name in names):
            continue
        try:
            record = json.loads(line)
            stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if record.get("event") in names:
            found.append((stamp, record["event"], record))
    return found


def group_timeline(logs: list[Path], spawned: float, until: float, joined: float | None, topic: str) -> dict[str, Any]:
    """When the first member started working and when the group settled, from the members' logs (seconds
    after the first processes were spawned; events after ``until``, the end of the measurement, are ignored).
    ``joined``: when the last replica was started into the running group (None: all started together).
    ``final_partitions``: each member's last assignment of ``topic`` (the partition numbers)."""
    first_ready: float | None = None
    settled: float | None = None
    assignments = revocations = 0
    final: list[list[int]] = []
    for log in logs:
        events = [(t - spawned, name, record) for t, name, record in log_events(log) if t - spawned <= until]
        ready = [t for t, name, _ in events if name == "positions_synced"]
        assigned = [(t, record.get("partitions") or []) for t, name, record in events if name == "partitions_assigned"]
        assignments += len(assigned)
        revocations += sum(1 for _, name, _ in events if name == "partitions_revoked")
        if ready:
            first_ready = ready[0] if first_ready is None else min(first_ready, ready[0])
        # The member's final assignment took effect at its last positions_synced (or assignment, if the
        # database read of its positions had not finished by then).
        last = max([t for t, _ in assigned] + ready, default=None)
        if last is not None:
            settled = last if settled is None else max(settled, last)
        last_assigned = assigned[-1][1] if assigned else []
        final.append(sorted(int(p.rsplit(":", 1)[1]) for p in last_assigned if p.rsplit(":", 1)[0] == topic))
    return {
        "first_ready_seconds": round(first_ready, 3) if first_ready is not None else None,
        "settled_seconds": round(settled, 3) if settled is not None else None,
        "joined_seconds": round(joined, 3) if joined is not None else None,
        "rebalance_seconds": round(settled - joined, 3) if settled is not None and joined is not None else None,
        "assignments": assignments,
        "revocations": revocations,
        "final_partitions": final,
    }


def _at(samples: list[tuple[float, int]], t: float) -> int:
    """Stored messages at time ``t`` (the last sample at or before it)."""
    stored = 0
    for when, n in samples:
        if when > t:
            break
        stored = n
    return stored


async def group_drain(
    servers: Servers,
    *,
    replicas: int,
    label: str,
    database: str,
    group: str,
    topics: Topics,
    ends: dict[int, int],
    units: int,
    unit: str,
    stop_at: int,
    idle: float,
    workdir: Path,
    extra_env: dict[str, str],
    max_seconds: float,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``replicas`` worker processes in ``group`` drain the backlog (``ends``: partition -> produced end
    offset) until ``stop_at`` messages are stored (or ``max_seconds`` passed), then are stopped (SIGTERM).
    With more than one, the last is started once the others stored their first batch."""
    db_url = servers.url(database)
    end = sum(ends.values())
    per_message = units / end
    target = min(stop_at, end)
    processes = []
    for index in range(replicas):
        env = worker_env(servers, db_url, group, topics, metrics_port=devstack.free_port(), extra=extra_env)
        processes.append(WorkerProcess(env, workdir / f"worker-{label}-{index}.log", idle=max(idle, IDLE_EXIT)))
    watch = await asyncpg.connect(db_url)
    samples: list[tuple[float, int]] = []
    lag: list[tuple[float, int]] = []
    hwm_kib = [0] * replicas
    done_at: float | None = None
    time_boxed = False
    joined: float | None = None  # when the last replica was started (replicas > 1)
    cpu: dict[str, float | None] = {}
    try:
        await watch.execute("CHECKPOINT")
        pg_before = procs.tree_cpu(servers.postmaster_pid) if servers.postmaster_pid else None
        broker_before = procs.cpu_seconds(servers.broker_pid) if servers.broker_pid else None
        spawned = time.time()
        started = time.perf_counter()
        for process in processes[:-1] if replicas > 1 else processes:
            process.start()
        while True:
            now = time.perf_counter() - started
            stored_by = {row["partition"]: int(row["next_offset"]) for row in await watch.fetch(OFFSETS, group)}
            stored = sum(stored_by.values())
            samples.append((now, stored))
            lag.append((now, sum(max(0, e - stored_by.get(p, 0)) for p, e in ends.items())))
            if progress is not None:
                progress(stored)
            for index, process in enumerate(processes):
                if process.proc is not None:
                    hwm_kib[index] = max(hwm_kib[index], procs.status_kib(process.pid, "VmHWM") or 0)
            if replicas > 1 and joined is None and stored > 0:
                processes[-1].start()  # a replica added to the running group: it rebalances
                joined = now
            boxed = now > max_seconds and stored > 0
            if done_at is None and (stored >= target or boxed) and (joined is not None or replicas == 1):
                time_boxed = boxed and stored < target
                target = min(stored, end)
                done_at = next(t for t, n in samples if n >= target)
                cpu["workers"] = sum(procs.cpu_seconds(p.pid) or 0.0 for p in processes if p.proc is not None)
                pg_after = procs.tree_cpu(servers.postmaster_pid) if servers.postmaster_pid else None
                cpu["postgres"] = procs.tree_delta(pg_before, pg_after) if pg_before and pg_after else None
                broker_after = procs.cpu_seconds(servers.broker_pid) if servers.broker_pid else None
                cpu["broker"] = broker_after - broker_before if broker_after is not None and broker_before else None
            # Done once the backlog is stored and, with a replica added, that replica is in the group (a small
            # backlog may be stored before the rebalance completes: it is measured all the same).
            joiner_in = replicas == 1 or bool(log_events(processes[-1].log, ("positions_synced",)))
            if done_at is not None and (joiner_in or now > done_at + JOIN_WAIT):
                break
            started_ones = [p for p in processes if p.proc is not None]
            if all(p.poll_exit() is not None for p in started_ones) or now > max_seconds + 120:
                break
            await asyncio.sleep(POLL)
        ended = time.perf_counter() - started
        started_ones = [p for p in processes if p.proc is not None]
        for process in started_ones:
            process.terminate()
        codes = await asyncio.gather(*(p.wait(30.0) for p in started_ones))
        rows = await watch.fetchval("SELECT count(*) FROM api_usage")
    finally:
        for process in processes:
            process.terminate()
        await watch.close()
    timeline = group_timeline([p.log for p in processes], spawned, ended, joined, topics.api_usage)
    result: dict[str, Any] = {
        "replicas": replicas,
        "label": label,
        "unit": unit,
        "units": round(per_message * target),
        "messages": target,
        "complete": done_at is not None and not time_boxed,
        "time_boxed": time_boxed,
        "exit_codes": list(codes),
        "done_seconds": round(done_at, 3) if done_at is not None else None,
        "per_second": None,
        "settled_per_second": None,
        "lag_at_settled": None,
        "peak_rss_mb": [round(k * 1024 / 1e6, 1) for k in hwm_kib],
        "cpu_seconds": {k: round(v, 2) if v is not None else None for k, v in cpu.items()},
        "rows_after": int(rows),
        "lag": _thin(lag),
        "progress": _thin(samples),
        **timeline,
    }
    first, settled = timeline["first_ready_seconds"], timeline["settled_seconds"]
    if done_at is not None and first is not None and done_at > first:
        result["per_second"] = round(per_message * target / (done_at - first), 1)
    if done_at is not None and settled is not None and done_at - settled >= SETTLED_MIN_SECONDS:
        moved = target - _at(samples, settled)
        if moved > 0:
            result["settled_per_second"] = round(per_message * moved / (done_at - settled), 1)
    if settled is not None:
        result["lag_at_settled"] = next((n for t, n in lag if t >= settled), None)
    if joined is not None and done_at is not None:
        result["stall_seconds"] = round(_longest_stall(samples, joined, done_at), 3)
    return result


def _longest_stall(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """The longest time in [start, end] during which the stored offsets did not move."""
    longest, since, last = 0.0, start, _at(samples, start)
    for t, n in samples:
        if t <= start or t > end:
            continue
        if n != last:
            longest = max(longest, t - since)
            since, last = t, n
    return longest


def _thin(points: list[tuple[float, int]], keep: int = 200) -> list[tuple[float, int]]:
    points = [(round(t, 2), n) for t, n in points]
    if len(points) <= keep:
        return points
    step = len(points) / keep
    return [points[int(i * step)] for i in range(keep)] + [points[-1]]
