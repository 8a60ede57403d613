"""Talking to the test broker: topics, producing, and running the worker in-process or as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from worker import kafka
from worker.app import Worker
from worker.config import Settings

INPUT_PARTITIONS = 3


async def create_topics(settings: Settings, partitions: int = INPUT_PARTITIONS) -> None:
    await kafka.ensure_topics(
        settings,
        {
            settings.topic_provider_buckets: partitions,
            settings.topic_api_usage: partitions,
            settings.topic_budget_alerts: 1,
            settings.topic_dead_letter: 1,
        },
    )


async def produce(
    settings: Settings,
    topic: str,
    values: Iterable[bytes],
    *,
    keys: Sequence[bytes | None] | None = None,
    partition: int | None = None,
    compression: str | None = None,
) -> int:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        linger_ms=5,
        max_request_size=8 * 1024 * 1024,
        compression_type=compression,
    )
    await producer.start()
    count = 0
    try:
        futures = []
        for index, value in enumerate(values):
            key = keys[index] if keys is not None else None
            futures.append(await producer.send(topic, value=value, key=key, partition=partition))
            count += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return count


async def consume_all(settings: Settings, topic: str, *, expect: int, timeout: float = 30.0) -> list[Any]:
    """Every record of a topic (from the beginning), waiting until at least ``expect`` arrived."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            fetched = await consumer.getmany(timeout_ms=300)
            for batch in fetched.values():
                records.extend(batch)
            if len(records) >= expect:
                fetched = await consumer.getmany(timeout_ms=500)  # and anything extra, to catch duplicates
                for batch in fetched.values():
                    records.extend(batch)
                break
    finally:
        await consumer.stop()
    return records


async def run_worker(settings: Settings, *, idle: float = 1.0, timeout: float = 90.0) -> int:
    """Run a worker in this process until it has been caught up and idle for ``idle`` seconds."""
    worker = Worker(settings)
    return await asyncio.wait_for(worker.run(exit_when_idle=idle), timeout=timeout)


async def run_worker_until(
    settings: Settings, done: Callable[[], Awaitable[bool]], *, timeout: float = 60.0, interval: float = 0.1
) -> int:
    """Run a worker in this process until ``done()`` says so, then stop it as SIGTERM would; its exit code.
    Quicker than ``run_worker`` when the test knows what to wait for (no group-settle wait)."""
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await done():
            if task.done():
                return await task  # it stopped (or raised) by itself
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the worker did not get there within {timeout}s")
            await asyncio.sleep(interval)
    finally:
        worker.stop.set()
    return await asyncio.wait_for(task, timeout)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("COST_WORKER_")}
    for name, value in settings.redacted().items():
        if value:
            env[name] = value
    env["COST_WORKER_DATABASE_URL"] = settings.dsn()
    env.update(extra)
    return env


def spawn_worker(settings: Settings, *args: str, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    """``cost-worker run`` as a real process (for signals: SIGKILL, SIGTERM, SIGSTOP)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env(settings, **extra),
        )


def kill(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    process.wait(30)
