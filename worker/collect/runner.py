"""``cost-worker collect``: one active poller among the replicas, polling every account on an interval.

Each round: for every active account (``organization_api_keys``) and every endpoint of its provider, take the
window's ``collected_at`` (the clock just before reading it, later than every revision before it even if the
clock stepped back: ``Revisions``), read the window (``windows``), stage it with its state in one transaction
(``store``), and let the publisher deliver it (``publisher``). Failures stay where they happen:
- 401 stops that account, with an error log line, ``cost_worker_collect_auth_failures_total`` and
  ``cost_worker_collect_account_refused``; the other accounts go on. A refused key is tried again (one request)
  every ``collect_auth_retry_interval`` (a provider's 401 during an incident must not stop collection for good),
  and at once when it changes (``keys rotate`` or a new secret file): ``Refusals``.
- 403 (a key without the permission for one endpoint: usage but not costs) stops that endpoint only, the same
  way (``collect_endpoint_refused``, ``cost_worker_collect_endpoint_refusals_total`` and
  ``cost_worker_collect_endpoint_refused``, tried again every ``collect_auth_retry_interval``); the account's other
  endpoints go on.
- An endpoint that still fails after its retries (or answers something undocumented) is left for the next
  poll; nothing of its window is staged. The other endpoints go on.
- The database or the broker failing ends the round; the loop retries it after a backoff.
What a round missed (failed endpoints, refused or unreadable keys) is logged once at its end; ``--once`` exits
``EXIT_INCOMPLETE`` when its poll missed anything, so that a cron job or a Kubernetes Job sees it.
Replicas that do not hold the advisory lock stay ready and idle, and try to take over every interval.
Shutdown: SIGTERM sets ``stop``; the round in progress is abandoned (nothing of it is half-staged) and the
staged backlog is flushed within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import aiohttp
import asyncpg
import structlog

from worker import logs, metrics
from worker.app import EXIT_DEADLINE, exit_after, run_loop, until_ready
from worker.collect import keys as keystore
from worker.collect.client import ProviderClient
from worker.collect.errors import KeyStoreError, ProviderAuthFailed, ProviderRejected, ProviderUnavailable
from worker.collect.publisher import CollectorPublisher, envelope
from worker.collect.refusals import Refusals
from worker.collect.revisions import Revisions
from worker.collect.sources import ENDPOINTS, Endpoint, headers
from worker.collect.store import Account, OutboxConnection, PollerConnection
from worker.collect.windows import read_window, window_for
from worker.config import COLLECT_BACKFILL_DAYS, Settings, env_name
from worker.errors import CostWorkerError, FatalError, TransientError
from worker.http import Health, HealthServer
from worker.migrate import check_current
from worker.retry import sleep_or_stop
from worker.store import connect

log = structlog.get_logger("worker.collect")
T = TypeVar("T")

EXIT_OK, EXIT_FAILURE = 0, 1
EXIT_INCOMPLETE = 3  # --once: the poll ran but missed something (2 is the CLI's usage/config error)
MAX_WAIT_SETTING = env_name("collect_once_max_wait")  # named in what `--once` says when it gives up
MAX_MISSED_SHOWN = 20  # what a --once that missed something names on its stderr line (the log line names all)


@dataclass
class CollectorHealth(Health):
    """Ready when the database answers and, on the active poller, every endpoint succeeded recently."""

    stale_after: float = 0.0
    active: bool = False
    last_round_ok: float | None = None  # monotonic time of the last round that reached the database
    stale: list[str] = field(default_factory=list)

    def readiness(self) -> tuple[bool, str]:
        if self.dead:
            return False, f"component stopped: {self.dead}"
        if self.stopping:
            return False, "shutting down"
        if not self.database_ok:
            return False, "database unreachable"
        if self.retrying_since is not None and time.monotonic() - self.retrying_since > self.ready_max_retrying:
            return False, f"publishing staged buckets has failed for {time.monotonic() - self.retrying_since:.0f}s"
        if not self.active:
            return True, "ok: standby (another replica polls)"
        if self.stale:
            return False, f"no successful poll for over {self.stale_after:.0f}s: {', '.join(self.stale[:5])}"
        return True, "ok: active poller"


@dataclass(frozen=True)
class AccountPoll:
    """What every endpoint of one account's poll shares: its key (as a fingerprint and as headers), its state and
    the round's revisions."""

    account: Account
    revisions: Revisions
    fingerprint: str
    base_url: str
    auth: dict[str, str] = field(repr=False)  # holds the key: never shown
    state: dict[str, datetime] = field(default_factory=dict)


class Collector:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.health = CollectorHealth(
            ready_max_retrying=settings.ready_max_retrying, stale_after=settings.collect_stale_after
        )
        self.refusals = Refusals(settings.collect_auth_retry_interval)  # (provider, account): 401
        self.endpoint_refusals = Refusals(settings.collect_auth_retry_interval)  # (provider, account, report): 403
        self.missed: list[str] = []  # what the last round did not collect, "provider/account[/report]: why"
        self.max_wait: float | None = None  # --once: how long an unreachable database or broker is waited for
        self.failure: str | None = None  # --once: why it exits EXIT_FAILURE without raising (its stderr line)
        self._keys: keystore.Keyring | None = None

    # --- the loop -----------------------------------------------------------------------------------------

    async def run(self, *, once: bool = False) -> int:
        settings = self.settings
        http = HealthServer(self.health, settings.metrics_host, settings.metrics_port)
        port = await http.start()
        log.info("http_listening", port=port)
        poller: PollerConnection | None = None
        outbox = OutboxConnection(
            lambda: connect(settings.dsn(), role=settings.database_role, timeout=settings.database_connect_timeout)
        )
        publisher: CollectorPublisher | None = None
        timeout = aiohttp.ClientTimeout(total=settings.collect_request_timeout)
        # `--once` (a CronJob, a Job) must not hang on a service that is down: it waits collect_once_max_wait.
        self.max_wait = settings.collect_once_max_wait if once else None
        try:
            # Unreachable services at startup are waited for (as `run` does); a misconfiguration is not.
            poller = await self._until_ready("database", self._open_poller)
            await self._until_ready("database", outbox.connect)
            self.health.database_ok = True
            publisher = CollectorPublisher(settings, outbox)
            await self._until_ready("kafka", publisher.start)
            await self._deliver(publisher)  # what a previous run staged but did not deliver
            async with aiohttp.ClientSession(timeout=timeout, raise_for_status=False) as session:
                client = ProviderClient.from_settings(session, settings)
                return await self._loop(poller, publisher, client, once=once)
        finally:
            if publisher is not None:
                with contextlib.suppress(CostWorkerError, TimeoutError):
                    await asyncio.wait_for(publisher.drain(), timeout=settings.shutdown_grace * 0.5)
                await publisher.close()
            await outbox.close()
            if poller is not None:
                await poller.close()
            metrics.COLLECT_ACTIVE.set(0)
            await http.stop()

    async def _until_ready(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        return await until_ready(what, self.stop, attempt, give_up_after=self.max_wait, limit_name=MAX_WAIT_SETTING)

    async def _open_poller(self) -> PollerConnection:
        settings = self.settings
        poller = await PollerConnection.open(
            settings.dsn(), role=settings.database_role, timeout=settings.database_connect_timeout
        )
        try:
            await check_current(poller.conn)
        except BaseException:
            await poller.close()
            raise
        return poller

    async def _loop(
        self, poller: PollerConnection, publisher: CollectorPublisher, client: ProviderClient, *, once: bool
    ) -> int:
        delay = self.settings.retry_initial_backoff
        failing_since: float | None = None  # monotonic time of the first of consecutive failed rounds
        while not self.stop.is_set():
            try:
                if not self.health.active:
                    self.health.active = await poller.try_lock()
                    metrics.COLLECT_ACTIVE.set(1 if self.health.active else 0)
                    if self.health.active:
                        log.info("collector_active")
                if self.health.active:
                    if not await self._until_stopped(self._round(poller, publisher, client)):
                        break
                    delivered = await self._deliver(publisher)
                    await self._freshness(poller)
                    if once:
                        if not delivered:
                            self.missed.append(
                                "staged windows left unpublished (stopped while the broker failed)"
                                if self.stop.is_set()
                                else f"staged windows left unpublished (the broker failed for over {MAX_WAIT_SETTING}"
                                f", {self.max_wait:g}s; published on the next start)"
                            )
                        return EXIT_INCOMPLETE if self.missed else EXIT_OK
                elif once:
                    log.error("collector_not_active", reason="another replica holds the poller lock")
                    self.failure = "another replica holds the poller lock (cost_worker.collector): nothing was polled"
                    return EXIT_FAILURE
                self.health.database_ok = True
                delay = self.settings.retry_initial_backoff
                failing_since = None
            except TransientError as exc:
                self.health.database_ok = not poller.conn.is_closed()
                if poller.conn.is_closed():  # the lock went with the connection: stop polling at once
                    log.warning("collect_round_failed", error=str(exc))
                    self.health.active = False
                    metrics.COLLECT_ACTIVE.set(0)
                    raise
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if once and self.max_wait is not None and now - failing_since + delay > self.max_wait:
                    log.warning("collect_round_failed", error=str(exc), gave_up_after=round(now - failing_since))
                    if not self.health.active:  # the lock was never taken: nothing was polled
                        raise FatalError(
                            f"database unreachable for {now - failing_since:.0f}s, gave up ({MAX_WAIT_SETTING} "
                            f"is {self.max_wait:g}s): {exc}"
                        ) from exc
                    self.missed.append(
                        f"the poll failed on the database or the broker for over {MAX_WAIT_SETTING}, "
                        f"{self.max_wait:g}s: {exc}"
                    )
                    return EXIT_INCOMPLETE
                log.warning("collect_round_failed", error=str(exc), retry_in=delay)
                await sleep_or_stop(self.stop, delay)
                delay = min(delay * 2, self.settings.retry_max_backoff)
                continue
            await sleep_or_stop(self.stop, self.settings.collect_interval)
        if once:  # stopped (SIGTERM) before the poll was complete
            self.missed.append("the poll was stopped before it finished")
            return EXIT_INCOMPLETE
        return EXIT_OK

    async def _deliver(self, publisher: CollectorPublisher) -> bool:
        """Publish everything staged, retrying the broker and the publisher's database connection (replaced when
        lost) with backoff, never re-polling for it. /readyz fails once this lasts over ``ready_max_retrying``.
        False when stopped before everything was published, or (``--once``) after ``max_wait`` of failures: what
        is staged stays staged for the next start."""
        delay = self.settings.retry_initial_backoff
        failing_since: float | None = None
        while True:
            try:
                await publisher.drain()
                self.health.retrying_since = None
                return True
            except TransientError as exc:
                if self.stop.is_set():
                    log.warning("collect_publish_left_for_next_start", error=str(exc))
                    return False
                now = time.monotonic()
                if self.health.retrying_since is None:
                    self.health.retrying_since = now
                failing_since = now if failing_since is None else failing_since
                if self.max_wait is not None and now - failing_since + delay > self.max_wait:
                    log.warning(
                        "collect_publish_left_for_next_start",
                        error=str(exc),
                        reason=f"publishing failed for over {MAX_WAIT_SETTING} ({self.max_wait:g}s)",
                    )
                    return False
                log.warning("collect_publish_failed", error=str(exc), retry_in=delay)
                await sleep_or_stop(self.stop, delay)
                delay = min(delay * 2, self.settings.retry_max_backoff)

    async def _until_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run ``work`` unless ``stop`` is set first; then cancel it (a window being read is dropped, a staging
        transaction rolls back: nothing is half-staged). True when the work finished."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if task.done():
            task.result()  # raises what the round raised
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("collect_round_abandoned", reason="shutdown")
        return False

    async def _round(self, poller: PollerConnection, publisher: CollectorPublisher, client: ProviderClient) -> None:
        self.missed = []
        revisions = Revisions(await poller.newest_revision())
        accounts = await poller.accounts()
        log.info("collect_round", accounts=len(accounts))
        for account in accounts:
            if self.stop.is_set():
                return
            await self._poll_account(poller, publisher, client, account, revisions)
        if self.missed:
            self.missed.sort()
            log.warning("collect_round_incomplete", missed=self.missed, count=len(self.missed))

    async def _poll_account(
        self,
        poller: PollerConnection,
        publisher: CollectorPublisher,
        client: ProviderClient,
        account: Account,
        revisions: Revisions,
    ) -> None:
        provider, name = account.provider, account.organization_id
        try:
            admin_key = self._admin_key(account)
        except KeyStoreError as exc:
            self.missed.append(f"{provider}/{name}: admin key unreadable")
            log.error("collect_key_unreadable", provider=provider, account=name, error=str(exc))
            return
        fingerprint = keystore.fingerprint(admin_key.reveal())
        waiting = self.refusals.waiting((provider, name), fingerprint, time.monotonic())
        if waiting is not None:
            self.missed.append(f"{provider}/{name}: admin key refused (next try in {waiting:.0f}s)")
            log.error(
                "collect_account_stopped",
                provider=provider,
                account=name,
                retry_in=round(waiting),
                reason="the provider refused this admin key; tried again after retry_in seconds, at once after "
                "`cost-worker keys rotate`",
            )
            return
        poll = AccountPoll(
            account=account,
            revisions=revisions,
            fingerprint=fingerprint,
            base_url=self._base_url(provider),
            auth=headers(account.provider, admin_key.reveal()),  # type: ignore[arg-type]
            state=await poller.state(account.id),
        )
        for endpoint in ENDPOINTS[provider]:  # type: ignore[index]
            if self.stop.is_set():
                return
            if not await self._poll_endpoint(poller, publisher, client, poll, endpoint):
                return  # 401: the key is refused, the account's other endpoints would be refused too
        if self.refusals.accept((provider, name)):
            with contextlib.suppress(KeyError):
                metrics.COLLECT_ACCOUNT_REFUSED.remove(provider, name)
            log.info("collect_account_resumed", provider=provider, account=name)

    async def _poll_endpoint(
        self,
        poller: PollerConnection,
        publisher: CollectorPublisher,
        client: ProviderClient,
        poll: AccountPoll,
        endpoint: Endpoint,
    ) -> bool:
        """Read one endpoint's window and stage it. False when the provider refused the account's key (401): the
        account's poll stops there. A 403, a failure or an endpoint still refused is recorded and the poll goes on."""
        provider, name = poll.account.provider, poll.account.organization_id
        where = (provider, name, endpoint.report)
        waiting = self.endpoint_refusals.waiting(where, poll.fingerprint, time.monotonic())
        if waiting is not None:
            self.missed.append(
                f"{provider}/{name}/{endpoint.report}: endpoint refused (HTTP 403, next try in {waiting:.0f}s)"
            )
            log.error(
                "collect_endpoint_stopped",
                provider=provider,
                account=name,
                report=endpoint.report,
                retry_in=round(waiting),
                reason="the provider refused this admin key for this endpoint (403: a missing permission); "
                "tried again after retry_in seconds, at once after `cost-worker keys rotate`",
            )
            return True
        collected_at = poll.revisions.next()
        window = window_for(
            collected_at,
            collected_through=poll.state.get(endpoint.report),
            trailing_days=self.settings.collect_trailing_days,
            backfill_start=self.settings.collect_backfill_start,
            backfill_days=COLLECT_BACKFILL_DAYS,
        )
        try:
            collected = await read_window(
                client, endpoint, window, base_url=poll.base_url, account=name, headers=endpoint.headers(poll.auth)
            )
            messages = [
                envelope(
                    endpoint,
                    name,
                    bucket,
                    collected_at,
                    max_bytes=self.settings.max_message_bytes,
                    max_results=self.settings.max_results_per_message,
                )
                for bucket in collected.buckets
            ]
        except ProviderAuthFailed as exc:
            self._polled(endpoint, "auth_failed")
            if exc.endpoint_only:  # 403: this endpoint only, the account's others go on
                self._refuse_endpoint(where, poll.fingerprint, exc)
                return True
            self._refuse_account(provider, name, poll.fingerprint, exc)
            return False
        except (ProviderUnavailable, ProviderRejected) as exc:
            self._polled(endpoint, "failed")
            self.missed.append(f"{provider}/{name}/{endpoint.report}: failed")
            log.warning(
                "collect_endpoint_failed", provider=provider, account=name, report=endpoint.report, error=str(exc)
            )
            return True
        await poller.stage(
            poll.account.id,
            endpoint.report,
            self.settings.topic_provider_buckets,
            messages,
            collected_through=window.end,
            collected_at=collected_at,
        )
        publisher.wake.set()
        self._polled(endpoint, "ok")
        metrics.COLLECT_PAGES.labels(provider=provider, report=endpoint.report).inc(collected.pages)
        log.info(
            "collect_window_staged",
            provider=provider,
            account=name,
            report=endpoint.report,
            window_start=window.start.isoformat(),
            window_end=window.end.isoformat(),
            pages=collected.pages,
            buckets=len(messages),
            repeated_results=collected.repeated,
        )
        if self.endpoint_refusals.accept(where):
            with contextlib.suppress(KeyError):
                metrics.COLLECT_ENDPOINT_REFUSED.remove(*where)
            log.info("collect_endpoint_resumed", provider=provider, account=name, report=endpoint.report)
        return True

    def _refuse_endpoint(self, where: tuple[str, str, str], fingerprint: str, exc: ProviderAuthFailed) -> None:
        provider, name, report = where
        self.endpoint_refusals.refuse(where, fingerprint, time.monotonic())
        metrics.COLLECT_ENDPOINT_REFUSALS.labels(*where).inc()
        metrics.COLLECT_ENDPOINT_REFUSED.labels(*where).set(1)
        self.missed.append(f"{provider}/{name}/{report}: endpoint refused (HTTP {exc.status})")
        log.error(
            "collect_endpoint_refused",
            provider=provider,
            account=name,
            report=report,
            status=exc.status,
            error=str(exc),
            retry_in=self.settings.collect_auth_retry_interval,
        )

    def _refuse_account(self, provider: str, name: str, fingerprint: str, exc: ProviderAuthFailed) -> None:
        self.refusals.refuse((provider, name), fingerprint, time.monotonic())
        metrics.COLLECT_AUTH_FAILURES.labels(provider=provider, account=name).inc()
        metrics.COLLECT_ACCOUNT_REFUSED.labels(provider=provider, account=name).set(1)
        self.missed.append(f"{provider}/{name}: admin key refused")
        log.error(
            "collect_auth_failed",
            provider=provider,
            account=name,
            error=str(exc),
            retry_in=self.settings.collect_auth_retry_interval,
        )

    async def _freshness(self, poller: PollerConnection) -> None:
        """Seconds since the last success per account and report, and readiness, from the stored state.

        Every endpoint of every active account counts, also one that has never succeeded: its clock starts when
        its account got its current key (``keys add``, or ``keys rotate``), and that time is reported as its last
        success, so it turns stale (readiness, ``CostCollectorStale``) ``collect_stale_after`` later."""
        now = time.time()
        stale = []
        keys_set: dict[UUID, tuple[str, str, datetime]] = {}
        polled_now: set[tuple[str, str, str]] = set()
        state: dict[tuple[UUID, str], asyncpg.Record] = {}
        for row in await poller.all_state():
            keys_set[row["account_id"]] = (row["provider"], row["ai_organization_id"], row["key_set_at"])
            if row["report"] is not None:
                state[(row["account_id"], row["report"])] = row
        for account_id, (provider, name, key_set_at) in keys_set.items():
            for endpoint in ENDPOINTS[provider]:  # type: ignore[index]
                labels = {"provider": provider, "account": name, "report": endpoint.report}
                polled = state.get((account_id, endpoint.report))
                if polled is None:
                    success = key_set_at.timestamp()  # never succeeded: counted from the key
                else:
                    success = polled["last_success_at"].timestamp()
                    metrics.COLLECT_DATA_FRESHNESS.labels(**labels).set(polled["collected_through"].timestamp())
                metrics.COLLECT_LAST_SUCCESS.labels(**labels).set(success)
                metrics.COLLECT_SINCE_SUCCESS.labels(**labels).set(now - success)
                if now - success > self.settings.collect_stale_after:
                    stale.append(f"{provider}/{name}/{endpoint.report}")
                polled_now.add((provider, name, endpoint.report))
        self.health.stale = stale
        # An account no longer polled (deactivated) leaves the series: frozen at its last values, its timestamp
        # would age past CostCollectorStale's 2 h and fire for ever for an account nobody polls.
        for gauge in (metrics.COLLECT_LAST_SUCCESS, metrics.COLLECT_SINCE_SUCCESS, metrics.COLLECT_DATA_FRESHNESS):
            for family in gauge.collect():
                for sample in family.samples:
                    series = (sample.labels["provider"], sample.labels["account"], sample.labels["report"])
                    if series not in polled_now:
                        with contextlib.suppress(KeyError):
                            gauge.remove(*series)
        # So is a refused one, and its refusal is forgotten (reactivated, it is tried at once).
        active = {(provider, name) for provider, name, _ in keys_set.values()}
        for account in self.refusals.forget_all_but(active):
            with contextlib.suppress(KeyError):
                metrics.COLLECT_ACCOUNT_REFUSED.remove(*account)
        for where in self.endpoint_refusals.forget_all_but(active):
            with contextlib.suppress(KeyError):
                metrics.COLLECT_ENDPOINT_REFUSED.remove(*where)

    # --- helpers ------------------------------------------------------------------------------------------

    def _admin_key(self, account: Account) -> keystore.AdminKey:
        if account.secret_file is not None:
            return keystore.read_secret_file(Path(account.secret_file), account.provider, account.organization_id)
        if self._keys is None:
            self._keys = keystore.Keyring.load(
                self.settings.collect_key_encryption_key_file, self.settings.collect_previous_key_encryption_key_file
            )
        assert account.ciphertext is not None
        assert account.wrapped_key is not None
        assert account.kek_id is not None
        sealed = keystore.Sealed(account.ciphertext, account.wrapped_key, account.kek_id)
        return keystore.unseal(self._keys, account.provider, account.organization_id, sealed)

    def _base_url(self, provider: str) -> str:
        if provider == "openai":
            return self.settings.collect_openai_base_url
        return self.settings.collect_anthropic_base_url

    @staticmethod
    def _polled(endpoint: Endpoint, result: str) -> None:
        metrics.COLLECT_POLLS.labels(provider=endpoint.provider, report=endpoint.report, result=result).inc()


def run(settings: Settings, *, once: bool = False) -> int:
    """Entry point of ``cost-worker collect``."""
    logs.configure(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())

    async def main() -> int:
        collector = Collector(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stopper(collector))
        code = EXIT_FAILURE
        try:
            code = await collector.run(once=once)
            if code == EXIT_INCOMPLETE:
                shown = collector.missed[:MAX_MISSED_SHOWN]
                more = len(collector.missed) - len(shown)
                print(
                    "cost-worker: error: the poll did not collect everything: "
                    + "; ".join(shown)
                    + (f"; and {more} more (log line collect_round_incomplete)" if more > 0 else ""),
                    file=sys.stderr,
                    flush=True,
                )
            if code == EXIT_FAILURE and collector.failure is not None:
                print(f"cost-worker: error: {collector.failure}", file=sys.stderr, flush=True)
            return code
        finally:
            exit_after(EXIT_DEADLINE, code)  # the hard deadline, as for `run`

    return run_loop(main())  # the worker's event-loop choice (uvloop where available)


def _stopper(collector: Collector) -> Callable[[], None]:
    def stop() -> None:
        log.info("shutdown_requested")
        collector.health.stopping = True
        collector.stop.set()

    return stop
