"""Alert messages as consumed from the alerts topic, and which destinations want them.

The message format is ``worker.alerts`` (COORDINATION "Alert messages"): ``type`` is
``budget.alert.triggered`` or ``budget.alert.resolved`` (absent: triggered); ``alert_id`` is a uuid. The
stable delivery id is the ``alert_id`` for a triggered message and ``<alert_id>:resolved`` for a resolved one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from uuid import UUID

TRIGGERED = "budget.alert.triggered"
RESOLVED = "budget.alert.resolved"
SCOPES = ("organization", "project", "user")
MAX_PAYLOAD_BYTES = 65_536  # an alert is a few hundred bytes; anything this large is not one


@dataclass(frozen=True)
class AlertMessage:
    type: str
    alert_id: str
    organization_id: UUID
    scope: str
    threshold: Decimal
    body: dict[str, Any]
    payload: str  # exactly as consumed: the signed webhook body

    @property
    def webhook_id(self) -> str:
        return f"{self.alert_id}:resolved" if self.type == RESOLVED else self.alert_id


class Invalid(ValueError):
    """Not an alert message (the reason is the text)."""


def parse(value: bytes | None) -> AlertMessage:
    if value is None or len(value) > MAX_PAYLOAD_BYTES:
        raise Invalid("empty or oversized")
    try:
        payload = value.decode("utf-8")
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise Invalid(f"not JSON: {type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(body, dict):
        raise Invalid("not a JSON object")
    kind = body.get("type", TRIGGERED)
    if kind not in (TRIGGERED, RESOLVED):
        raise Invalid(f"unknown type {kind!r}")
    alert_id = body.get("alert_id")
    if not isinstance(alert_id, str) or not alert_id:
        raise Invalid("alert_id missing")
    if not _is_uuid(alert_id):  # it becomes the webhook-id header: nothing else may get through
        raise Invalid(f"alert_id not a uuid: {alert_id[:40]!r}")
    scope = body.get("scope")
    if scope not in SCOPES:
        raise Invalid(f"unknown scope {scope!r}")
    try:
        organization = UUID(str(body.get("organization_id")))
        threshold = Decimal(str(body.get("threshold_percent")))
    except (ValueError, InvalidOperation):
        raise Invalid("organization_id or threshold_percent invalid") from None
    if not threshold.is_finite():
        raise Invalid("threshold_percent invalid")
    return AlertMessage(kind, alert_id, organization, str(scope), threshold, body, payload)


def _is_uuid(value: str) -> bool:
    """The canonical form only (``str(uuid)``, as ``worker.alerts`` publishes it; upper-case hex too): UUID()
    alone also takes braces, ``urn:uuid:`` and, through int(), whitespace such as CR LF."""
    try:
        return str(UUID(value)) == value.lower()
    except ValueError:
        return False


@dataclass(frozen=True)
class Filter:
    """A destination's filters: scopes delivered (empty: all), lowest threshold, resolved messages."""

    scopes: Sequence[str] = ()
    min_threshold: Decimal = Decimal(0)
    include_resolved: bool = True

    def wants(self, message: AlertMessage) -> bool:
        if self.scopes and message.scope not in self.scopes:
            return False
        if message.threshold < self.min_threshold:
            return False
        return self.include_resolved or message.type != RESOLVED
