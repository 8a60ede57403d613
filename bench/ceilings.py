"""Ceilings the worker lives under, measured in the same run: consume-only, Python decode, COPY, and the
set-based upsert (``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING``), 5,000-row batches, into
the real migrated ``api_usage`` and ``cost_data`` tables of a scratch database."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from bench import world as w
from bench.config import CEILING_BATCH
from worker.config import Settings
from worker.pipeline import decode_batch

UPSERT_API_USAGE = f"""
INSERT INTO api_usage ({", ".join(w.API_USAGE_COLUMNS)})
SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::smallint[],
                     $8::int[], $9::timestamptz[], $10::bigint[], $11::bigint[], $12::bigint[], $13::text[],
                     $14::numeric[], $15::int[], $16::bigint[])
ON CONFLICT DO NOTHING
"""
UPSERT_COST_DATA = f"""
INSERT INTO cost_data ({", ".join(w.COST_DATA_COLUMNS)})
SELECT o, p, pr, ao, ap, v, bs, be, li, cu, am, qu, un, md::jsonb, ca, sp, so
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::cost_api_version[],
            $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::numeric[], $12::numeric[],
            $13::text[], $14::text[], $15::timestamptz[], $16::int[], $17::bigint[])
    AS t(o, p, pr, ao, ap, v, bs, be, li, cu, am, qu, un, md, ca, sp, so)
ON CONFLICT DO NOTHING
"""


def _chunks(rows: list[tuple[Any, ...]], size: int = CEILING_BATCH) -> Iterable[list[tuple[Any, ...]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _rate(count: int, seconds: float) -> dict[str, Any]:
    return {"rows": count, "seconds": round(seconds, 3), "per_second": round(count / seconds, 1) if seconds else None}


async def _copy(conn: asyncpg.Connection, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> float:
    started = time.perf_counter()
    for chunk in _chunks(rows):
        await conn.copy_records_to_table(table, records=chunk, columns=list(columns))
    return time.perf_counter() - started


async def _upsert(conn: asyncpg.Connection, statement: str, rows: list[tuple[Any, ...]]) -> float:
    started = time.perf_counter()
    for chunk in _chunks(rows):
        await conn.execute(statement, *(list(column) for column in zip(*chunk, strict=True)))
    return time.perf_counter() - started


async def database_ceilings(url: str, world: w.World, rows: int, *, copy: bool = True) -> dict[str, Any]:
    """COPY as the superuser (COPY FROM refuses tables under row-level security for other roles); the
    upsert as the worker's role, under row-level security with every organization in scope, one
    autocommitted statement per 5,000 rows. ``copy=False``: the upsert only (the re-measurement after the
    drains, ``bench.capacity.upsert_rate``)."""
    events = list(w.event_rows(world, rows, salt="ceiling"))
    ledger = list(w.ledger_rows(world, rows))
    tenants = ",".join(str(o) for o in world.all_org_ids())
    admin = await asyncpg.connect(url)
    writer = await asyncpg.connect(url, server_settings={"role": "cost_worker_writer"})
    try:
        await writer.execute("SELECT set_config('cost_worker.organization_ids', $1, false)", tenants)
        results: dict[str, Any] = {}
        for table, columns, data, statement in (
            ("api_usage", w.API_USAGE_COLUMNS, events, UPSERT_API_USAGE),
            ("cost_data", w.COST_DATA_COLUMNS, ledger, UPSERT_COST_DATA),
        ):
            await admin.execute("CHECKPOINT")
            if copy:
                copy_seconds = await _copy(admin, table, columns, data)
                await admin.execute(f"TRUNCATE {table}")
                await admin.execute("CHECKPOINT")
                results[table] = {"copy": _rate(len(data), copy_seconds)}
            upsert_seconds = await _upsert(writer, statement, data)
            stored = await admin.fetchval(f"SELECT count(*) FROM {table}")
            assert stored == len(data), f"{table}: {stored} rows stored of {len(data)}"
            await admin.execute(f"TRUNCATE {table}")
            results.setdefault(table, {})["upsert"] = _rate(len(data), upsert_seconds)
        results["batch_rows"] = CEILING_BATCH
        return results
    finally:
        await writer.close()
        await admin.close()


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def decode_rates(settings: Settings, events: list[bytes], envelopes: list[bytes], lines: int) -> dict[str, Any]:
    """The worker's own ``decode_batch`` (JSON parsing, validation, provider normalisation), in batches
    of 5,000 records, on one core: the Python ceiling of a sequential consume loop."""
    out: dict[str, Any] = {}
    for name, topic, payloads, units in (
        ("api_usage_events", settings.topic_api_usage, events, len(events)),
        ("provider_lines", settings.topic_provider_buckets, envelopes, lines),
    ):
        if not payloads:
            continue
        records = [_Record(topic, 0, offset, payload) for offset, payload in enumerate(payloads)]
        started = time.perf_counter()
        for start in range(0, len(records), CEILING_BATCH):
            batch = decode_batch(records[start : start + CEILING_BATCH], settings)
            assert not batch.quarantined, batch.quarantined[:1]
        seconds = time.perf_counter() - started
        out[name] = {"units": units, "seconds": round(seconds, 3), "per_second": round(units / seconds, 1)}
    return out
