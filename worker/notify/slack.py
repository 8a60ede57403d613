"""The Slack incoming-webhook body of an alert: a message a person can read at a glance.

Slack's format: https://api.slack.com/messaging/webhooks (``text`` is the notification fallback, ``blocks``
the message). The one user-provided text, the budget name, is shown in a ``plain_text`` block, which Slack does not
format: a name such as ``*prod* _eu_`` stays as written, and cannot inject links or mentions. In the fallback,
``&``, ``<`` and ``>`` are escaped for the same reason (Slack's documented escaping; it has none for ``*_~``).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from worker.models import MINOR_UNIT_EXCEPTIONS
from worker.notify.messages import RESOLVED

# ISO 4217 minor units where they are not 2 (the message carries exact spend; a person reads it in the
# currency's smallest unit, rounded half-even like `budgets status`).
MINOR_DIGITS: dict[str, int] = {code: digits for code, digits in MINOR_UNIT_EXCEPTIONS.items() if digits is not None}


def money(value: object, currency: str, *, keep_finer: bool = False) -> str:
    """A decimal string of the message as a person reads it: rounded half-even to the currency's minor unit
    (with ``keep_finer``, a value set finer than that, such as a budget amount of 0.005 USD, is shown exactly),
    never in exponent notation, never ``-0``. Anything that is not a finite decimal is shown as it is."""
    try:
        exact = Decimal(str(value))
    except InvalidOperation:
        return str(value)
    if not exact.is_finite():
        return str(value)
    quantum = Decimal(1).scaleb(-MINOR_DIGITS.get(currency, 2))
    try:
        shown = exact.quantize(quantum, rounding=ROUND_HALF_EVEN)
    except ArithmeticError:  # more digits than the context holds: no amount or spend is this large
        return format(exact, "f")
    if keep_finer and shown != exact:
        shown = exact.normalize()
    return format(shown if shown else abs(shown), "f")


def period(body: dict[str, Any]) -> str:
    """The period as a person reads it, in the budget's time zone (the message's offsets): its first and last
    day. ``period_end`` is exclusive (the next period's first instant), so the last day is the day before it."""
    kind = str(body.get("period", ""))
    try:
        start = datetime.fromisoformat(str(body.get("period_start"))).date()
        last = (datetime.fromisoformat(str(body.get("period_end"))) - timedelta(microseconds=1)).date()
    except ValueError:
        return f"{kind} {str(body.get('period_start', ''))[:10]} to {str(body.get('period_end', ''))[:10]}".strip()
    days = start.isoformat() if last <= start else f"{start.isoformat()} to {last.isoformat()}"
    return f"{kind} {days}".strip()


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _scope(body: dict[str, Any]) -> str:
    scope = str(body.get("scope", ""))
    ident = body.get(f"{scope}_id") if scope in ("project", "user") else body.get("organization_id")
    return f"{scope} {ident}" if ident else scope


def link(template: str, body: dict[str, Any]) -> str | None:
    """The configured link, placeholders filled from the alert; None when no template is set."""
    if not template:
        return None
    fields = {
        name: str(body.get(name) or "")
        for name in ("organization_id", "budget_id", "alert_id", "scope", "project_id", "user_id")
    }
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError):
        return None  # a template naming unknown fields: no link rather than no message


def message(body: dict[str, Any], *, link_template: str = "") -> dict[str, Any]:
    name = str(body.get("budget_name") or body.get("budget_id") or "budget")
    currency = escape(str(body.get("currency", "")))
    threshold = escape(str(body.get("threshold_percent", "?")))
    code = str(body.get("currency", ""))
    spend = (
        f"{escape(money(body.get('spend', '?'), code))} / "
        f"{escape(money(body.get('amount', '?'), code, keep_finer=True))} {currency}"
    ).strip()
    if body.get("type") == RESOLVED:
        headline = f":white_check_mark: Budget {name} is back below its {threshold}% threshold"
    else:
        headline = f":warning: Budget {name} crossed {threshold}%: {escape(str(body.get('percent_used', '?')))}% used"
    details = (
        f"*Scope:* {escape(_scope(body))}\n*Spend:* {spend} ({escape(str(body.get('percent_used', '?')))}%)\n"
        f"*Period:* {escape(period(body))}"
    )
    url = link(link_template, body)
    if url:
        details += f"\n<{url}|Open the budget>"
    return {
        "text": f"{escape(headline)} ({spend})",
        "blocks": [
            {"type": "section", "text": {"type": "plain_text", "text": headline, "emoji": True}},
            {"type": "section", "text": {"type": "mrkdwn", "text": details}},
        ],
    }


def render(body: dict[str, Any], *, link_template: str = "") -> bytes:
    return json.dumps(message(body, link_template=link_template), separators=(",", ":")).encode()
