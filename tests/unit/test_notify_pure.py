"""Notify's pure parts, without servers: URL rules, backoff, message parsing and filters, Slack text,
signing and sealing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker.config import Settings, load_settings
from worker.errors import ConfigError
from worker.notify import messages, slack
from worker.notify.admin import new_secret, parse_min_threshold, sample_alert
from worker.notify.backoff import JITTER_FLOOR, Backoff
from worker.notify.sealing import SealBroken, Sealer
from worker.notify.sender import error_text, signed_headers
from worker.notify.urls import UrlPolicy, UrlRefused, origin

STRICT = UrlPolicy()
SECRET_URL = "https://hooks.example.com/services/T0/B0/abc%7Edef0123?token=s%7Ecret99"
LOOPBACK_OK = UrlPolicy(allow_http=True, allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))


# --- URLs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/x",  # not https
        "ftp://hooks.example.com/x",
        "https://user:pw@hooks.example.com/x",  # credentials in the URL
        "https:///nohost",
        "https://10.0.0.8/hook",  # private
        "https://172.16.3.4/hook",
        "https://192.168.1.1/hook",
        "https://127.0.0.1/hook",  # loopback
        "https://[::1]/hook",
        "https://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
        "https://[fe80::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",  # IPv4-mapped private
        "https://0.0.0.0/hook",
        "https://100.64.0.1/hook",  # shared address space (carrier NAT)
        "https://[fc00::1]/hook",  # unique local
        "https://224.0.0.1/hook",  # multicast
        "https://hooks.example.com:0/x",
        "https://" + "a" * 3000 + ".example.com/",
    ],
)
def test_refused_urls(url: str) -> None:
    with pytest.raises(UrlRefused):
        STRICT.check_url(url)


@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/a?b=c", "https://93.184.215.14/hook", "https://[2606:4700::1]/"]
)
def test_public_https_urls_pass(url: str) -> None:
    STRICT.check_url(url)


def test_configured_networks_and_http_are_the_only_exceptions() -> None:
    LOOPBACK_OK.check_url("http://127.0.0.1:8080/hook")
    with pytest.raises(UrlRefused):
        LOOPBACK_OK.check_url("http://10.0.0.1/hook")  # still private, not in the allowed network
    with pytest.raises(UrlRefused):
        STRICT.check_url("http://127.0.0.1:8080/hook")


async def test_names_are_resolved_and_every_address_checked() -> None:
    with pytest.raises(UrlRefused, match="not public"):
        await STRICT.check("https://localhost/hook")  # resolves to loopback
    await LOOPBACK_OK.check("http://localhost:9/hook")
    with pytest.raises(UrlRefused, match="cannot resolve"):
        await STRICT.check("https://no-such-host.invalid/hook")


def test_origin_hides_the_path() -> None:
    assert origin(STRICT.check_url("https://hooks.slack.com/services/T0/B0/secret")) == "https://hooks.slack.com"


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.InvalidURL(SECRET_URL),
        OSError(f"failed: {SECRET_URL}"),  # as configured
        OSError("failed: https://hooks.example.com/services/T0/B0/abc~def0123?token=s~cret99"),  # decoded
        ValueError("segment abc~def0123 rejected"),  # a path segment alone
        ValueError("rejected query s%7Ecret99"),
    ],
)
def test_error_texts_never_carry_the_url_path_or_query(exc: Exception) -> None:
    text = error_text(exc, SECRET_URL)
    assert text.startswith(type(exc).__name__)
    assert "abc" not in text
    assert "cret99" not in text


def test_error_texts_keep_what_does_not_name_the_url() -> None:
    assert error_text(ConnectionRefusedError("Connect call failed"), SECRET_URL) == (
        "ConnectionRefusedError: Connect call failed"
    )
    assert error_text(OSError(f"failed: {SECRET_URL}"), SECRET_URL) == "OSError: failed: https://hooks.example.com/…"


def test_policy_from_settings() -> None:
    settings = Settings(notify_allowed_networks="127.0.0.0/8, ::1/128", notify_allow_http=True)
    policy = UrlPolicy.from_settings(settings)
    assert policy.allow_http
    assert [str(n) for n in policy.allowed_networks] == ["127.0.0.0/8", "::1/128"]


def test_settings_report_bad_notify_values_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COST_WORKER_NOTIFY_SECRETS_KEY", base64.b64encode(b"short").decode())
    monkeypatch.setenv("COST_WORKER_NOTIFY_ALLOWED_NETWORKS", "10.0.0.0/8,not-a-net")
    monkeypatch.setenv("COST_WORKER_NOTIFY_BACKOFF_INITIAL", "100")
    monkeypatch.setenv("COST_WORKER_NOTIFY_BACKOFF_MAX", "10")
    with pytest.raises(ConfigError) as error:
        load_settings()
    text = "\n".join(error.value.problems)
    assert "COST_WORKER_NOTIFY_SECRETS_KEY" in text
    assert "not-a-net" in text
    assert "COST_WORKER_NOTIFY_BACKOFF_INITIAL" in text


# --- backoff ------------------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    backoff = Backoff(initial=2.0, maximum=60.0, max_age=3600.0)
    rng = random.Random(1)
    for attempts, base in [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (40, 60.0), (10_000, 60.0)]:
        delays = [backoff.delay(attempts, rng) for _ in range(200)]
        assert all(base * JITTER_FLOOR <= d <= base for d in delays), attempts
        assert len({round(d, 6) for d in delays}) > 100  # jitter: not in lockstep


def test_backoff_gives_up_past_the_maximum_age() -> None:
    backoff = Backoff(initial=10.0, maximum=10.0, max_age=60.0)
    created = datetime(2026, 12, 1, tzinfo=UTC)
    assert backoff.next_attempt(1, created, created + timedelta(seconds=30)) is not None
    assert backoff.next_attempt(5, created, created + timedelta(seconds=55)) is None


def test_backoff_waits_at_least_the_receivers_retry_after() -> None:
    """A 429 (or 503) with ``Retry-After: 30`` is not tried again in 1-2 s: the receiver said when."""
    backoff = Backoff(initial=2.0, maximum=900.0, max_age=3600.0)
    now = datetime(2026, 12, 1, tzinfo=UTC)
    at = backoff.next_attempt(1, now, now, not_before=30.0)
    assert at is not None
    assert at >= now + timedelta(seconds=30)
    assert backoff.next_attempt(1, now, now, not_before=4000.0) is None  # past the maximum age: given up
    later = backoff.next_attempt(12, now, now, not_before=1.0)  # the backoff is longer: it stands
    assert later is not None
    assert later >= now + timedelta(seconds=450)


# --- messages and filters -------------------------------------------------------------------------------


ALERT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "alert"))


def alert(**changes: object) -> bytes:
    body: dict[str, object] = {
        "alert_id": ALERT_ID,
        "scope": "project",
        "organization_id": str(uuid.UUID(int=1)),
        "project_id": str(uuid.UUID(int=2)),
        "budget_id": str(uuid.UUID(int=3)),
        "budget_name": "Team <b>&",
        "period": "monthly",
        "period_start": "2026-11-01T00:00:00+01:00",
        "period_end": "2026-12-01T00:00:00+01:00",
        "threshold_percent": "80",
        "spend": "812.50",
        "amount": "1000",
        "currency": "EUR",
        "percent_used": "81.25",
    }
    body.update(changes)
    return json.dumps(body).encode()


def test_webhook_ids_follow_the_coordination_contract() -> None:
    assert messages.parse(alert()).webhook_id == ALERT_ID  # no type: triggered
    assert messages.parse(alert(type=messages.TRIGGERED)).webhook_id == ALERT_ID
    resolved = messages.parse(alert(type=messages.RESOLVED, resolved_at="2026-11-22T00:00:00Z"))
    assert resolved.webhook_id == f"{ALERT_ID}:resolved"
    assert messages.parse(alert(alert_id=ALERT_ID.upper())).webhook_id == ALERT_ID.upper()
    assert resolved.payload == alert(type=messages.RESOLVED, resolved_at="2026-11-22T00:00:00Z").decode()


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"{nope",
        b"[]",
        alert(type="other"),
        alert(alert_id=""),
        alert(alert_id=7),
        alert(alert_id="a1"),  # the contract: a uuid
        alert(alert_id="abc\r\nX-Injected: 1"),  # would be the webhook-id header
        alert(alert_id="\r\n" + "0" * 30),  # UUID() takes it (int() skips whitespace); not canonical
        alert(alert_id="{" + ALERT_ID + "}"),
        alert(alert_id=f"{ALERT_ID}:resolved"),
        alert(scope="team"),
        alert(organization_id="x"),
        alert(threshold_percent="NaN"),
        b"\xff\xfe",
        b"[" * 60_000,  # under the size cap, but deeper than the JSON decoder's recursion limit
        b'{"a":' * 12_000,
    ],
)
def test_bad_messages_are_invalid_not_crashes(value: bytes | None) -> None:
    with pytest.raises(messages.Invalid):
        messages.parse(value)


def test_filters() -> None:
    project80 = messages.parse(alert())
    resolved = messages.parse(alert(type=messages.RESOLVED))
    assert messages.Filter().wants(project80)
    assert messages.Filter(scopes=("project",)).wants(project80)
    assert not messages.Filter(scopes=("organization", "user")).wants(project80)
    assert messages.Filter(min_threshold=Decimal(80)).wants(project80)
    assert not messages.Filter(min_threshold=Decimal("80.5")).wants(project80)
    assert messages.Filter().wants(resolved)
    assert not messages.Filter(include_resolved=False).wants(resolved)
    assert messages.Filter(include_resolved=False).wants(project80)


# --- Slack ----------------------------------------------------------------------------------------------


def test_slack_message_is_readable_and_escaped() -> None:
    body = json.loads(alert())
    text = json.dumps(slack.message(body, link_template="https://costs.example.com/b/{budget_id}?o={organization_id}"))
    rendered = slack.message(body, link_template="https://costs.example.com/b/{budget_id}")
    details = rendered["blocks"][1]["text"]["text"]
    headline = rendered["blocks"][0]["text"]
    assert headline["type"] == "plain_text"  # Slack formats none of it: the name shows as written
    assert "Budget Team <b>& crossed 80%" in headline["text"]
    assert "Budget Team &lt;b&gt;&amp; crossed 80%" in rendered["text"]  # the fallback is escaped
    assert "812.50 / 1000.00 EUR" in details
    assert "81.25%" in details
    assert f"project {uuid.UUID(int=2)}" in details
    assert "monthly 2026-11-01 to 2026-11-30" in details  # the last day: period_end is exclusive
    assert f"<https://costs.example.com/b/{uuid.UUID(int=3)}|Open the budget>" in details
    assert "<b>" not in rendered["text"]  # mrkdwn: escaped
    assert "<b>" not in details
    assert "Team <b>&" in text  # only in the plain_text block
    assert "crossed 80%" in rendered["text"]
    resolved = slack.message(json.loads(alert(type=messages.RESOLVED)))
    assert "back below its 80% threshold" in resolved["text"]
    assert "Open the budget" not in json.dumps(resolved)  # no template, no link


def test_a_budget_name_with_slack_formatting_characters_is_shown_as_written() -> None:
    rendered = slack.message(json.loads(alert(budget_name="*prod* _eu_ ~old~ `x`")))
    assert rendered["blocks"][0]["text"] == {
        "type": "plain_text",
        "text": ":warning: Budget *prod* _eu_ ~old~ `x` crossed 80%: 81.25% used",
        "emoji": True,
    }


@pytest.mark.parametrize(
    ("spend", "amount", "currency", "shown"),
    [
        ("46.29629629629629629629", "100", "EUR", "46.30 / 100.00 EUR"),  # a converted spend: 20 places
        ("50.00000000000000000000", "100.5", "EUR", "50.00 / 100.50 EUR"),
        ("0E-20", "1E+3", "USD", "0.00 / 1000.00 USD"),  # never exponent notation
        ("-0.001", "100", "USD", "0.00 / 100.00 USD"),  # never "-0.00"
        ("12.125", "100", "USD", "12.12 / 100.00 USD"),  # half-even, as `budgets status`
        ("12345.6", "20000", "JPY", "12346 / 20000 JPY"),  # no minor unit
        ("12.34567", "50", "KWD", "12.346 / 50.000 KWD"),  # three minor digits
        ("0.5", "0.005", "USD", "0.50 / 0.005 USD"),  # an amount finer than cents is shown exactly
    ],
)
def test_slack_money_is_rounded_to_the_currency(spend: str, amount: str, currency: str, shown: str) -> None:
    rendered = slack.message(json.loads(alert(spend=spend, amount=amount, currency=currency)))
    assert f"*Spend:* {shown} (81.25%)" in rendered["blocks"][1]["text"]["text"]
    assert f"({shown})" in rendered["text"]


@pytest.mark.parametrize(
    ("period", "start", "end", "shown"),
    [
        ("monthly", "2026-11-01T00:00:00+01:00", "2026-12-01T00:00:00+01:00", "monthly 2026-11-01 to 2026-11-30"),
        ("daily", "2026-11-05T00:00:00-05:00", "2026-11-06T00:00:00-05:00", "daily 2026-11-05"),
        ("weekly", "2026-10-26T00:00:00+01:00", "2026-11-02T00:00:00+01:00", "weekly 2026-10-26 to 2026-11-01"),
        ("yearly", "2026-01-01T00:00:00+09:00", "2027-01-01T00:00:00+09:00", "yearly 2026-01-01 to 2026-12-31"),
    ],
)
def test_slack_period_shows_its_last_day_not_the_exclusive_end(period: str, start: str, end: str, shown: str) -> None:
    rendered = slack.message(json.loads(alert(period=period, period_start=start, period_end=end)))
    assert rendered["blocks"][1]["text"]["text"].endswith(f"*Period:* {shown}")


def test_a_bad_link_template_drops_the_link_not_the_message() -> None:
    assert slack.link("https://x.example/{nope}", json.loads(alert())) is None
    assert slack.message(json.loads(alert()), link_template="{0}")["blocks"]


# --- signing and sealing --------------------------------------------------------------------------------


def test_signatures_verify_with_the_standardwebhooks_library() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    body = sample_alert(uuid.uuid4()).encode()
    headers = signed_headers(secret, "a1:resolved", body)
    assert headers["webhook-id"] == "a1:resolved"
    assert Webhook(secret).verify(body, headers)["budget_name"].startswith("Test budget")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):  # same body, another id: another signature
        Webhook(secret).verify(body, {**headers, "webhook-id": "a2"})


def test_signatures_follow_the_standard_webhooks_spec_not_only_its_library() -> None:
    """Computed here as the spec says (standardwebhooks.com, "Signature scheme"), without the library that signs:
    secret ``whsec_`` + base64 of 24 to 64 random bytes; signed content ``{webhook-id}.{webhook-timestamp}.{body}``;
    HMAC-SHA256 keyed by the decoded secret; header ``v1,<base64 signature>``; timestamp in integer Unix seconds."""
    secret = new_secret()
    key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    assert 24 <= len(key) <= 64
    body = sample_alert(uuid.uuid4()).encode()
    headers = signed_headers(secret, "a1", body, at=1_767_225_600.9)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-timestamp"] == "1767225600"
    digest = hmac.new(key, b"a1.1767225600." + body, hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(digest).decode()


def test_sealed_values_open_only_with_the_key_and_on_their_row() -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    sealer = Sealer.from_settings(Settings(notify_secrets_key=key))
    owner, other = uuid.uuid4(), uuid.uuid4()
    sealed = sealer.seal("https://hooks.slack.com/services/T/B/token", owner)
    assert b"token" not in sealed
    assert sealer.open(sealed, owner).endswith("/token")
    assert sealer.seal("x", owner) != sealer.seal("x", owner)  # fresh nonce every time
    with pytest.raises(SealBroken):
        sealer.open(sealed, other)
    with pytest.raises(SealBroken):
        Sealer(bytes(32)).open(sealed, owner)
    with pytest.raises(ConfigError):
        Sealer.from_settings(Settings())


# --- the command line and the SQL file ------------------------------------------------------------------


def test_notify_queries_load() -> None:
    from worker.notify.store import _queries  # noqa: PLC0415

    loaded = _queries()
    assert {"notify_claim", "notify_deliveries_insert", "notify_record_delivered"} <= set(loaded)
    assert all(statement.strip() for statement in loaded.values())


def test_cli_refuses_a_private_url_with_one_line_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main  # noqa: PLC0415

    monkeypatch.setenv("COST_WORKER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("COST_WORKER_NOTIFY_SECRETS_KEY", base64.b64encode(bytes(32)).decode())
    args = ["notify", "destinations", "add", "--organization", str(uuid.uuid4()), "--name", "x"]
    assert main([*args, "--url", "https://169.254.169.254/latest/meta-data"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("cost-worker: error: address 169.254.169.254 is not public")
    assert "Traceback" not in error
    monkeypatch.delenv("COST_WORKER_NOTIFY_SECRETS_KEY")
    assert main([*args, "--url", "https://hooks.example.com/x"]) == 2
    assert "COST_WORKER_NOTIFY_SECRETS_KEY: required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", "0"),
        ("80", "80"),
        ("80.50", "80.5"),
        ("1e3", "1000"),
        ("1000.000", "1000"),
        ("-0", "0"),
        ("0.000000000001", "0.000000000001"),
    ],
)
def test_min_threshold_is_a_percent_a_budget_can_reach(text: str, value: str) -> None:
    assert parse_min_threshold(text) == Decimal(value)


@pytest.mark.parametrize(
    "text",
    ["1e100000000", "1e-100000000", "1e5", "1000.0001", "-1", "NaN", "Infinity", "0.0000000000001", "x", ""],
)
def test_cli_refuses_a_min_threshold_no_budget_reaches_or_the_database_cannot_store(
    text: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main  # noqa: PLC0415

    with pytest.raises(ValueError, match="a percent from 0 to 1000"):
        parse_min_threshold(text)
    monkeypatch.setenv("COST_WORKER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("COST_WORKER_NOTIFY_SECRETS_KEY", base64.b64encode(bytes(32)).decode())
    args = ["notify", "destinations", "add", "--organization", str(uuid.uuid4()), "--name", "x"]
    assert main([*args, "--url", "https://hooks.example.com/x", f"--min-threshold={text}"]) == 2
    error = capsys.readouterr().err
    assert "--min-threshold: a percent from 0 to 1000 with at most 12 decimal places" in error
    assert "Traceback" not in error
