"""HTTP to the providers' admin APIs (aiohttp), with the retry policy.

- 429: wait the ``Retry-After`` the provider sent (seconds, or an HTTP date read against the provider's own
  ``Date``), at most ``collect_max_retry_after``; without one, back off like a 5xx. A 5xx with a Retry-After
  (a 503's) waits for it too, up to the same ceiling.
- 5xx, timeouts, connection errors: exponential backoff with jitter (tenacity) from ``collect_retry_initial_backoff``
  up to ``collect_retry_max_backoff``, ``collect_max_attempts`` in all (by default 1+2+4+8+16 s and jitter: an
  outage of about half a minute is ridden out within one poll).
- A response that is not valid HTTP (a bad Content-Length, a broken status line): like a 5xx, retried.
- 401/403: ``ProviderAuthFailed`` at once (no retry), with its status: a 401 stops that account, a 403 (a key
  without the permission for this endpoint) that endpoint; the others go on.
- Redirects are never followed (a header such as Anthropic's ``x-api-key`` would go to the other host): a 3xx
  is a ``ProviderRejected`` naming its status, like any other status, an invalid URL or a body that is not a
  page.
Every aiohttp error ends here, as one of the collector's errors (``raise ... from exc``). The admin key travels
only in the request headers; nothing here logs or raises it.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jiter
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from worker import metrics
from worker.collect.errors import ProviderAuthFailed, ProviderRejected, ProviderUnavailable, RateLimited
from worker.collect.sources import Endpoint
from worker.config import COLLECT_RETRY_INITIAL_BACKOFF, COLLECT_RETRY_MAX_BACKOFF, Settings

MAX_PAGE_BYTES = 64 * 1_048_576  # bytes of one response body; larger is refused


class _RetryAfterOrBackoff(wait_base):
    """Retry-After when the provider sent one, else exponential backoff with jitter."""

    def __init__(self, initial: float, maximum: float, ceiling: float) -> None:
        self.backoff = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
        self.ceiling = ceiling

    def __call__(self, retry_state: Any) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, ProviderUnavailable) and error.retry_after is not None:
            return min(error.retry_after, self.ceiling)
        return float(self.backoff(retry_state))


def provider_clock(date: str | None) -> float | None:
    """What the provider's clock read when it answered (its ``Date`` header), None when it did not say (or said
    something no clock can read: a year beyond any, OverflowError, is no date either)."""
    if date is None:
        return None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, OverflowError):
        return None


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date (RFC 9110 10.2.3). ``now``: the moment
    the date is counted from, the provider's own clock (its ``Date`` header) when it sent one, for a date is a
    moment on the provider's clock, and ours may be minutes off. Unreadable (superscript digits pass
    ``str.isdigit`` but not ``float``; a year beyond any clock overflows): None, as if absent, never an error
    (one raised here would end the whole collector, not just this request)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, OverflowError):
        return None
    return max(0.0, moment - (time.time() if now is None else now))


class ProviderClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        max_attempts: int,
        max_retry_after: float,
        backoff_initial: float = COLLECT_RETRY_INITIAL_BACKOFF,
        backoff_max: float = COLLECT_RETRY_MAX_BACKOFF,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.session = session
        self.max_attempts = max_attempts
        self.max_retry_after = max_retry_after
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.sleep = sleep

    @classmethod
    def from_settings(
        cls,
        session: aiohttp.ClientSession,
        settings: Settings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> ProviderClient:
        """The collector's client: the provider retry settings (not the database batch's)."""
        return cls(
            session,
            max_attempts=settings.collect_max_attempts,
            max_retry_after=settings.collect_max_retry_after,
            backoff_initial=settings.collect_retry_initial_backoff,
            backoff_max=settings.collect_retry_max_backoff,
            sleep=sleep,
        )

    async def get_page(
        self, base_url: str, endpoint: Endpoint, account: str, headers: dict[str, str], params: list[tuple[str, str]]
    ) -> dict[str, Any]:
        """One page of one endpoint, retried per the policy above."""
        if not all(_is_header_value(value) for value in headers.values()):
            # aiohttp would raise a bare ValueError/UnicodeEncodeError while writing the request; never the value.
            raise ProviderRejected(
                f"{endpoint.report} of {endpoint.provider} account {account}: a request header holds a character "
                "HTTP cannot carry (a line break or non-ASCII text in the admin key?)"
            )
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=_RetryAfterOrBackoff(self.backoff_initial, self.backoff_max, self.max_retry_after),
            retry=retry_if_exception_type(ProviderUnavailable),
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._get_once(base_url, endpoint, account, headers, params)
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    async def _get_once(
        self, base_url: str, endpoint: Endpoint, account: str, headers: dict[str, str], params: list[tuple[str, str]]
    ) -> dict[str, Any]:
        where = f"{endpoint.report} of {endpoint.provider} account {account}"
        url = base_url.rstrip("/") + endpoint.path
        try:
            # allow_redirects=False: the admin key must never follow a redirect to another host.
            async with self.session.get(url, params=params, headers=headers, allow_redirects=False) as response:
                status = response.status
                _count(endpoint, str(status))
                wait = retry_after_seconds(
                    response.headers.get("Retry-After"), now=provider_clock(response.headers.get("Date"))
                )
                if status == 429:
                    if wait is not None and wait > self.max_retry_after:
                        raise ProviderRejected(
                            f"{where}: rate limited, Retry-After {wait:.0f}s exceeds the configured maximum"
                        )
                    raise RateLimited(f"{where}: rate limited (429)", wait)
                if status == 401:
                    raise ProviderAuthFailed(
                        f"{where}: the provider refused the admin key (HTTP 401); "
                        "rotate it with `cost-worker keys rotate`",
                        status,
                    )
                if status == 403:
                    raise ProviderAuthFailed(
                        f"{where}: the admin key is not allowed this endpoint (HTTP 403); grant the key this "
                        "permission in the provider's console, or rotate it with `cost-worker keys rotate`",
                        status,
                    )
                if status >= 500:
                    raise ProviderUnavailable(f"{where}: provider error HTTP {status}", wait)
                if 300 <= status < 400:
                    raise ProviderRejected(
                        f"{where}: HTTP {status}, a redirect (not followed: the admin key stays with the configured "
                        "base URL; point the base URL setting at the new address)"
                    )
                if status != 200:
                    raise ProviderRejected(f"{where}: HTTP {status}{_error_type(await _read(response))}")
                body = await _read(response)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            _count(endpoint, "timeout")
            raise ProviderUnavailable(f"{where}: request timed out") from exc
        except aiohttp.ClientPayloadError as exc:
            _count(endpoint, "connection_error")
            raise ProviderUnavailable(f"{where}: response cut short") from exc
        except aiohttp.ClientConnectionError as exc:
            _count(endpoint, "connection_error")
            raise ProviderUnavailable(f"{where}: cannot reach the provider ({type(exc).__name__})") from exc
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:  # the base URL (never repeated)
            raise ProviderRejected(f"{where}: the base URL is not a valid URL ({type(exc).__name__})") from exc
        except aiohttp.ClientResponseError as exc:  # the response is not valid HTTP (aiohttp's parser refused it)
            _count(endpoint, "invalid_response")
            raise ProviderUnavailable(f"{where}: the response is not valid HTTP ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:  # anything else aiohttp raises: retried like an unreachable provider
            _count(endpoint, "connection_error")
            raise ProviderUnavailable(f"{where}: the request failed ({type(exc).__name__})") from exc
        try:
            # Exact numbers, passed on as written; a repeated key is refused, as the worker refuses it in a
            # message (which of two amounts is the bucket's is not ours to guess, and re-serialising the page
            # would hide that there were two).
            page = jiter.from_json(body, float_mode="decimal", catch_duplicate_keys=True)
        except ValueError as exc:
            if "duplicate key" in str(exc):  # the position only: nothing of the body goes into a message
                where_in = _POSITION.search(str(exc))
                at = f" ({where_in.group(0)})" if where_in else ""
                raise ProviderRejected(f"{where}: the response repeats a key in one object{at}") from exc
            raise ProviderRejected(f"{where}: the response is not JSON") from exc
        if not isinstance(page, dict) or not isinstance(page.get("data"), list):
            raise ProviderRejected(f"{where}: the response is not a page of buckets")
        return page


_POSITION = re.compile(r"line \d+ column \d+")


def _is_header_value(value: str) -> bool:
    """Visible ASCII and inner spaces only (RFC 9110 field-value, without obs-text)."""
    return all(" " <= ch <= "~" for ch in value)


async def _read(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, up to ``MAX_PAGE_BYTES``. (``content.read(n)`` returns what one network read brought,
    at most n bytes: a page of a few hundred kilobytes would be cut after its first chunk.)"""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_PAGE_BYTES:
            raise ProviderRejected(f"response larger than {MAX_PAGE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_type(body: bytes) -> str:
    """The provider's error type/code, when its body is the documented error object (never the message). A body
    nested too deep for the parser (RecursionError) names none, like any other body that is not that object."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return ""
    if not isinstance(error, dict):
        return ""
    kind = error.get("type") or error.get("code")
    return f" ({str(kind)[:64]})" if isinstance(kind, str) else ""


def _count(endpoint: Endpoint, status: str) -> None:
    metrics.COLLECT_REQUESTS.labels(provider=endpoint.provider, report=endpoint.report, status=status).inc()
