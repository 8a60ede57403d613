"""Operator commands: ``notify destinations add|list|test|remove``, ``notify status`` and ``notify reseal``.

Every command acts inside one organization's row-level-security scope (``--organization``), except
``status`` without it, which reports every organization that has deliveries, and ``reseal``, which visits every
organization, a page of them per transaction.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from worker.admin import table
from worker.config import NOTIFY_MAX_SECRET_OVERLAP, Settings
from worker.errors import CostWorkerError, UsageError
from worker.notify.messages import SCOPES, TRIGGERED
from worker.notify.sealing import SealBroken, Sealer
from worker.notify.sender import Sender
from worker.notify.store import NotifyStore
from worker.notify.urls import UrlPolicy, origin
from worker.store import Database

SECRET_BYTES = 32  # random bytes of a generated signing secret (Standard Webhooks: 24 to 64)
SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks secret prefix, not a secret
KINDS = ("webhook", "slack")
MAX_NAME_CHARS = 200  # notify_destinations.name is varchar(200)
# A destination's lowest threshold, in percent: budgets' thresholds are in (0, 1000] (0003_budgets.sql), so a
# higher one would match no alert; finer than 12 decimal places says nothing (and PostgreSQL's numeric
# rejects exponents as large as 1e100000000 or 1e-100000000).
MAX_MIN_THRESHOLD = Decimal(1000)
MIN_THRESHOLD_QUANTUM = Decimal("1e-12")
RESEAL_ORGANIZATIONS_PER_TRANSACTION = 1000  # organizations whose destinations one reseal transaction seals again


class OutputLost(CostWorkerError):
    """Standard output could not be written (closed, full): what it was to show was never seen."""


def parse_min_threshold(text: str) -> Decimal:
    """``--min-threshold``: a percent from 0 to 1000 with at most 12 decimal places (ValueError otherwise)."""
    problem = f"a percent from 0 to {MAX_MIN_THRESHOLD} with at most 12 decimal places"
    try:
        value = Decimal(text)
        if not value.is_finite() or not 0 <= value <= MAX_MIN_THRESHOLD:
            raise ValueError(problem)
        exact = value.quantize(MIN_THRESHOLD_QUANTUM)  # at most 16 digits: exact in the default context
    except ArithmeticError:
        raise ValueError(problem) from None
    if exact != value:
        raise ValueError(problem)
    return abs(Decimal(format(exact.normalize(), "f")))  # 80.000 is 80, not 8E+1; -0 is 0


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def sample_alert(organization: uuid.UUID) -> str:
    """The body ``destinations test`` sends: a realistic triggered alert, marked as a test."""
    now = datetime.now(UTC).replace(microsecond=0)
    return json.dumps(
        {
            "type": TRIGGERED,
            "test": True,
            "alert_id": f"test-{uuid.uuid4()}",
            "scope": "organization",
            "organization_id": str(organization),
            "project_id": None,
            "user_id": None,
            "budget_id": str(uuid.UUID(int=0)),
            "budget_name": "Test budget (cost-worker notify destinations test)",
            "period": "monthly",
            "timezone": "UTC",
            "period_start": now.replace(day=1, hour=0, minute=0, second=0).isoformat(),
            "period_end": now.isoformat(),
            "threshold_percent": "80",
            "spend": "80.00",
            "amount": "100",
            "currency": "USD",
            "percent_used": "80.00",
            "raised_at": now.isoformat(),
        },
        separators=(",", ":"),
    )


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise UsageError([f"{what}: not a uuid: {value!r}"]) from None


async def _open(settings: Settings) -> NotifyStore:
    return NotifyStore(await Database.open(settings.dsn(), role=settings.database_role, max_size=2))


async def add(
    settings: Settings,
    *,
    organization: str,
    name: str,
    kind: str,
    url: str,
    scopes: Sequence[str],
    min_threshold: str,
    include_resolved: bool,
) -> int:
    org = _uuid(organization, "--organization")
    sealer = Sealer.from_settings(settings)
    problems = []
    if kind not in KINDS:
        problems.append(f"--kind: one of {', '.join(KINDS)}")
    for scope in scopes:
        if scope not in SCOPES:
            problems.append(f"--scope: one of {', '.join(SCOPES)}, got {scope!r}")
    try:
        threshold = parse_min_threshold(min_threshold)
    except ValueError as exc:
        problems.append(f"--min-threshold: {exc}, got {min_threshold[:40]!r}")
        threshold = Decimal(0)
    if not name.strip() or len(name) > MAX_NAME_CHARS or not name.isprintable():
        problems.append(f"--name: 1 to {MAX_NAME_CHARS} printable characters (no line break)")
    if url == "-":
        url = sys.stdin.readline().strip()  # keeps a token-bearing URL out of shell history and ps
    if problems:
        raise UsageError(problems)
    parts = await UrlPolicy.from_settings(settings).check(url)  # refused: a one-line error, exit 1
    destination = uuid.uuid4()
    secret = new_secret() if kind == "webhook" else None

    def show() -> None:
        try:
            print(f"added {kind} destination {destination} ({name}) -> {origin(parts)}")
            if secret:
                # Shown once: only the sealed form is stored, and no command prints it again.
                print(f"signing secret (shown once; verify with any Standard Webhooks library): {secret}")
            sys.stdout.flush()  # before the commit: a secret that could not be shown is not kept
        except OSError as exc:  # standard output closed or full (BrokenPipeError, ENOSPC)
            # Not an OSError any more: the transaction would take that for the database's.
            raise OutputLost(exc.strerror or type(exc).__name__) from None

    store = await _open(settings)
    try:
        added = await store.add_destination(
            id=destination,
            organization=org,
            name=name,
            kind=kind,
            origin=origin(parts),
            url_sealed=sealer.seal(url, destination),
            secret_sealed=sealer.seal(secret, destination) if secret else None,
            scopes=sorted(set(scopes)),
            min_threshold=threshold,
            include_resolved=include_resolved,
            before_commit=show,
        )
    except LookupError as exc:
        raise CostWorkerError(str(exc)) from None
    except OutputLost as exc:  # the insert rolled back
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the unwritten rest goes nowhere at exit
        raise CostWorkerError(
            f"destination not added: its id and signing secret could not be written to standard output ({exc})"
        ) from None
    finally:
        await store.db.close()
    if not added:
        raise CostWorkerError(f"organization {org} already has a destination named {name!r}")
    return 0


async def list_(settings: Settings, *, organization: str) -> int:
    org = _uuid(organization, "--organization")
    store = await _open(settings)
    try:
        rows = await store.list_destinations(org)
    finally:
        await store.db.close()
    print(
        table(
            ["id", "name", "kind", "url", "scopes", "min_threshold", "resolved", "enabled", "disabled_reason"],
            [
                (
                    r["id"],
                    r["name"],
                    r["kind"],
                    r["url_origin"] + "/…",
                    ",".join(r["scopes"]) or "all",
                    r["min_threshold"],
                    "yes" if r["include_resolved"] else "no",
                    "yes" if r["enabled"] else "no",
                    r["disabled_reason"],
                )
                for r in rows
            ],
        )
    )
    print(f"{len(rows)} destination(s)")
    return 0


def parse_overlap(text: str) -> float:
    """``--overlap``: seconds from 0 to NOTIFY_MAX_SECRET_OVERLAP (ValueError otherwise)."""
    problem = f"seconds from 0 to {NOTIFY_MAX_SECRET_OVERLAP:.0f}"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(problem) from None
    if not 0 <= value <= NOTIFY_MAX_SECRET_OVERLAP:  # NaN fails both comparisons
        raise ValueError(problem)
    return value


async def rotate_secret(settings: Settings, *, organization: str, destination: str, overlap: str) -> int:
    """A webhook's new signing secret, printed once (before it is kept); the old one signs too until the overlap
    ends, so the receiver's owner can switch to the new one without a delivery failing verification."""
    org = _uuid(organization, "--organization")
    ident = _uuid(destination, "DESTINATION")
    try:
        seconds = parse_overlap(overlap)
    except ValueError as exc:
        raise UsageError([f"--overlap: {exc}, got {overlap[:40]!r}"]) from None
    sealer = Sealer.from_settings(settings)
    secret = new_secret()

    def show(until: datetime) -> None:
        try:
            print(
                f"rotated the signing secret of destination {ident}; the old one also signs until {until.isoformat()}"
            )
            print(f"signing secret (shown once; verify with any Standard Webhooks library): {secret}")
            sys.stdout.flush()  # before the commit: a secret that could not be shown is not kept
        except OSError as exc:
            raise OutputLost(exc.strerror or type(exc).__name__) from None

    store = await _open(settings)
    try:
        until = await store.rotate_secret(org, ident, sealer.seal(secret, ident), seconds, show)
    except OutputLost as exc:  # the update rolled back: the old secret alone still signs
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise CostWorkerError(f"secret not rotated: it could not be written to standard output ({exc})") from None
    finally:
        await store.db.close()
    if until is None:
        raise CostWorkerError(f"organization {org} has no webhook destination {ident} (a Slack one has no secret)")
    return 0


async def test(settings: Settings, *, organization: str, destination: str) -> int:
    org = _uuid(organization, "--organization")
    ident = _uuid(destination, "DESTINATION")
    sealer = Sealer.from_settings(settings)
    store = await _open(settings)
    try:
        row = await store.get_destination(org, ident)
    finally:
        await store.db.close()
    if row is None:
        raise CostWorkerError(f"organization {org} has no destination {ident}")
    url = sealer.open(row["url_sealed"], ident)
    secret = sealer.open(row["secret_sealed"], ident) if row["secret_sealed"] else None
    payload = sample_alert(org)
    sender = Sender(settings, UrlPolicy.from_settings(settings))
    try:
        attempt = await sender.send(row["kind"], url, secret, json.loads(payload)["alert_id"], payload)
    finally:
        await sender.close()
    if attempt.ok:
        print(f"delivered: HTTP {attempt.status} in {attempt.seconds * 1000:.0f} ms")
        return 0
    raise CostWorkerError(f"test delivery failed: {attempt.error}")


async def remove(settings: Settings, *, organization: str, destination: str) -> int:
    org = _uuid(organization, "--organization")
    ident = _uuid(destination, "DESTINATION")
    store = await _open(settings)
    try:
        removed = await store.remove_destination(org, ident)
    finally:
        await store.db.close()
    if not removed:
        raise CostWorkerError(f"organization {org} has no destination {ident}")
    print(f"removed destination {ident} and its deliveries")
    return 0


async def status(settings: Settings, *, organization: str | None) -> int:
    # `is not None`: an empty --organization (an unset shell variable) is not a uuid, not "every organization".
    org = _uuid(organization, "--organization") if organization is not None else None
    store = await _open(settings)
    try:
        rows = await store.status(org)
        backlog, oldest = await store.stats()
    finally:
        await store.db.close()
    print(
        table(
            [
                "organization",
                "destination",
                "name",
                "kind",
                "enabled",
                "pending",
                "oldest_s",
                "delivered",
                "failed",
                "last_error",
            ],
            [
                (
                    r["organization_id"],
                    r["id"],
                    r["name"],
                    r["kind"],
                    "yes" if r["enabled"] else "no",
                    r["pending"],
                    round(r["oldest_pending_age"]),
                    r["delivered"],
                    r["failed"],
                    (r["last_error"] or "")[:60] or None,
                )
                for r in rows
            ],
        )
    )
    print(f"backlog: {backlog} pending deliveries, oldest {oldest:.0f}s")
    return 0


async def reseal(settings: Settings) -> int:
    """Every destination's URL and secret sealed under the current secrets key (``COST_WORKER_NOTIFY_SECRETS_KEY``);
    what the previous key (``COST_WORKER_NOTIFY_PREVIOUS_SECRETS_KEY``) sealed opens with it. Values the current key
    sealed are left alone, so a second run changes nothing. A destination neither key opens is named (exit 1) and
    left as it is; the others are still sealed again."""
    sealer = Sealer.from_settings(settings)
    problems: list[str] = []

    def change(row: Any) -> tuple[bytes, bytes | None, bytes | None] | None:
        ident = row["id"]
        columns = ("url_sealed", "secret_sealed", "previous_secret_sealed")
        try:
            again = [sealer.reseal(row[column], ident) if row[column] else None for column in columns]
        except SealBroken as exc:
            problems.append(f"{exc} (organization {row['organization_id']})")
            return None
        if again == [None, None, None]:
            return None
        url, secret, previous = (new or row[column] for new, column in zip(again, columns, strict=True))
        return url, secret, previous

    store = await _open(settings)
    changed = 0
    try:
        after = uuid.UUID(int=0)
        while page := await store.organizations(after, RESEAL_ORGANIZATIONS_PER_TRANSACTION):
            changed += await store.reseal(page, change)
            after = page[-1]
    finally:
        await store.db.close()
    print(f"resealed {changed} destination(s) under the current secrets key")
    if problems:
        raise CostWorkerError(
            f"{len(problems)} destination(s) left as they were: " + "; ".join(problems) + " (set "
            "COST_WORKER_NOTIFY_PREVIOUS_SECRETS_KEY to the key that sealed them, or remove and add them again)"
        )
    return 0
