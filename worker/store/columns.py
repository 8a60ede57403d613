"""How typed rows become the column arrays (one list per parameter) the batch statements take."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

from worker.decode import ApiEvent
from worker.quarantine import Quarantined
from worker.rows import LedgerRow, UsageRows, WindowRevision

# One encoder for every line: json.dumps with options builds a new JSONEncoder per call (~40% of its time).
_METADATA_JSON = json.JSONEncoder(sort_keys=True, default=str).encode


def _metadata(row: LedgerRow) -> str:
    return _METADATA_JSON(row.line.metadata)


# upsert_cost_data's parameters, in order: what each takes from a LedgerRow.
LEDGER_COLUMNS: tuple[Callable[[LedgerRow], Any], ...] = (
    *map(
        attrgetter,
        (
            "key.organization_id",
            "key.project_id",
            "line.provider",
            "line.ai_organization_id",
            "line.ai_project_id",
            "line.api_version",
            "line.bucket_start",
            "line.bucket_end",
            "line.line_item",
            "line.currency",
            "line.amount",
            "line.quantity",
            "line.unit",
        ),
    ),
    _metadata,
    *map(attrgetter, ("collected_at", "source.partition", "source.offset", "line.report", "line.outside_cost_report")),
)


def window_columns(revisions: Sequence[WindowRevision]) -> list[list[Any]]:
    """A window statement's first parameters: the windows, then each one's revision."""
    return [
        [r.window.provider for r in revisions],
        [r.window.ai_organization_id for r in revisions],
        [r.window.report for r in revisions],
        [r.window.start for r in revisions],
        [r.window.end for r in revisions],
        [r.collected_at for r in revisions],
    ]


def jsonb_text(value: str) -> str:
    """Header text as jsonb can hold it: jsonb refuses \\u0000, which a producer may well send."""
    return value.replace("\x00", "\ufffd")


def header_value(value: bytes | None) -> str | None:
    """A Kafka header value for the quarantine row: any bytes, or null (Kafka allows a header without one)."""
    return None if value is None else jsonb_text(value.decode("utf-8", "replace"))


def usage_columns(rows: UsageRows) -> list[Sequence[Any]]:
    """insert_api_usage's event parameters: each of ``UsageRows.EVENT_FIELDS`` across the events."""
    fields = dict(zip(ApiEvent._fields, zip(*rows.events, strict=True), strict=True))  # one C-level transpose
    return [fields.get(name, ()) for name in UsageRows.EVENT_FIELDS]


def quarantine_columns(items: Sequence[Quarantined]) -> list[list[Any]]:
    """insert_quarantine's row parameters, the rows in source order (topic, partition, offset)."""
    ordered = sorted(items, key=lambda q: (q.source.topic, q.source.partition, q.source.offset))
    return [
        [q.reason.value for q in ordered],
        [q.detail for q in ordered],
        [q.source.topic for q in ordered],
        [q.source.partition for q in ordered],
        [q.source.offset for q in ordered],
        [q.source.key for q in ordered],
        [q.payload for q in ordered],
        [json.dumps({jsonb_text(k): header_value(v) for k, v in q.source.headers}) for q in ordered],
        [q.organization_id for q in ordered],
    ]
