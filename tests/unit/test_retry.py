"""The retry helper and the stoppable sleep without servers."""

from __future__ import annotations

import asyncio
import time

import pytest

from worker.errors import DatabaseUnavailable, FatalError
from worker.retry import Backoff, Stopped, retry_transient, sleep_or_stop


async def test_transient_failures_are_retried_with_doubling_waits() -> None:
    calls: list[float] = []
    waits: list[float] = []

    async def attempt() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise DatabaseUnavailable()
        return "done"

    result = await retry_transient(attempt, Backoff(0.01, 0.03), on_retry=lambda _error, _n, wait: waits.append(wait))
    assert result == "done"
    assert waits == [0.01, 0.02, 0.03]
    assert calls[-1] - calls[0] >= 0.06


async def test_other_errors_are_raised_at_once() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise FatalError("no")

    with pytest.raises(FatalError):
        await retry_transient(attempt, Backoff(0.01, 0.01))
    assert calls == 1


async def test_jittered_waits_stay_below_the_doubling() -> None:
    waits: list[float] = []

    async def attempt() -> None:
        if len(waits) < 5:
            raise DatabaseUnavailable()

    await retry_transient(attempt, Backoff(0.001, 0.004, jitter=True), on_retry=lambda _e, _n, w: waits.append(w))
    assert all(0 <= w <= limit for w, limit in zip(waits, [0.001, 0.002, 0.004, 0.004, 0.004], strict=True))


async def test_a_stop_ends_the_waiting() -> None:
    stop = asyncio.Event()

    async def attempt() -> None:
        raise DatabaseUnavailable()

    asyncio.get_running_loop().call_later(0.05, stop.set)
    started = time.monotonic()
    with pytest.raises(Stopped):
        await retry_transient(attempt, Backoff(30, 30), stop=stop)
    assert time.monotonic() - started < 5


async def test_sleep_or_stop() -> None:
    stop = asyncio.Event()
    assert await sleep_or_stop(stop, 0.01) is False
    stop.set()
    started = time.monotonic()
    assert await sleep_or_stop(stop, 30) is True
    assert time.monotonic() - started < 5


async def test_a_lambda_returning_a_coroutine_is_awaited_too() -> None:
    attempts: list[int] = []

    async def attempt(n: int) -> int:
        attempts.append(n)
        if len(attempts) < 2:
            raise DatabaseUnavailable()
        return n * 2

    assert await retry_transient(lambda: attempt(21), Backoff(0.001, 0.001)) == 42
    assert attempts == [21, 21]
