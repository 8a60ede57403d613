"""Notify against real servers: the embedded PostgreSQL and broker, and local HTTP receivers (aiohttp on
127.0.0.1) that verify every signature with the ``standardwebhooks`` library."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientSession, web
from prometheus_client import REGISTRY
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.factories import Org, dumps, make_org
from tests.kafka_helpers import create_topics, produce, run_worker, worker_env
from tests.test_budgets import add_budget, spend_event
from worker import logs
from worker.config import Settings
from worker.errors import CostWorkerError, UsageError
from worker.notify import admin
from worker.notify.messages import RESOLVED, TRIGGERED
from worker.notify.sealing import Sealer
from worker.notify.sender import Sender
from worker.notify.service import NotifyService
from worker.notify.store import NewDelivery, NotifyStore, destinations_for, insert_deliveries
from worker.notify.urls import UrlPolicy, UrlRefused
from worker.store import Database

KEY = base64.b64encode(os.urandom(32)).decode()
CLAIM_SLACK = 0.25  # seconds a claim may take beyond the poll interval on a loaded 2-core CI machine


@dataclass
class Receiver:
    """One local HTTP endpoint; ``behave`` decides each answer. Records every request it gets."""

    behave: Callable[[Receiver, web.Request, bytes], Awaitable[web.StreamResponse]]
    secret: str | None = None
    requests: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    verified: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((time.monotonic(), dict(request.headers), body))
        if self.secret is not None:
            # Raises (-> 500, and the test fails on the count) unless the signature is valid.
            self.verified.append(Webhook(self.secret).verify(body, dict(request.headers)))
        return await self.behave(self, request, body)

    @property
    def ids(self) -> list[str]:
        return [headers["webhook-id"] for _, headers, _ in self.requests]


async def ok(receiver: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
    return web.Response(status=204)


async def flaky(receiver: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
    if len(receiver.requests) <= 2:  # fails twice, then recovers
        return web.Response(status=503, text="down for maintenance " + "x" * 5000)
    return web.Response(status=200)


async def hangs(receiver: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
    await asyncio.sleep(30)
    return web.Response(status=200)


async def gone(receiver: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
    return web.Response(status=410, text="this hook was deleted")


async def slack_like(receiver: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
    message = json.loads(body)
    if not isinstance(message.get("text"), str) or not isinstance(message.get("blocks"), list):
        return web.Response(status=400, text="invalid_payload")
    return web.Response(status=200, text="ok")


# A receiver that hangs (`hangs`) would hold the test's teardown for aiohttp's default 60 s shutdown timeout.
RECEIVER_SHUTDOWN_SECONDS = 1.0


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def start(behave: Any, secret: str | None = None) -> Receiver:
        receiver = Receiver(behave, secret)
        app = web.Application()
        app.router.add_post("/hook/{token}", receiver.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=RECEIVER_SHUTDOWN_SECONDS)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        receiver.url = f"http://127.0.0.1:{port}/hook/t0ken-{uuid.uuid4().hex}"
        runners.append(runner)
        return receiver

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def notify_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "notify_secrets_key": SecretStr(KEY),
            "notify_allow_http": True,  # the receivers speak plain HTTP on loopback
            "notify_allowed_networks": "127.0.0.0/8",
            "notify_timeout": 1.0,
            "notify_backoff_initial": 0.2,
            "notify_backoff_max": 0.4,
            "notify_max_age": 60.0,
            "notify_poll_interval": 0.1,
        }
    )


async def add(
    settings: Settings, capsys: pytest.CaptureFixture[str], org: Org, url: str, *, kind: str = "webhook", **filters: Any
) -> tuple[uuid.UUID, str | None]:
    """``notify destinations add``; returns the destination id and the secret printed once."""
    capsys.readouterr()
    await admin.add(
        settings,
        organization=str(org.id),
        name=filters.pop("name", f"dest-{uuid.uuid4().hex[:6]}"),
        kind=kind,
        url=url,
        scopes=filters.pop("scopes", []),
        min_threshold=filters.pop("min_threshold", "0"),
        include_resolved=filters.pop("include_resolved", True),
    )
    out = capsys.readouterr().out
    ident = uuid.UUID(out.split("destination ", 1)[1].split()[0])
    secret = out.split("): ", 1)[1].strip() if "signing secret" in out else None
    assert url not in out  # the URL (its token) is not echoed
    return ident, secret


def alert_message(org: Org, *, threshold: str = "80", kind: str = TRIGGERED, alert_id: str | None = None) -> bytes:
    body: dict[str, Any] = {
        "type": kind,
        "alert_id": alert_id or str(uuid.uuid4()),
        "scope": "organization",
        "organization_id": str(org.id),
        "project_id": None,
        "user_id": None,
        "budget_id": str(uuid.uuid4()),
        "budget_name": "Team budget",
        "period": "monthly",
        "timezone": "UTC",
        "period_start": "2026-11-01T00:00:00+00:00",
        "period_end": "2026-12-01T00:00:00+00:00",
        "threshold_percent": threshold,
        "spend": "81.00",
        "amount": "100",
        "currency": "USD",
        "percent_used": "81.00",
        "raised_at": "2026-11-21T10:00:00+00:00",
    }
    if kind == RESOLVED:
        body["resolved_at"] = "2026-11-22T10:00:00+00:00"
    return dumps(body)


async def run_notify(
    settings: Settings,
    until: Callable[[], Awaitable[bool]],
    timeout: float = 40.0,
    *,
    probes: dict[str, str] | None = None,
) -> float:
    """Run ``notify run`` in this process until ``until()`` holds; returns the seconds it took. With
    ``probes``, also fetches /readyz and /metrics into it before stopping."""
    service = NotifyService(settings)
    task = asyncio.create_task(service.run())
    started = time.monotonic()
    try:
        while not await until():
            assert not task.done(), task.exception() if task.done() else ""
            assert time.monotonic() - started < timeout, "condition not reached in time"
            await asyncio.sleep(0.05)
        if probes is not None:
            assert service.http is not None
            async with ClientSession() as client:
                for path in ("/readyz", "/healthz", "/metrics"):
                    async with client.get(f"http://127.0.0.1:{service.http.port}{path}") as response:
                        probes[path] = f"{response.status} {await response.text()}"
        return time.monotonic() - started
    finally:
        service.stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def deliveries(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT d.webhook_id, d.status, d.attempts, d.last_status, d.last_error, t.name, t.enabled "
        "FROM notify_deliveries d JOIN notify_destinations t ON t.id = d.destination_id ORDER BY t.name, d.id"
    )


async def test_signed_retried_isolated_and_disabled_deliveries(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = notify_settings
    await create_topics(settings)
    org, other = await make_org(db), await make_org(db)
    good, flaky_r, hang_r, gone_r, slack_r = (
        await serve(ok),
        await serve(flaky),
        await serve(hangs),
        await serve(gone),
        await serve(slack_like),
    )
    for receiver, name in ((good, "a-good"), (flaky_r, "b-flaky"), (hang_r, "c-hang"), (gone_r, "d-gone")):
        _, receiver.secret = await add(settings, capsys, org, receiver.url, name=name)
        assert receiver.secret is not None
    await add(settings, capsys, org, slack_r.url, kind="slack", name="e-slack")
    picky = await serve(ok)
    _, picky.secret = await add(
        settings, capsys, org, picky.url, name="f-picky", min_threshold="90", include_resolved=False
    )
    stranger = await serve(ok)  # another organization's destination sees none of these alerts
    _, stranger.secret = await add(settings, capsys, other, stranger.url, name="g-other")

    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    sent = [
        b"[" * 60_000,  # nested deeper than the JSON decoder goes: invalid, skipped, not a crash loop
        alert_message(org, alert_id="abc\r\nX-Injected: 1"),  # not a uuid (a header injection): invalid
        alert_message(org, alert_id=first),
        alert_message(org, alert_id=first),  # the outbox publishes at least once: a duplicate
        alert_message(org, alert_id=second, threshold="100"),
        alert_message(org, alert_id=first, kind=RESOLVED),
        b"{not an alert",
    ]
    await produce(settings, settings.topic_budget_alerts, sent)
    start = time.monotonic()

    async def settled() -> bool:
        rows = await deliveries(db)
        done = [r for r in rows if r["name"] not in ("c-hang",)]
        timed_out = any("timeout" in (r["last_error"] or "") for r in rows if r["name"] == "c-hang")
        return len(rows) == 16 and all(r["status"] != "pending" for r in done) and timed_out

    await run_notify(settings, settled)

    expected_ids = {first, second, f"{first}:resolved"}
    # The good receiver: each alert once, signed (verified on arrival), before the hanging one timed out.
    assert sorted(good.ids) == sorted(expected_ids)
    assert len(good.verified) == 3
    assert {v["alert_id"] for v in good.verified} == {first, second}
    assert max(t for t, _, _ in good.requests) - start < settings.notify_timeout + 5
    first_hang = min(t for t, _, _ in hang_r.requests)
    assert min(t for t, _, _ in good.requests) < first_hang + settings.notify_timeout
    # Failing, then recovering: retried with the same webhook-id until it answered 2xx.
    assert len(flaky_r.requests) >= 3
    assert set(flaky_r.ids) == expected_ids
    assert len(flaky_r.verified) == len(flaky_r.requests)
    # 410 Gone: the destination is disabled at the first answer; only attempts already in flight were sent.
    assert 1 <= len(gone_r.requests) <= settings.notify_per_destination < 3
    assert len(set(gone_r.ids)) == len(gone_r.ids)  # nothing retried
    # The filters: thresholds >= 90 only, no resolved messages; another organization gets nothing.
    assert picky.ids == [second]
    assert stranger.requests == []
    # Slack gets a readable message, not the raw alert.
    assert len(slack_r.requests) == 3
    texts = [json.loads(body)["text"] for _, _, body in slack_r.requests]
    assert any("Team budget" in t and "81.00 / 100.00 USD" in t for t in texts)
    assert any("back below" in t for t in texts)

    rows = await deliveries(db)
    by_name: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    assert [r["status"] for r in by_name["a-good"]] == ["delivered"] * 3
    assert [r["status"] for r in by_name["b-flaky"]] == ["delivered"] * 3
    assert all(len(r["last_error"] or "") <= 500 for r in rows)  # a 5 kB error page is kept as an excerpt
    assert {r["status"] for r in by_name["d-gone"]} == {"failed"}
    assert not by_name["d-gone"][0]["enabled"]
    assert {r["status"] for r in by_name["c-hang"]} == {"pending"}  # still retrying, within its maximum age
    assert any("timeout after 1s" in (r["last_error"] or "") for r in by_name["c-hang"])
    assert len(by_name["f-picky"]) == 1

    # A replay of the whole topic (offsets reset) creates nothing new and sends nothing again.
    before = len(good.requests)
    await db.execute("DELETE FROM consumer_offsets WHERE group_id = $1", settings.notify_group_id)
    await db.execute("UPDATE notify_destinations SET enabled = false WHERE name = 'c-hang'")

    async def replayed() -> bool:
        return bool(
            await db.fetchval("SELECT count(*) FROM consumer_offsets WHERE group_id = $1", settings.notify_group_id)
        )

    await run_notify(settings, replayed)
    await asyncio.sleep(0.5)
    assert len(await deliveries(db)) == 16
    assert len(good.requests) == before


async def test_sigkill_between_send_and_commit_resends_the_same_id_recorded_once(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = notify_settings
    await create_topics(settings)
    org = await make_org(db)
    receiver = await serve(ok)
    _, receiver.secret = await add(settings, capsys, org, receiver.url)
    alert_id = str(uuid.uuid4())
    await produce(settings, settings.topic_budget_alerts, [alert_message(org, alert_id=alert_id)])

    log = tmp_path / "notify.log"
    process = _spawn_notify(settings, log, COST_WORKER_FAULT_POINTS="notify_after_send")
    code = await asyncio.to_thread(process.wait, 60)
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    assert receiver.ids == [alert_id]  # sent...
    row = await db.fetchrow("SELECT status, attempts FROM notify_deliveries")
    assert row is not None
    assert (row["status"], row["attempts"]) == ("pending", 1)  # ...but not recorded

    async def delivered() -> bool:
        return bool(await db.fetchval("SELECT status FROM notify_deliveries") == "delivered")

    await run_notify(settings, delivered)
    assert receiver.ids == [alert_id, alert_id]  # at least once on the wire, with the same webhook-id
    assert len(receiver.verified) == 2
    assert await db.fetchval("SELECT count(*) FROM notify_deliveries") == 1  # once in effect
    logged = log.read_text()
    assert "whsec_" not in logged  # the signing secret is never logged...
    assert "t0ken" not in logged  # ...nor the URL's token
    assert KEY not in logged


def _spawn_notify(settings: Settings, log: Path, **extra: str) -> Any:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "notify", "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env(
                settings,
                COST_WORKER_NOTIFY_SECRETS_KEY=KEY,
                COST_WORKER_NOTIFY_ALLOW_HTTP="true",
                COST_WORKER_NOTIFY_ALLOWED_NETWORKS="127.0.0.0/8",
                **extra,
            ),
        )


async def test_private_addresses_are_refused_when_added_and_when_sent(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    strict = notify_settings.model_copy(update={"notify_allowed_networks": ""})
    await create_topics(strict)
    org = await make_org(db)
    receiver = await serve(ok)
    name_url = receiver.url.replace("127.0.0.1", "localhost")  # a name that resolves to loopback
    for url in (receiver.url, name_url, "https://10.1.2.3/hook", "https://169.254.169.254/latest"):
        with pytest.raises(UrlRefused):
            await add(strict, capsys, org, url)
    assert await db.fetchval("SELECT count(*) FROM notify_destinations") == 0

    # Added while loopback was allowed (or written behind the command's back); the sender checks again.
    await add(notify_settings, capsys, org, name_url)
    await produce(strict, strict.topic_budget_alerts, [alert_message(org)])

    async def failed() -> bool:
        return bool(await db.fetchval("SELECT status FROM notify_deliveries") == "failed")

    await run_notify(strict, failed)
    assert receiver.requests == []
    error = await db.fetchval("SELECT last_error FROM notify_deliveries")
    assert error.startswith("refused:")
    assert "not public" in error
    assert "t0ken" not in error


async def test_operator_commands(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = notify_settings
    org = await make_org(db)
    receiver = await serve(ok)
    ident, receiver.secret = await add(settings, capsys, org, receiver.url, name="ops", scopes=["project"])
    stored = await db.fetchrow("SELECT url_sealed, secret_sealed, url_origin FROM notify_destinations")
    assert stored is not None
    assert receiver.url.encode() not in stored["url_sealed"]
    assert receiver.secret is not None
    assert receiver.secret.encode() not in stored["secret_sealed"]
    assert Sealer.from_settings(settings).open(stored["secret_sealed"], ident) == receiver.secret
    assert stored["url_origin"].startswith("http://127.0.0.1:")

    await admin.list_(settings, organization=str(org.id))
    listing = capsys.readouterr().out
    assert "ops" in listing
    assert "project" in listing
    assert "t0ken" not in listing
    assert "whsec_" not in listing

    await admin.test(settings, organization=str(org.id), destination=str(ident))
    assert "delivered: HTTP 204" in capsys.readouterr().out
    assert len(receiver.verified) == 1
    assert receiver.verified[0]["test"] is True

    with pytest.raises(Exception, match="already has a destination named"):
        await add(settings, capsys, org, receiver.url, name="ops")

    await admin.status(settings, organization=str(org.id))
    assert "ops" in capsys.readouterr().out

    await admin.remove(settings, organization=str(org.id), destination=str(ident))
    assert await db.fetchval("SELECT count(*) FROM notify_destinations") == 0
    stranger = await make_org(db)
    with pytest.raises(Exception, match="has no destination"):
        await admin.remove(settings, organization=str(stranger.id), destination=str(ident))


async def test_status_without_organization_lists_every_destination(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # README: `notify status [--organization ID]` shows deliveries per destination. Without the flag it listed only
    # the organizations that already had a delivery: a destination just added (or never matched) was missing from
    # the table, though `notify status --organization ORG` showed it.
    org = await make_org(db)
    receiver = await serve(ok)
    await add(notify_settings, capsys, org, receiver.url, name="fresh-destination")
    await admin.status(notify_settings, organization=None)
    assert "fresh-destination" in capsys.readouterr().out


async def test_a_budget_crossing_in_the_worker_arrives_signed_once(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = notify_settings
    await create_topics(settings)
    org = await make_org(db)
    budget = await add_budget(db, "organization", org, "10", thresholds=(80,))
    receiver = await serve(ok)
    _, receiver.secret = await add(settings, capsys, org, receiver.url)
    await produce(settings, settings.topic_api_usage, [dumps(spend_event(org, "9", event_id="cross"))])
    assert await run_worker(settings) == 0  # ledger, budget crossing, outbox -> alerts topic
    alert_id = str(await db.fetchval("SELECT id FROM budget_alerts"))

    async def delivered() -> bool:
        return bool(await db.fetchval("SELECT status FROM notify_deliveries") == "delivered")

    probes: dict[str, str] = {}
    delivered_series = 'cost_worker_notify_attempts_total{kind="webhook",outcome="delivered"}'
    before = REGISTRY.get_sample_value("cost_worker_notify_attempts_total", {"kind": "webhook", "outcome": "delivered"})
    await run_notify(settings, delivered, probes=probes)
    assert probes["/readyz"].startswith("200 ok")
    assert probes["/healthz"].startswith("200")
    exported = dict(line.rsplit(" ", 1) for line in probes["/metrics"].splitlines() if line.startswith("cost_worker_"))
    assert float(exported[delivered_series]) == (before or 0) + 1  # the metrics are this process's, cumulative
    assert "cost_worker_notify_backlog_deliveries" in exported
    assert receiver.ids == [alert_id]
    body = receiver.verified[0]
    assert body["budget_id"] == str(budget)
    assert Decimal(body["threshold_percent"]) == Decimal(80)
    assert Decimal(body["spend"]) == Decimal(9)
    assert body.get("type", TRIGGERED) == TRIGGERED

    # The worker publishing the alert again (at least once) changes nothing for the receiver.
    await produce(settings, settings.topic_budget_alerts, [receiver.requests[0][2]], keys=[str(budget).encode()])

    async def consumed() -> bool:
        return bool(
            await db.fetchval(
                "SELECT sum(next_offset) = 2 FROM consumer_offsets WHERE group_id = $1", settings.notify_group_id
            )
        )

    await run_notify(settings, consumed)
    await asyncio.sleep(0.3)
    assert receiver.ids == [alert_id]
    assert await db.fetchval("SELECT count(*) FROM notify_deliveries") == 1


async def test_sigterm_lets_the_attempt_in_flight_finish_and_record(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = notify_settings
    await create_topics(settings)
    org = await make_org(db)
    arrived = asyncio.Event()

    async def slow(receiver: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(1.5)
        return web.Response(status=200)

    receiver = await serve(slow)
    _, receiver.secret = await add(settings, capsys, org, receiver.url)
    await produce(settings, settings.topic_budget_alerts, [alert_message(org)])
    log = tmp_path / "notify.log"
    process = _spawn_notify(settings, log, COST_WORKER_NOTIFY_TIMEOUT="5")
    try:
        await asyncio.wait_for(arrived.wait(), 60)
        process.send_signal(signal.SIGTERM)  # mid-attempt: the receiver answers in 1.5 s
        code = await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0, log.read_text()[-3000:]
    assert len(receiver.requests) == 1
    assert await db.fetchval("SELECT status FROM notify_deliveries") == "delivered"


async def test_a_receiver_that_never_recovers_is_given_up_at_the_maximum_age(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = notify_settings.model_copy(update={"notify_max_age": 2.0})
    await create_topics(settings)
    org = await make_org(db)

    async def broken(receiver: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=500, text="internal error")

    receiver = await serve(broken)
    _, receiver.secret = await add(settings, capsys, org, receiver.url)
    alert_id = str(uuid.uuid4())
    await produce(settings, settings.topic_budget_alerts, [alert_message(org, alert_id=alert_id)])

    async def given_up() -> bool:
        return bool(await db.fetchval("SELECT status FROM notify_deliveries") == "failed")

    await run_notify(settings, given_up)
    row = await db.fetchrow(
        "SELECT attempts, last_status, last_error, created_at, last_attempt_at FROM notify_deliveries"
    )
    assert row is not None
    assert row["attempts"] == len(receiver.requests) >= 3  # retried (backoff 0.2-0.4 s) until the age ran out
    assert set(receiver.ids) == {alert_id}
    assert row["last_status"] == 500
    assert row["last_error"] == "gave up: HTTP 500: internal error"
    # The last attempt was scheduled within the maximum age; the claim that starts it (and stamps
    # last_attempt_at) runs when the dispatcher next wakes, up to one poll interval later, plus the claim's own
    # time on a loaded machine.
    age = (row["last_attempt_at"] - row["created_at"]).total_seconds()
    assert age <= settings.notify_max_age + settings.notify_poll_interval + CLAIM_SLACK


async def test_an_error_text_never_carries_the_url_token() -> None:
    """aiohttp reports a malformed answer with the URL as it normalised it (%7E as ~), not as configured: the
    token in the URL's path or query is still not in the error text that becomes last_error and the logs."""

    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: not-a-number\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(malformed, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    token = uuid.uuid4().hex
    settings = Settings(notify_allow_http=True, notify_allowed_networks="127.0.0.0/8")
    sender = Sender(settings, UrlPolicy.from_settings(settings))
    payload = json.dumps({"type": TRIGGERED, "scope": "organization", "budget_name": "b"})
    try:
        for url in (
            f"http://127.0.0.1:{port}/services/T0/B0/x%7E{token}",
            f"http://127.0.0.1:{port}/hook?token=x%7E{token}",
        ):
            attempt = await sender.send("slack", url, None, str(uuid.uuid4()), payload)
            assert attempt.status is None
            assert attempt.error.startswith("ClientResponseError: 400"), attempt.error
            assert token not in attempt.error
            assert "/services" not in attempt.error
            assert "token=" not in attempt.error
    finally:
        await sender.close()
        server.close()
        await server.wait_closed()


async def test_a_wrong_secrets_key_keeps_deliveries_pending_until_the_key_is_fixed(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key that does not open the destinations' sealed values is the operator's error, not the alert's:
    logged at error level and counted, the delivery stays pending, and it goes out once the key is fixed."""
    right = notify_settings
    wrong = right.model_copy(update={"notify_secrets_key": SecretStr(base64.b64encode(os.urandom(32)).decode())})
    await create_topics(right)
    org = await make_org(db)
    receiver = await serve(ok)
    _, receiver.secret = await add(right, capsys, org, receiver.url)
    alert_id = str(uuid.uuid4())
    await produce(right, right.topic_budget_alerts, [alert_message(org, alert_id=alert_id)])
    sample = ("cost_worker_notify_attempts_total", {"kind": "webhook", "outcome": "key_mismatch"})
    before = REGISTRY.get_sample_value(*sample) or 0
    buffer = io.StringIO()
    logs.configure(level="INFO", fmt="json", secrets=wrong.secrets(), stream=buffer)

    async def retried() -> bool:
        return bool(await db.fetchval("SELECT attempts >= 3 OR status <> 'pending' FROM notify_deliveries"))

    await run_notify(wrong, retried)  # deployed with the wrong key
    row = await db.fetchrow("SELECT status, last_status, last_error FROM notify_deliveries")
    assert row is not None
    assert row["status"] == "pending"
    assert row["last_status"] is None
    assert row["last_error"].startswith("COST_WORKER_NOTIFY_SECRETS_KEY does not open this destination")
    assert receiver.requests == []
    assert (REGISTRY.get_sample_value(*sample) or 0) >= before + 3
    lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]
    mismatches = [line for line in lines if line.get("event") == "notify_secrets_key_mismatch"]
    assert mismatches
    assert {line["level"] for line in mismatches} == {"error"}

    async def delivered() -> bool:
        return bool(await db.fetchval("SELECT status FROM notify_deliveries") == "delivered")

    await run_notify(right, delivered)  # the key is fixed: the same delivery goes out, signed
    assert receiver.ids == [alert_id]
    assert len(receiver.verified) == 1


async def test_the_secrets_key_rotates_with_notify_reseal(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The secrets key rotates without re-adding a destination (its URL and signing secret stay): the new key
    current, the old one previous, `notify reseal`; then the old one can go. A destination sealed under a key the
    operator no longer has is named (exit 1) and every other one is still sealed again."""
    old = notify_settings
    new_key = base64.b64encode(os.urandom(32)).decode()
    rotating = old.model_copy(
        update={"notify_secrets_key": SecretStr(new_key), "notify_previous_secrets_key": old.notify_secrets_key}
    )
    rotated = old.model_copy(update={"notify_secrets_key": SecretStr(new_key)})
    await create_topics(old)
    org, other = await make_org(db), await make_org(db)
    receiver = await serve(ok)
    hook, receiver.secret = await add(old, capsys, org, receiver.url)
    slack, _ = await add(old, capsys, other, receiver.url + "-slack", kind="slack")
    before = {r["id"]: r for r in await db.fetch("SELECT id, url_sealed, secret_sealed FROM notify_destinations")}
    first, second = str(uuid.uuid4()), str(uuid.uuid4())

    async def delivered(alert_id: str) -> bool:
        return bool(
            await db.fetchval("SELECT status = 'delivered' FROM notify_deliveries WHERE webhook_id = $1", alert_id)
        )

    # Mid-rotation, before the reseal: what the old key sealed opens with the previous one.
    await produce(old, old.topic_budget_alerts, [alert_message(org, alert_id=first)])
    await run_notify(rotating, lambda: delivered(first))
    capsys.readouterr()
    assert await admin.reseal(rotating) == 0
    assert "resealed 2 destination(s)" in capsys.readouterr().out
    after = {r["id"]: r for r in await db.fetch("SELECT id, url_sealed, secret_sealed FROM notify_destinations")}
    fresh = Sealer.from_settings(rotated)
    for ident, row in before.items():
        assert after[ident]["url_sealed"] != row["url_sealed"]
        assert fresh.open(after[ident]["url_sealed"], ident) == Sealer.from_settings(old).open(row["url_sealed"], ident)
    assert fresh.open(after[hook]["secret_sealed"], hook) == receiver.secret
    assert after[slack]["secret_sealed"] is None
    assert await admin.reseal(rotating) == 0
    assert "resealed 0 destination(s)" in capsys.readouterr().out
    # The old key gone: the same destination, the same signing secret (the receiver verifies it).
    await produce(old, old.topic_budget_alerts, [alert_message(org, alert_id=second)])
    await run_notify(rotated, lambda: delivered(second))
    assert receiver.ids == [first, second]
    assert len(receiver.verified) == 2
    # Sealed under a key nobody has any more: named, left alone; the others are sealed again.
    lost = Sealer(os.urandom(32)).seal(receiver.url, hook)
    await db.execute("UPDATE notify_destinations SET url_sealed = $2 WHERE id = $1", hook, lost)
    newest = rotated.model_copy(
        update={
            "notify_secrets_key": SecretStr(base64.b64encode(os.urandom(32)).decode()),
            "notify_previous_secrets_key": SecretStr(new_key),
        }
    )
    with pytest.raises(CostWorkerError, match=f"1 destination\\(s\\) left as they were: .*{hook}"):
        await admin.reseal(newest)
    assert "resealed 1 destination(s)" in capsys.readouterr().out
    assert await db.fetchval("SELECT url_sealed FROM notify_destinations WHERE id = $1", hook) == lost


async def test_a_rotated_signing_secret_signs_beside_the_new_one_until_its_overlap_ends(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`destinations rotate-secret`: the new secret is printed once; until the overlap ends every delivery carries
    both signatures (a receiver still on the old secret and one already on the new accept it), then the new one
    only. A reseal carries the old secret over too. A Slack destination has no secret to rotate."""
    settings = notify_settings
    await create_topics(settings)
    org = await make_org(db)
    receiver = await serve(ok)
    hook, old_secret = await add(settings, capsys, org, receiver.url)
    assert old_secret is not None
    slack, _ = await add(settings, capsys, org, (await serve(ok)).url, kind="slack")
    assert await admin.rotate_secret(settings, organization=str(org.id), destination=str(hook), overlap="3600") == 0
    out = capsys.readouterr().out
    new_secret = out.split("(shown once; verify with any Standard Webhooks library): ", 1)[1].strip()
    assert new_secret.startswith("whsec_")
    assert new_secret != old_secret
    assert old_secret not in out
    until = await db.fetchval("SELECT previous_secret_until - now() FROM notify_destinations WHERE id = $1", hook)
    assert 3590 < until.total_seconds() <= 3600

    async def delivered(alert_id: str) -> bool:
        return bool(
            await db.fetchval(  # both destinations' (the webhook's and the Slack one's)
                "SELECT count(*) = 2 AND bool_and(status = 'delivered') FROM notify_deliveries WHERE webhook_id = $1",
                alert_id,
            )
        )

    def verifies(secret: str, n: int) -> bool:
        _, headers, body = receiver.requests[n]
        try:
            Webhook(secret).verify(body, headers)
        except WebhookVerificationError:
            return False
        return True

    during, after = str(uuid.uuid4()), str(uuid.uuid4())
    await produce(settings, settings.topic_budget_alerts, [alert_message(org, alert_id=during)])
    await run_notify(settings, lambda: delivered(during))
    assert receiver.requests[0][1]["webhook-signature"].count("v1,") == 2
    assert verifies(old_secret, 0)
    assert verifies(new_secret, 0)
    # A secrets-key rotation meanwhile reseals the old signing secret as well: it still signs under the new key.
    rotating = settings.model_copy(
        update={
            "notify_secrets_key": SecretStr(base64.b64encode(os.urandom(32)).decode()),
            "notify_previous_secrets_key": settings.notify_secrets_key,
        }
    )
    assert await admin.reseal(rotating) == 0
    rotated = rotating.model_copy(update={"notify_previous_secrets_key": None})
    previous = await db.fetchval("SELECT previous_secret_sealed FROM notify_destinations WHERE id = $1", hook)
    assert Sealer.from_settings(rotated).open(previous, hook) == old_secret
    # The overlap over: the new secret alone.
    await db.execute(
        "UPDATE notify_destinations SET previous_secret_until = now() - interval '1 second' WHERE id = $1", hook
    )
    await produce(settings, settings.topic_budget_alerts, [alert_message(org, alert_id=after)])
    await run_notify(rotated, lambda: delivered(after))
    assert receiver.ids == [during, after]
    assert receiver.requests[1][1]["webhook-signature"].count("v1,") == 1
    assert verifies(new_secret, 1)
    assert not verifies(old_secret, 1)
    # `destinations test` during an overlap signs with the new secret only: it tells whether the receiver switched.
    await db.execute(
        "UPDATE notify_destinations SET previous_secret_until = now() + interval '1 hour' WHERE id = $1", hook
    )
    assert await admin.test(rotated, organization=str(org.id), destination=str(hook)) == 0
    assert receiver.requests[2][1]["webhook-signature"].count("v1,") == 1
    assert verifies(new_secret, 2)
    with pytest.raises(CostWorkerError, match="no webhook destination"):
        await admin.rotate_secret(rotated, organization=str(org.id), destination=str(slack), overlap="60")
    with pytest.raises(UsageError, match="--overlap: seconds from 0 to 2592000"):
        await admin.rotate_secret(rotated, organization=str(org.id), destination=str(hook), overlap="nan")


async def _pending(
    db: asyncpg.Connection, org: Org, destination: uuid.UUID, webhook_id: str, kind: str, *, due_in: float = 0.0
) -> None:
    """A delivery row as the consumer writes it, due ``due_in`` seconds from now."""
    alert_id = webhook_id.removesuffix(":resolved")
    await db.execute(
        "INSERT INTO notify_deliveries (organization_id, destination_id, webhook_id, event_type, payload, "
        "next_attempt_at) VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))",
        org.id,
        destination,
        webhook_id,
        kind,
        alert_message(org, kind=kind, alert_id=alert_id).decode(),
        due_in,
    )


async def test_a_resolved_alert_is_not_sent_before_its_triggered_alert(
    db: asyncpg.Connection, database: Database, notify_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A receiver that opens an incident on ``triggered`` and closes it on ``resolved`` must not get them the
    other way round: a resolved delivery waits while its triggered delivery to the same destination is pending
    (in its backoff, or in flight), and goes once that one is delivered or given up."""
    org = await make_org(db)
    destination, _ = await add(notify_settings, capsys, org, "http://127.0.0.1:9/hook/t0ken-order")
    other, _ = await add(notify_settings, capsys, org, "http://127.0.0.1:9/hook/t0ken-other")
    store = NotifyStore(database)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    await _pending(db, org, destination, first, TRIGGERED, due_in=30)  # failed once: backing off
    await _pending(db, org, destination, f"{first}:resolved", RESOLVED)  # consumed since: due now
    await _pending(db, org, destination, second, TRIGGERED)
    await _pending(db, org, destination, f"{second}:resolved", RESOLVED)  # both due: the triggered goes first
    await _pending(db, org, other, f"{first}:resolved", RESOLVED)  # no triggered row for it here: goes now

    claimed = await store.claim([], 8, 16, 5.0)
    assert sorted((c.destination_id == destination, c.webhook_id) for c in claimed) == sorted(
        [(True, second), (False, f"{first}:resolved")]
    )
    second_claim = next(c for c in claimed if c.webhook_id == second)
    assert await store.delivered(second_claim, 204)
    await db.execute("UPDATE notify_deliveries SET next_attempt_at = now() WHERE webhook_id = $1", first)
    claimed = await store.claim([], 8, 16, 5.0)
    assert sorted(c.webhook_id for c in claimed) == sorted([first, f"{second}:resolved"])
    first_claim = next(c for c in claimed if c.webhook_id == first)
    assert await store.failed(first_claim, 503, "gave up")  # given up: the resolved is still worth sending
    await db.execute(
        "UPDATE notify_deliveries SET next_attempt_at = now() WHERE destination_id = $1 AND webhook_id = $2",
        destination,
        f"{first}:resolved",
    )
    claimed = await store.claim([], 8, 16, 5.0)
    assert [(c.destination_id, c.webhook_id) for c in claimed] == [(destination, f"{first}:resolved")]


async def test_deliveries_left_pending_on_a_disabled_destination_are_failed_not_blocking(
    db: asyncpg.Connection, database: Database, notify_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A delivery the consumer inserted while the dispatcher disabled its destination (410 Gone: the
    consumer read the destination as enabled, the disable's update of pending deliveries did not see the
    uncommitted row), or pending when an operator disabled it: never sent, never left pending (the backlog and
    oldest-age alerts would fire for ever), and never holding the claim's window from other destinations."""
    org = await make_org(db)
    disabled, _ = await add(notify_settings, capsys, org, "http://127.0.0.1:9/hook/t0ken-off")
    live, _ = await add(notify_settings, capsys, org, "http://127.0.0.1:9/hook/t0ken-live")
    await db.execute(
        "UPDATE notify_destinations SET enabled = false, disabled_reason = '410 Gone' WHERE id = $1", disabled
    )
    for _ in range(8):
        await _pending(db, org, disabled, str(uuid.uuid4()), TRIGGERED, due_in=-60)  # the oldest due
    await _pending(db, org, live, str(uuid.uuid4()), TRIGGERED)
    store = NotifyStore(database)

    claimed = await store.claim([], 2, 2, 5.0)  # a window of 2 x 4 rows: all of them the disabled one's
    claimed += await store.claim([], 2, 2, 5.0)
    assert [c.destination_id for c in claimed] == [live]
    rows = await db.fetch("SELECT status, last_error FROM notify_deliveries WHERE destination_id = $1", disabled)
    assert {r["status"] for r in rows} == {"failed"}
    assert {r["last_error"] for r in rows} == {"destination disabled: 410 Gone"}


async def test_a_429_is_retried_after_its_retry_after_not_sooner(
    db: asyncpg.Connection, notify_settings: Settings, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Slack and most webhook receivers rate-limit with 429 and ``Retry-After``: the next attempt waits that long
    (here 2 s, where the backoff alone would be 0.1-0.2 s), with the same webhook-id."""

    async def limited(receiver: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
        if len(receiver.requests) == 1:
            return web.Response(status=429, headers={"Retry-After": "2"}, text="rate_limited")
        return web.Response(status=204)

    await create_topics(notify_settings)
    org = await make_org(db)
    receiver = await serve(limited)
    _, receiver.secret = await add(notify_settings, capsys, org, receiver.url)
    alert_id = str(uuid.uuid4())
    await produce(notify_settings, notify_settings.topic_budget_alerts, [alert_message(org, alert_id=alert_id)])

    async def delivered() -> bool:
        return bool(await db.fetchval("SELECT status FROM notify_deliveries") == "delivered")

    await run_notify(notify_settings, delivered)
    assert receiver.ids == [alert_id, alert_id]
    assert receiver.requests[1][0] - receiver.requests[0][0] >= 2.0


async def test_a_destination_removed_while_the_consumer_matches_alerts_is_not_a_fatal_error(
    db: asyncpg.Connection, database: Database, notify_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """``destinations remove`` committing between the consumer's read of the destinations and its insert of
    their deliveries: the insert must not hit the foreign key (a ``DataRejected``, which stops the service as
    fatal). The removal waits for the batch instead, and its cascade takes the new deliveries with it."""
    org = await make_org(db)
    destination, _ = await add(notify_settings, capsys, org, "http://127.0.0.1:9/hook/t0ken-removed")
    alert_id = str(uuid.uuid4())
    async with database.transaction() as tx:
        await tx.set_tenants({org.id})
        assert [r["id"] for r in await destinations_for(tx, [org.id])] == [destination]
        removing = asyncio.create_task(db.execute("DELETE FROM notify_destinations WHERE id = $1", destination))
        await asyncio.sleep(0.5)  # `remove` commits now, unless the batch holds it off
        created = await insert_deliveries(
            tx,
            [NewDelivery(org.id, destination, alert_id, TRIGGERED, alert_message(org, alert_id=alert_id).decode())],
        )
        assert created == 1
    await asyncio.wait_for(removing, 10)
    assert await db.fetchval("SELECT count(*) FROM notify_destinations WHERE id = $1", destination) == 0
    assert await db.fetchval("SELECT count(*) FROM notify_deliveries WHERE destination_id = $1", destination) == 0
