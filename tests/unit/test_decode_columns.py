"""Decoded rows -> the column arrays of the batch statements: upsert_cost_data's parameters by name, and the
remembered metadata JSON that must stay what json.dumps writes."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from worker.providers import LedgerLine
from worker.quarantine import Source
from worker.rows import LedgerKey, LedgerRow
from worker.store import columns
from worker.store.columns import METADATA_MEMO_SIZE, ledger_columns, metadata_json

SQL = Path(__file__).parents[2] / "worker" / "sql" / "queries.sql"
START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 11, 2, tzinfo=UTC)


def _row(index: int, metadata: dict[str, Any]) -> LedgerRow:
    line = LedgerLine(
        provider="openai",
        ai_organization_id="org-a",
        ai_project_id=f"proj_{index}",
        api_version="costs_v1",
        bucket_start=START,
        bucket_end=END,
        line_item=f"item {index}",
        currency="USD",
        amount=Decimal(f"1.{index}0"),
        quantity=None if index % 2 else Decimal(index),
        unit=None if index % 2 else "tokens",
        metadata=metadata,
        report="costs",
        outside_cost_report=bool(index % 2),
    )
    key = LedgerKey(uuid.UUID(int=index + 1), uuid.UUID(int=1000 + index), "openai", "org-a", "costs", START, END, "x")
    return LedgerRow(key, line, index, datetime(2026, 11, 3, index, tzinfo=UTC), Source("buckets", 2, 40 + index))


def test_ledger_columns_are_upsert_cost_datas_parameters_by_name() -> None:
    block = SQL.read_text().split("-- name: upsert_cost_data\n", 1)[1].split("-- name:", 1)[0]
    names = re.sub(r"\s+", " ", block.split(") WITH ORDINALITY AS t(", 1)[1].split(")", 1)[0]).strip().split(", ")
    assert names[-1] == "ord"
    names = names[:-1]
    rows = [_row(i, {"api_key_id": f"key_{i}"}) for i in range(3)]
    columns = ledger_columns(rows)
    assert len(columns) == len(names) == max(int(n) for n in re.findall(r"\$(\d+)", block))
    by_name = dict(zip(names, columns, strict=True))
    for i, row in enumerate(rows):
        expected = {
            "organization_id": row.key.organization_id,
            "project_id": row.key.project_id,
            "provider": "openai",
            "ai_organization_id": "org-a",
            "ai_project_id": f"proj_{i}",
            "api_version": "costs_v1",
            "bucket_start_time": START,
            "bucket_end_time": END,
            "line_item": f"item {i}",
            "currency": "USD",
            "amount": row.line.amount,
            "quantity": row.line.quantity,
            "unit": row.line.unit,
            "metadata": json.dumps({"api_key_id": f"key_{i}"}),
            "collected_at": row.collected_at,
            "source_partition": 2,
            "source_offset": 40 + i,
            "report": "costs",
            "outside_cost_report": bool(i % 2),
        }
        assert {name: column[i] for name, column in by_name.items()} == expected
    assert ledger_columns([]) == [()] * len(names)


METADATA: list[dict[str, Any]] = [
    {},
    {"api_key_id": "key_a"},
    {"user_id": "u", "api_key_id": "k"},
    {"api_key_id": "k", "user_id": "u"},  # the same items in another order: the same text
    {"batch": True},
    {"batch": 1},  # equal to True, not the same JSON
    {"num_model_requests": 1, "price_per": 1000},
    {"unit_price": Decimal("1.5")},
    {"unit_price": Decimal("1.50")},  # equal to 1.5, not the same text
    {"unpriced": {"model": "m", "token_type": "t"}},
    {"when": datetime(2026, 1, 1, tzinfo=UTC)},
    {"tags": ["a", "b"]},
    {"text": 'caf\u00e9 \x00 "quoted"'},
]


@pytest.mark.parametrize("rounds", [1, 3])
def test_metadata_json_is_what_json_dumps_writes_remembered_or_not(rounds: int) -> None:
    for _ in range(rounds):
        for metadata in METADATA:
            assert metadata_json(metadata) == json.dumps(metadata, sort_keys=True, default=str), metadata


def test_the_metadata_memo_is_bounded() -> None:
    for i in range(METADATA_MEMO_SIZE * 2 + 5):
        assert metadata_json({"api_key_id": f"key_{i}"}) == json.dumps({"api_key_id": f"key_{i}"})
    assert len(columns._metadata_memo) <= METADATA_MEMO_SIZE
