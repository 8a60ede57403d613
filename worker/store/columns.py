"""How typed rows become the column arrays (one list per parameter) the batch statements take."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from worker.quarantine import Quarantined
from worker.rows import LedgerRow, UsageRows, WindowRevision

# One encoder for every line: json.dumps with options builds a new JSONEncoder per call (~40% of its time).
_METADATA_JSON = json.JSONEncoder(sort_keys=True, default=str).encode
# Lines of one report share a handful of metadata ({"api_key_id": ...}, {}): their JSON is remembered, up to this
# many. Only metadata of strings, integers and booleans: equal values of those types have the same JSON (1 and
# True are equal, hence the types in the key; Decimal("1.5") and Decimal("1.50") are equal but print differently).
METADATA_MEMO_SIZE = 4_096  # distinct metadata
_MEMO_TYPES = frozenset({str, int, bool})
_metadata_memo: dict[tuple[tuple[tuple[str, Any], ...], tuple[type, ...]], str] = {}


def metadata_json(metadata: dict[str, Any]) -> str:
    """cost_data.metadata's text: the keys sorted, anything not JSON as its str (``_METADATA_JSON``)."""
    types = tuple(map(type, metadata.values()))
    if not _MEMO_TYPES.issuperset(types):
        return _METADATA_JSON(metadata)
    key = (tuple(metadata.items()), types)
    text = _metadata_memo.get(key)
    if text is None:
        text = _METADATA_JSON(metadata)
        if len(_metadata_memo) >= METADATA_MEMO_SIZE:
            _metadata_memo.clear()
        _metadata_memo[key] = text
    return text


def ledger_columns(rows: Sequence[LedgerRow]) -> list[tuple[Any, ...]]:
    """upsert_cost_data's parameters $1..$19, in order: one pass over the rows, then one C-level transpose."""
    if not rows:
        return [() for _ in range(LEDGER_PARAMETERS)]
    return list(
        zip(
            *(
                (
                    row.key.organization_id,
                    row.key.project_id,
                    line.provider,
                    line.ai_organization_id,
                    line.ai_project_id,
                    line.api_version,
                    line.bucket_start,
                    line.bucket_end,
                    line.line_item,
                    line.currency,
                    line.amount,
                    line.quantity,
                    line.unit,
                    metadata_json(line.metadata),
                    row.collected_at,
                    row.source.partition,
                    row.source.offset,
                    line.report,
                    line.outside_cost_report,
                )
                for row in rows
                for line in (row.line,)
            ),
            strict=True,
        )
    )


LEDGER_PARAMETERS = 19  # upsert_cost_data's row parameters


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


EVENT_FIELD_COUNT = len(UsageRows.EVENT_FIELDS)  # the leading fields of ApiEvent (tests/unit/test_batch.py)


def usage_records(rows: UsageRows) -> list[tuple[Any, ...]]:
    """insert_api_usage's one argument: per event a cost_worker_api_usage_input row (0015), its
    ``UsageRows.EVENT_FIELDS`` (ApiEvent's leading fields, sliced in C) and then what pricing added."""
    n = EVENT_FIELD_COUNT
    return [
        (*event[:n], provider, estimate, source)
        for event, provider, estimate, source in zip(
            rows.events, rows.providers, rows.estimates, rows.estimate_sources, strict=True
        )
    ]


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
