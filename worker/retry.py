"""Waiting and retrying: one stoppable sleep, and one retry loop (tenacity) for transient failures.

Infrastructure failures are retried, never skipped: ``retry_transient`` has no attempt limit. What ends it is
success, an error that is not transient (raised at once), a set ``stop`` event (``Stopped``), or cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never
from tenacity.wait import wait_base, wait_exponential, wait_random_exponential

from worker.config import Settings
from worker.errors import TransientError

T = TypeVar("T")


class Stopped(Exception):  # not an error: the caller asked to stop
    """The stop event was set while a retry waited."""


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first. Returns whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits between attempts: ``first`` seconds, then twice as long each time up to ``most`` (with ``jitter``: a
    random share of that, so replicas do not retry in step)."""

    first: float
    most: float
    jitter: bool = False

    @classmethod
    def of(cls, settings: Settings, *, jitter: bool = False) -> Backoff:
        """The operator's retry settings (``COST_WORKER_RETRY_INITIAL_BACKOFF``, ``..._MAX_BACKOFF``)."""
        return cls(settings.retry_initial_backoff, settings.retry_max_backoff, jitter)


async def retry_transient(
    attempt: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    stop: asyncio.Event | None = None,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
) -> T:
    """``attempt()`` until it succeeds, waiting after each ``TransientError`` as ``backoff`` says and calling
    ``on_retry(error, attempt number, seconds to wait)`` first. Waiting ends early with ``Stopped`` when ``stop``
    is set (without ``stop`` only cancellation ends it)."""
    first, most = backoff.first, backoff.most
    wait: wait_base = (
        wait_random_exponential(multiplier=first, max=most)
        if backoff.jitter
        else wait_exponential(multiplier=first, max=most)
    )

    async def pause(seconds: float) -> None:
        if stop is None:
            await asyncio.sleep(seconds)
        elif await sleep_or_stop(stop, seconds):
            raise Stopped()

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if on_retry is not None and error is not None:
            on_retry(error, state.attempt_number, state.upcoming_sleep)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TransientError),
        wait=wait,
        stop=stop_never,
        sleep=pause,
        before_sleep=before_sleep,
        reraise=True,
    )

    async def call() -> T:  # tenacity awaits only what it recognises as a coroutine function (not a lambda)
        return await attempt()

    return await retrying(call)
