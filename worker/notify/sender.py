"""One delivery attempt on the wire: a signed Standard Webhooks POST, or a Slack incoming-webhook POST.

Standard Webhooks (https://www.standardwebhooks.com/): headers ``webhook-id`` (the stable delivery id, the
same on every attempt so receivers dedupe), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, made by the ``standardwebhooks`` library); the body is
the alert message exactly as consumed.

Safety: redirects are not followed, proxies from the environment are not used, every connection goes
through ``SafeResolver`` (no private addresses), an attempt has a hard timeout, and at most
``RESPONSE_EXCERPT_BYTES`` of a response are read. A 429 or 503's ``Retry-After`` (seconds or an HTTP date) is
the least wait before the next attempt (``Attempt.retry_after``). Error texts never carry the URL's path or query (a
Slack URL's path is its token); secrets are never logged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

import aiohttp
from standardwebhooks.webhooks import Webhook

from worker import __version__
from worker.collect.client import retry_after_seconds
from worker.config import Settings
from worker.notify import slack
from worker.notify.urls import SafeResolver, UrlPolicy, UrlRefused

RESPONSE_EXCERPT_BYTES = 256  # bytes of a response body kept (as the delivery's last error)
ERROR_EXCERPT_CHARS = 500  # characters of an error kept
HIDDEN = "…"  # what a URL's path, query or fragment becomes in an error text
MIN_PIECE_CHARS = 6  # a path segment or query part at least this long never appears in an error text
CONNECT_SHARE = 0.6  # of the attempt timeout that connecting may use
USER_AGENT = f"cost-worker-notify/{__version__}"


@dataclass(frozen=True)
class Attempt:
    status: int | None  # HTTP status, None when no response
    seconds: float
    error: str = ""  # excerpt: the error, or the start of a non-2xx response body
    refused: bool = False  # the URL or the address it resolved to is not allowed
    retry_after: float | None = None  # seconds the receiver asked to wait (Retry-After of a 429 or 503)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410


def signed_headers(
    secret: str, webhook_id: str, body: bytes, at: float | None = None, *, previous: str | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers; with ``previous`` (a rotation's overlap) the header carries both signatures,
    space-separated, the current one first: a receiver verifying with either secret accepts the delivery."""
    timestamp = int(time.time() if at is None else at)
    moment = datetime.fromtimestamp(timestamp, UTC)
    signatures = [Webhook(key).sign(webhook_id, moment, body.decode()) for key in (secret, previous) if key]
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp), "webhook-signature": " ".join(signatures)}


def error_text(exc: BaseException, url: str) -> str:
    """The error of an attempt that got no usable response, as kept and logged: its type and what it says,
    without the URL's path, query or fragment (a Slack URL's path is its token).

    aiohttp reports the URL as it normalised it (``%7E`` decoded, the host lower-cased, a default port
    dropped), not as configured, so the URL cannot be matched as a whole: every spelling of its path, query
    and fragment is cut, in the URL as configured and in every URL the exception carries. Should any
    segment of them still be in the text, only the exception's type (and HTTP status) is kept.
    """
    if isinstance(exc, aiohttp.ClientResponseError):
        detail = f"{exc.status}, message={exc.message!r}"  # its str() ends with the URL
    elif isinstance(exc, aiohttp.InvalidURL):
        detail = ""  # its str() is the URL
    else:
        detail = str(exc)
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    spellings = _spellings([url, *_reported_urls(exc)])
    for part in sorted(spellings, key=len, reverse=True):
        text = text.replace(part, "/" + HIDDEN if part.startswith("/") else HIDDEN)
    pieces = {
        piece
        for part in spellings
        for piece in part.replace("?", "/").replace("&", "/").replace("=", "/").split("/")
        if len(piece) >= MIN_PIECE_CHARS
    }
    if any(piece in text for piece in pieces):
        status = f": {exc.status}" if isinstance(exc, aiohttp.ClientResponseError) else ""
        return f"{type(exc).__name__}{status}"
    return text


def _reported_urls(exc: BaseException) -> list[str]:
    """The URLs an aiohttp exception carries (the request's, the redirect's, an invalid one)."""
    found = []
    info = getattr(exc, "request_info", None)
    for value in (getattr(info, "url", None), getattr(info, "real_url", None), getattr(exc, "url", None)):
        if value is not None:
            found.append(str(value))
            human = getattr(value, "human_repr", None)
            if callable(human):
                found.append(str(human()))
    return found


def _spellings(urls: Iterable[str]) -> set[str]:
    """Path (with query), path, query and fragment of each URL, raw and percent-decoded; not the bare "/"."""
    found: set[str] = set()
    for url in urls:
        try:
            parts = urlsplit(url)
        except ValueError:
            continue
        path_qs = parts.path + (f"?{parts.query}" if parts.query else "")
        for value in (path_qs, parts.path, parts.query, parts.fragment):
            found |= {value, unquote(value)}
    return {value for value in found if value.strip("/")}


class Sender:
    def __init__(self, settings: Settings, policy: UrlPolicy) -> None:
        self.settings = settings
        self.policy = policy
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = self.settings.notify_timeout
            connector = aiohttp.TCPConnector(
                resolver=SafeResolver(self.policy),
                use_dns_cache=False,  # every attempt resolves (and checks) again
                limit=self.settings.notify_max_in_flight,
                limit_per_host=0,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=timeout, connect=timeout * CONNECT_SHARE),
                trust_env=False,
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def body(self, kind: str, payload: str) -> bytes:
        if kind == "slack":
            return slack.render(json.loads(payload), link_template=self.settings.notify_link_template)
        return payload.encode()

    async def send(
        self,
        kind: str,
        url: str,
        secret: str | None,
        webhook_id: str,
        payload: str,
        *,
        previous_secret: str | None = None,
    ) -> Attempt:
        body = self.body(kind, payload)
        headers = {"Content-Type": "application/json"}
        if kind == "webhook":
            assert secret is not None, "a webhook destination has a signing secret"
            headers.update(signed_headers(secret, webhook_id, body, previous=previous_secret))
        started = time.perf_counter()
        try:
            self.policy.check_url(url)  # IP literals never reach the resolver: check them here
        except UrlRefused as exc:
            return Attempt(None, 0.0, f"refused: {exc}"[:ERROR_EXCERPT_CHARS], refused=True)
        try:
            async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as response:
                excerpt = await response.content.read(RESPONSE_EXCERPT_BYTES)
                status = response.status
                retry_after = retry_after_seconds(response.headers.get("Retry-After")) if status in (429, 503) else None
        except UrlRefused as exc:  # from the resolver: the name resolves to a refused address now
            return Attempt(None, time.perf_counter() - started, f"refused: {exc}"[:ERROR_EXCERPT_CHARS], refused=True)
        except TimeoutError:
            return Attempt(None, time.perf_counter() - started, f"timeout after {self.settings.notify_timeout:g}s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Attempt(None, time.perf_counter() - started, error_text(exc, url)[:ERROR_EXCERPT_CHARS])
        seconds = time.perf_counter() - started
        if 200 <= status < 300:
            return Attempt(status, seconds)
        text = excerpt.decode("utf-8", "replace").strip()
        return Attempt(status, seconds, f"HTTP {status}: {text}"[:ERROR_EXCERPT_CHARS], retry_after=retry_after)
