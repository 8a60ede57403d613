"""The capacity model (issue 18 item 5), computed from the figures one run measured: bytes per stored row,
WAL and PostgreSQL CPU per event, the set-based write ceilings, the rate of one worker replica. README's
capacity section cites the table this writes into ``latest.md``; nothing in it is typed in by hand except
the assumptions below, which say what "one PostgreSQL primary" is taken to be."""

from __future__ import annotations

import math
from typing import Any

import asyncpg

SECONDS_PER_MONTH = 30.44 * 86_400  # an average month
REFERENCE_RATE = 1_000.0  # events/s: the issue's own example (2.6 billion rows a month)
MULTIPLES = (1, 10, 100)  # of the measured set-based upsert ceiling into api_usage

# What one PostgreSQL primary is taken to be (assumptions, not measurements; README says so):
PRIMARY_CORES = 64  # vCPUs of a large single database server
PRIMARY_WAL_MB_PER_SECOND = 300.0  # sustained WAL a primary writes, archives and streams to a standby
PRIMARY_STORAGE_TB = 32.0  # data a primary (and each standby) keeps, backs up and restores in hours, not days
RETAINED_MONTHS = 3  # months of per-request detail kept by retention (the rollups and the ledger stay)
HEADROOM = 0.5  # plan to run at half of any ceiling: a backlog after an outage must drain faster than it grew


# A table and, when it is partitioned, every partition under it (pg_partition_tree lists nothing for a table
# that is not partitioned; a partitioned parent itself has no storage).
TREE_SIZE = (
    "SELECT coalesce(sum({size}(r)), 0)::bigint FROM "
    "(SELECT relid AS r FROM pg_partition_tree($1::regclass) UNION SELECT $1::regclass) AS tree"
)


async def table_sizes(url: str, tables: tuple[str, ...] = ("api_usage", "cost_data")) -> dict[str, Any]:
    """Rows and bytes (heap, TOAST and every index, summed over partitions when the table is partitioned) of
    each table, and bytes per row."""
    conn = await asyncpg.connect(url)
    try:
        out: dict[str, Any] = {}
        for table in tables:
            rows = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            total = int(await conn.fetchval(TREE_SIZE.format(size="pg_total_relation_size"), table))
            indexes = int(await conn.fetchval(TREE_SIZE.format(size="pg_indexes_size"), table))
            out[table] = {
                "rows": rows,
                "bytes": total,
                "index_bytes": indexes,
                "bytes_per_row": round(total / rows, 1) if rows else None,
            }
        return out
    finally:
        await conn.close()


def dig(data: Any, *path: str) -> Any:
    """``data[path[0]][path[1]]...``, or None where a key is missing or None (results of phases not run)."""
    for key in path:
        if not isinstance(data, dict) or data.get(key) is None:
            return None
        data = data[key]
    return data


def upsert_rate(results: dict[str, Any], table: str) -> float | None:
    """The set-based upsert ceiling of ``table`` that targets and the model use: the mean of its measurement
    before the drains (the ceilings phase) and after them (the drain phase measures it again: same database,
    same rows), so that the machine's drift over the minutes between the two does not decide a ratio; the one
    measurement when only one was taken."""
    rates = [
        rate
        for key in ("database", "database_after")
        if isinstance(rate := dig(results, "ceilings", key, table, "upsert", "per_second"), (int, float))
    ]
    return round(sum(rates) / len(rates), 1) if rates else None


def naive_rate(results: dict[str, Any]) -> float | None:
    """The naive worker's rate the target compares with: the mean of its run in the naive phase and its second
    run after the drains (same events, a fresh database), for the reason ``upsert_rate`` gives."""
    rates = [
        rate
        for rate in (dig(results, "naive", "per_second"), dig(results, "naive", "after", "per_second"))
        if isinstance(rate, (int, float))
    ]
    return round(sum(rates) / len(rates), 1) if rates else None


def _per_unit(value: Any, units: Any) -> float | None:
    if isinstance(value, (int, float)) and isinstance(units, (int, float)) and units:
        return value / units
    return None


def inputs(results: dict[str, Any]) -> dict[str, Any]:
    """The measured figures the model uses (None where the run did not measure one)."""
    events = dig(results, "drain", "events") or {}
    lines = dig(results, "drain", "lines") or {}
    one: dict[str, Any] = next((r for r in dig(results, "replicas", "runs") or [] if r.get("replicas") == 1), {})
    return {
        "replica_events_per_second": one.get("settled_per_second") or one.get("per_second") or events.get("per_second"),
        "drain_events_per_second": events.get("per_second"),
        "drain_lines_per_second": lines.get("per_second"),
        "upsert_api_usage_per_second": upsert_rate(results, "api_usage"),
        "upsert_cost_data_per_second": upsert_rate(results, "cost_data"),
        "api_usage_bytes_per_row": dig(results, "drain", "sizes", "api_usage", "bytes_per_row"),
        "cost_data_bytes_per_row": dig(results, "drain", "sizes", "cost_data", "bytes_per_row"),
        "api_usage_bytes_per_row_grown": dig(results, "growth", "sizes", "api_usage", "bytes_per_row"),
        "cost_data_bytes_per_row_grown": dig(results, "growth", "sizes", "cost_data", "bytes_per_row"),
        "postgres_cpu_us_per_event": _round(
            _per_unit(dig(events, "cpu_seconds", "postgres"), events.get("units")), 1e6
        ),
        "worker_cpu_us_per_event": _round(_per_unit(dig(events, "cpu_seconds", "worker"), events.get("units")), 1e6),
        "wal_bytes_per_event": _round(_per_unit(events.get("wal_bytes"), events.get("units")), 1),
        "wal_bytes_per_line": _round(_per_unit(lines.get("wal_bytes"), lines.get("units")), 1),
    }


def _round(value: float | None, scale: float) -> float | None:
    return round(value * scale, 1) if value is not None else None


def model(results: dict[str, Any]) -> dict[str, Any]:
    """Per rate (the reference rate, then 1x, 10x, 100x the measured api_usage upsert ceiling): rows, bytes
    and partitions a month, replicas (= Kafka partitions at least), PostgreSQL cores and WAL, and whether one
    primary (the assumptions above) still holds it."""
    got = inputs(results)
    ceiling = got["upsert_api_usage_per_second"]
    rates: list[tuple[str, float]] = [("reference", REFERENCE_RATE)]
    if ceiling:
        rates += [(f"{m}x ceiling", m * ceiling) for m in MULTIPLES]
    rows = [_row(label, rate, got) for label, rate in rates]
    return {
        "inputs": got,
        "primary_limits": primary_limits(got),
        "assumptions": {
            "primary_cores": PRIMARY_CORES,
            "primary_wal_mb_per_second": PRIMARY_WAL_MB_PER_SECOND,
            "primary_storage_tb": PRIMARY_STORAGE_TB,
            "retained_months": RETAINED_MONTHS,
            "headroom": HEADROOM,
        },
        "rows": rows,
    }


def primary_limits(got: dict[str, Any]) -> dict[str, float | None]:
    """The sustained API-usage events/s at which one primary (the assumptions above, at ``HEADROOM``) runs
    out of each resource: PostgreSQL CPU, WAL, storage for the retained months."""
    pg_us, wal, row = got["postgres_cpu_us_per_event"], got["wal_bytes_per_event"], got["api_usage_bytes_per_row"]
    cpu = PRIMARY_CORES * HEADROOM / (pg_us / 1e6) if pg_us else None
    wal_rate = PRIMARY_WAL_MB_PER_SECOND * HEADROOM * 1e6 / wal if wal else None
    storage = PRIMARY_STORAGE_TB * 1e12 / (RETAINED_MONTHS * SECONDS_PER_MONTH * row) if row else None
    known = [v for v in (cpu, wal_rate, storage) if v is not None]
    return {
        "cpu_events_per_second": round(cpu) if cpu else None,
        "wal_events_per_second": round(wal_rate) if wal_rate else None,
        "storage_events_per_second": round(storage) if storage else None,
        "events_per_second": round(min(known)) if known else None,
    }


def _row(label: str, rate: float, got: dict[str, Any]) -> dict[str, Any]:
    per_month = rate * SECONDS_PER_MONTH
    bytes_per_row = got["api_usage_bytes_per_row"]
    month_bytes = per_month * bytes_per_row if bytes_per_row else None
    replica = got["replica_events_per_second"]
    replicas = math.ceil(rate / (replica * HEADROOM)) if replica else None
    pg_us = got["postgres_cpu_us_per_event"]
    cores = rate * pg_us / 1e6 / HEADROOM if pg_us else None
    wal = got["wal_bytes_per_event"]
    wal_mb = rate * wal / 1e6 if wal else None
    retained_tb = month_bytes * RETAINED_MONTHS / 1e12 if month_bytes else None
    limits = []
    if cores is not None and cores > PRIMARY_CORES:
        limits.append("CPU")
    if wal_mb is not None and wal_mb > PRIMARY_WAL_MB_PER_SECOND * HEADROOM:
        limits.append("WAL")
    if retained_tb is not None and retained_tb > PRIMARY_STORAGE_TB:
        limits.append("storage")
    known = None not in (cores, wal_mb, retained_tb)
    return {
        "label": label,
        "events_per_second": round(rate, 1),
        "api_usage_rows_per_month": round(per_month),
        "api_usage_gb_per_month": round(month_bytes / 1e9, 1) if month_bytes else None,
        "table_partitions_per_month": 1,  # api_usage is partitioned by month (issue 18 item 1)
        "retained_tb": round(retained_tb, 2) if retained_tb is not None else None,
        "replicas": replicas,
        "kafka_partitions": replicas,  # a partition has one consumer in a group: at least one per replica
        "postgres_cores": round(cores, 1) if cores is not None else None,
        "wal_mb_per_second": round(wal_mb, 1) if wal_mb is not None else None,
        "one_primary": (not limits) if known else None,
        "limits": limits,
    }
