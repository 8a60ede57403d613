"""The Slack incoming-webhook body of an alert: a message a person can read at a glance.

Slack's format: https://api.slack.com/messaging/webhooks (``text`` is the notification fallback, ``blocks``
the message). User-provided text is escaped (``&``, ``<``, ``>``) so a budget name cannot inject links or
mentions.
"""

from __future__ import annotations

import json
from typing import Any

from worker.notify.messages import RESOLVED


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
    name = escape(str(body.get("budget_name") or body.get("budget_id") or "budget"))
    currency = escape(str(body.get("currency", "")))
    threshold = escape(str(body.get("threshold_percent", "?")))
    spend = f"{escape(str(body.get('spend', '?')))} / {escape(str(body.get('amount', '?')))} {currency}".strip()
    period = (
        f"{escape(str(body.get('period', '')))} {escape(str(body.get('period_start', '')))[:10]} to "
        f"{escape(str(body.get('period_end', '')))[:10]}"
    ).strip()
    if body.get("type") == RESOLVED:
        headline = f":white_check_mark: Budget *{name}* is back below its {threshold}% threshold"
    else:
        headline = f":warning: Budget *{name}* crossed {threshold}%: {escape(str(body.get('percent_used', '?')))}% used"
    details = (
        f"*Scope:* {escape(_scope(body))}\n*Spend:* {spend} ({escape(str(body.get('percent_used', '?')))}%)\n"
        f"*Period:* {period}"
    )
    url = link(link_template, body)
    if url:
        details += f"\n<{url}|Open the budget>"
    return {
        "text": f"{headline} ({spend})",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
            {"type": "section", "text": {"type": "mrkdwn", "text": details}},
        ],
    }


def render(body: dict[str, Any], *, link_template: str = "") -> bytes:
    return json.dumps(message(body, link_template=link_template), separators=(",", ":")).encode()
