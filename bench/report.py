"""Results -> the issue's targets with PASS/FAIL, a Markdown report, a PNG chart, and the files on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bench import capacity

# (key, the issue(s) that set it, what it asks, comparison, required value). Issue 18 raised two of issue 7's
# figures (events vs the upsert ceiling: 0.5 for the 0.6 of issue 7, which stays its goal; growth 0.9 for
# 0.85) and added the platform-scale budget drain; the other issue-7 targets still hold as they were.
TARGETS = (
    ("api_events_vs_upsert", "18", "API-usage events end to end vs the set-based upsert ceiling", ">=", 0.5),
    ("api_events_vs_naive", "7", "API-usage events end to end vs the naive worker", ">=", 10.0),
    ("lines_vs_upsert", "7, 18", "Provider ledger lines end to end vs the set-based upsert ceiling", ">=", 0.5),
    ("latency_p99", "7", "p99 produce-to-committed latency at half load (ms)", "<=", 500.0),
    ("peak_rss", "7, 18", "Peak RSS draining the API-usage backlog (MB)", "<=", 300.0),
    ("growth_events", "18", "API-usage throughput with 10M existing rows vs empty", ">=", 0.9),
    ("growth_lines", "7", "Ledger-line throughput with 10M existing rows vs empty", ">=", 0.85),
    ("budgets_scaling", "7", "Budget evaluation per batch: 10,000 vs 10 active budgets, same touched", "<=", 1.5),
    ("budgets_full_periods", "18", "Budget evaluation per batch, 1,000 touched, periods full (ms)", "<=", 250.0),
    (
        "tenants_spread",
        "18",
        "API-usage events over 1,000 organizations with 3 budgets each, periods full, vs one organization",
        ">=",
        0.8,
    ),
)
SECTIONS = (
    "Targets",
    "Ceilings",
    "Worker drains",
    "Database time",
    "Replicas",
    "Latency",
    "Growth",
    "Budgets",
    "Budgets at platform scale",
    "Capacity",
    "Phases",
    "Machine",
)


_get = capacity.dig


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 3)
    return None


def _ceiling_detail(results: dict[str, Any], table: str) -> str:
    """The upsert ceiling a ratio used, with the two measurements it is the mean of (when there are two)."""
    before = _get(results, "ceilings", "database", table, "upsert", "per_second")
    after = _get(results, "ceilings", "database_after", table, "upsert", "per_second")
    mean = capacity.upsert_rate(results, table)
    if before is None or after is None:
        return f"{mean} rows/s"
    return f"{mean} rows/s (the mean of {before} before and {after} after the drains)"


def _naive_detail(results: dict[str, Any]) -> str:
    before = _get(results, "naive", "per_second")
    after = _get(results, "naive", "after", "per_second")
    if before is None or after is None:
        return f"{capacity.naive_rate(results)} events/s"
    return f"{capacity.naive_rate(results)} events/s (the mean of {before} before and {after} after the drains)"


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    events = _get(results, "drain", "events", "per_second")
    lines = _get(results, "drain", "lines", "per_second")
    measured: dict[str, tuple[float | None, str]] = {
        "api_events_vs_upsert": (
            _ratio(events, capacity.upsert_rate(results, "api_usage")),
            f"{events} events/s vs {_ceiling_detail(results, 'api_usage')}",
        ),
        "api_events_vs_naive": (
            _ratio(events, capacity.naive_rate(results)),
            f"{events} vs {_naive_detail(results)}",
        ),
        "lines_vs_upsert": (
            _ratio(lines, capacity.upsert_rate(results, "cost_data")),
            f"{lines} lines/s vs {_ceiling_detail(results, 'cost_data')}",
        ),
        "latency_p99": (
            _get(results, "latency", "p99_ms"),
            f"p50 {_get(results, 'latency', 'p50_ms')} / p99 {_get(results, 'latency', 'p99_ms')} / "
            f"max {_get(results, 'latency', 'max_ms')} ms at {_get(results, 'latency', 'offered_per_second')}/s "
            f"({_get(results, 'latency', 'method')})",
        ),
        "peak_rss": (
            _get(results, "drain", "events", "peak_rss_mb"),
            f"{_get(results, 'drain', 'events', 'peak_rss_mb')} MB over "
            f"{_get(results, 'drain', 'events', 'units')} events",
        ),
        "growth_events": (
            _ratio(
                _get(results, "growth", "events", "per_second"), _get(results, "growth", "events", "empty_per_second")
            ),
            f"{_get(results, 'growth', 'events', 'per_second')} vs "
            f"{_get(results, 'growth', 'events', 'empty_per_second')} events/s over the first "
            f"{_get(results, 'growth', 'events', 'units')} events",
        ),
        "growth_lines": (
            _ratio(
                _get(results, "growth", "lines", "per_second"), _get(results, "growth", "lines", "empty_per_second")
            ),
            f"{_get(results, 'growth', 'lines', 'per_second')} vs "
            f"{_get(results, 'growth', 'lines', 'empty_per_second')} lines/s over the first "
            f"{_get(results, 'growth', 'lines', 'units')} lines",
        ),
        "tenants_spread": (
            _get(results, "tenants", "spread_over_single"),
            f"{_get(results, 'tenants', 'spread', 'per_second')} events/s over "
            f"{_get(results, 'tenants', 'organizations')} organizations vs "
            f"{_get(results, 'tenants', 'single', 'per_second')} events/s from one; "
            f"{_get(results, 'tenants', 'spread', 'periods_per_batch')} budget periods evaluated per batch in "
            f"{_get(results, 'tenants', 'spread', 'evaluation_mean_ms')} ms"
            + (" (time-boxed)" if _get(results, "tenants", "spread", "time_boxed") else "")
            + (
                f"; {_get(results, 'tenants', 'floor', 'spread_over_single')} with no budgets and no spend "
                "aggregate (the floor)"
                if _get(results, "tenants", "floor", "spread_over_single")
                else ""
            ),
        ),
        "budgets_full_periods": (
            _get(results, "budgets", "cases", "full_periods", "median_ms"),
            f"median {_get(results, 'budgets', 'cases', 'full_periods', 'median_ms')} ms, "
            f"{_get(results, 'budgets', 'cases', 'full_periods', 'candidates')} touched",
        ),
        "budgets_scaling": (
            _get(results, "budgets", "many_over_few"),
            f"median {_get(results, 'budgets', 'cases', 'few', 'median_ms')} ms "
            f"({_get(results, 'budgets', 'cases', 'few', 'active')} active) vs "
            f"{_get(results, 'budgets', 'cases', 'many', 'median_ms')} ms "
            f"({_get(results, 'budgets', 'cases', 'many', 'active')} active), "
            f"{_get(results, 'budgets', 'cases', 'many', 'candidates')} touched; "
            f"{_get(results, 'budgets', 'cases', 'many_touched', 'median_ms')} ms with "
            f"{_get(results, 'budgets', 'cases', 'many_touched', 'candidates')} touched",
        ),
    }
    rows = []
    for key, issue, what, op, required in TARGETS:
        value, detail = measured[key]
        if value is None:
            status = "N/A"
        elif op == ">=":
            status = "PASS" if value >= required else "FAIL"
        else:
            status = "PASS" if value <= required else "FAIL"
        rows.append(
            {
                "key": key,
                "issue": issue,
                "target": what,
                "required": f"{op} {required:g}",
                "value": value,
                "detail": detail,
                "status": status,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ Markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:,.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def markdown(results: dict[str, Any]) -> str:
    cfg = results.get("config", {})
    out = [
        f"# cost-worker benchmark, {results.get('started_at')}",
        "",
        f"Scale **{cfg.get('scale_label')}**: {_fmt(cfg.get('events'))} API-usage events, "
        f"{_fmt(cfg.get('lines'))}+ ledger lines, {_fmt(cfg.get('prefill'))} pre-filled rows per table, "
        f"{_fmt(cfg.get('partitions'))} partitions per topic. Whole run: {_fmt(results.get('total_seconds'))} s. "
        f"Load average at start / end: {_get(results, 'machine', 'load_average_start')} / "
        f"{_get(results, 'machine', 'load_average_end')} (other work on the machine distorts timings).",
        "",
    ]
    if cfg.get("scale_label") != "full":
        out += ["> Not the full size: ratios are indicative only.", ""]
    if results.get("errors"):
        out += ["**Errors:** " + "; ".join(f"{k}: {v}" for k, v in results["errors"].items()), ""]

    out += ["## Targets", ""]
    out += _table(
        ["Target", "Issue", "Required", "Measured", "Detail", "Result"],
        [
            [t["target"], t.get("issue"), t["required"], t["value"], t["detail"], f"**{t['status']}**"]
            for t in results.get("targets", [])
        ],
    )

    out += ["", "## Ceilings", ""]
    ceilings = results.get("ceilings", {})
    rows: list[list[Any]] = [
        ["aiokafka consume-only (raw bytes, the events topic)", _get(ceilings, "consume", "per_second"), "records"],
        [
            "Worker decode_batch, API-usage events (one core)",
            _get(ceilings, "decode", "api_usage_events", "per_second"),
            "events",
        ],
        [
            "Worker decode_batch, provider envelopes (one core)",
            _get(ceilings, "decode", "provider_lines", "per_second"),
            "lines",
        ],
    ]
    for table in ("api_usage", "cost_data"):
        rows.append(
            [
                f"COPY into {table} (5,000-row chunks, superuser)",
                _get(ceilings, "database", table, "copy", "per_second"),
                "rows",
            ]
        )
        rows.append(
            [
                f"INSERT … SELECT unnest … ON CONFLICT DO NOTHING into {table} (5,000-row batches, writer role)",
                _get(ceilings, "database", table, "upsert", "per_second"),
                "rows",
            ]
        )
        if _get(ceilings, "database_after", table, "upsert", "per_second") is not None:
            rows.append(
                [
                    f"The same upsert into {table}, measured again after the drains (targets use the mean of both)",
                    _get(ceilings, "database_after", table, "upsert", "per_second"),
                    "rows",
                ]
            )
    rows.append(["Naive worker: one upsert + one commit per event", _get(results, "naive", "per_second"), "events"])
    if _get(results, "naive", "after", "per_second") is not None:
        rows.append(
            [
                "The same naive worker again after the drains (the target uses the mean of both)",
                _get(results, "naive", "after", "per_second"),
                "events",
            ]
        )
    out += _table(["Ceiling", "Per second", "Unit"], rows)

    out += ["", "## Worker drains", ""]
    out += [
        "Per second: from the moment the worker process had joined the group and sought its partitions (its "
        "`positions_synced` log line, *Ready s* after start) to the moment the last offset of the backlog was "
        "stored in `consumer_offsets` with its data (*Done s* after start); wall: from process start. CPU: "
        "seconds used by each process during the drain. Per-batch stages: the worker's own histograms "
        "(`cost_worker_batch_duration_seconds`); *Fetch*: awaiting the broker for the batch's records; *Wait*: "
        "the decoded batch waiting for the one before it to commit (near zero: the worker's CPU limits the rate); "
        "*DB* is its whole transaction, Python work inside it included (attribution, pricing, building and "
        "encoding the statements' arrays, and the next batch's decode, which runs between its statements).",
        "",
    ]
    drains = [
        ("drain", "events", "empty tables"),
        ("drain", "lines", "empty tables"),
        ("growth", "events", "pre-filled"),
        ("growth", "lines", "pre-filled"),
    ]
    rows = []
    for section, kind, state in drains:
        d = _get(results, section, kind)
        if not d:
            continue
        m = d.get("worker_metrics") or {}
        stages = m.get("batch_stage_seconds", {})
        cpu = d.get("cpu_seconds", {})
        rows.append(
            [
                f"{d['unit']} ({state})" + (" **time-boxed**" if d.get("time_boxed") else ""),
                d["units"],
                d.get("per_second"),
                d.get("ready_seconds"),
                d.get("done_seconds"),
                d.get("wall_per_second"),
                d.get("peak_rss_mb"),
                cpu.get("worker"),
                cpu.get("postgres"),
                cpu.get("broker"),
                m.get("batches"),
                m.get("mean_batch_messages"),
                _get(stages, "fetch", "mean_ms"),
                _get(stages, "decode", "mean_ms"),
                _get(stages, "wait", "mean_ms"),
                _get(stages, "database", "mean_ms"),
                _get(stages, "kafka_commit", "mean_ms"),
                _get(stages, "total", "mean_ms"),
            ]
        )
    out += _table(
        [
            "Drain",
            "Units",
            "Per second",
            "Ready s",
            "Done s",
            "Per second (wall)",
            "Peak RSS MB",
            "Worker CPU s",
            "PostgreSQL CPU s",
            "Broker CPU s",
            "Batches",
            "Msgs/batch",
            "Fetch ms/batch",
            "Decode ms/batch",
            "Wait ms/batch",
            "DB ms/batch",
            "Kafka commit ms/batch",
            "Total ms/batch",
        ],
        rows,
    )

    out += ["", "## Database time", ""]
    out += ["Top statements by total execution time during each drain (pg_stat_statements).", ""]
    for section, kind, state in drains:
        d = _get(results, section, kind)
        if not d or not d.get("statements"):
            continue
        out += [f"**{d['unit']} ({state})**", ""]
        out += _table(
            ["Statement", "Calls", "Total ms", "Mean ms", "Rows", "Blocks hit", "Blocks read", "WAL MB"],
            [
                [
                    s["statement"],
                    s["calls"],
                    s["total_ms"],
                    s["mean_ms"],
                    s["rows"],
                    s["blocks_hit"],
                    s["blocks_read"],
                    s["wal_mb"],
                ]
                for s in d["statements"][:6]
            ],
        )
        out += [""]

    out += _replicas_section(results)
    out += ["## Latency", ""]
    lat = results.get("latency") or {}
    if lat:
        out += [
            f"Steady offered load {_fmt(lat.get('offered_per_second'))}/s (half the measured API-usage throughput) "
            f"for {_fmt(lat.get('duration_seconds'))} s; produce time = just before `send()`, committed = "
            f"commit of the event's database transaction. Method: `{lat.get('method')}`.",
            "",
        ]
        out += _table(
            ["Method", "Events", "p50 ms", "p90 ms", "p99 ms", "Max ms", "Mean ms"],
            [
                [
                    name,
                    m.get("count"),
                    m.get("p50_ms"),
                    m.get("p90_ms"),
                    m.get("p99_ms"),
                    m.get("max_ms"),
                    m.get("mean_ms"),
                ]
                for name, m in lat.get("methods", {}).items()
            ]
            + [
                [
                    "broker only (produce -> consumer, no database)",
                    f.get("count"),
                    f.get("p50_ms"),
                    f.get("p90_ms"),
                    f.get("p99_ms"),
                    f.get("max_ms"),
                    f.get("mean_ms"),
                ]
                for f in [lat.get("broker_floor") or {}]
                if f.get("count")
            ],
        )
    out += ["", "## Growth", ""]
    growth = results.get("growth") or {}
    if growth:
        prefill = growth.get("prefill", {})
        out += [
            f"`cost_data` and `api_usage` pre-filled with {_fmt(_get(prefill, 'api_usage', 'rows'))} and "
            f"{_fmt(_get(prefill, 'cost_data', 'rows'))} rows over {_fmt(prefill.get('organizations'))} organizations "
            f"({_fmt(prefill.get('seconds'))} s), then the same backlogs drained again into them, each up to "
            f"{_fmt(_get(growth, 'events', 'fraction'))} of its messages (or a time box), and compared with the "
            "empty-table drains' rate over the same first messages.",
            "",
        ]
        out += _table(
            ["Stream", "Units", "Empty per second", "Pre-filled per second", "Ratio"],
            [
                [
                    kind,
                    _get(growth, kind, "units"),
                    _get(growth, kind, "empty_per_second"),
                    _get(growth, kind, "per_second"),
                    _ratio(_get(growth, kind, "per_second"), _get(growth, kind, "empty_per_second")),
                ]
                for kind in ("events", "lines")
            ],
        )
    out += ["", "## Budgets", ""]
    budgets = results.get("budgets") or {}
    if budgets:
        out += [
            f"`BudgetEngine.evaluate` for one batch of {_fmt(budgets.get('batch_events'))} events "
            f"({_fmt(budgets.get('touched_scopes'))} touched scopes), rolled back each time, after the touched "
            "budgets' scopes were registered in the spend aggregate (committed: a budget's first evaluation does it "
            f"once; for the full periods' 1,000 budgets it took "
            f"{_fmt(_get(budgets, 'cases', 'full_periods', 'registration_ms'))} ms).",
            "",
        ]
        out += _table(
            ["Case", "Active budgets", "Touched (candidates)", "Median ms", "p95 ms", "Candidate query ms"],
            [
                [
                    name,
                    c.get("active"),
                    c.get("candidates"),
                    c.get("median_ms"),
                    c.get("p95_ms"),
                    c.get("candidate_query_median_ms"),
                ]
                for name, c in budgets.get("cases", {}).items()
            ],
        )
    out += _tenants_section(results)
    out += _capacity_section(results)
    out += ["", "## Phases", ""]
    out += _table(["Phase", "Seconds"], [[k, v] for k, v in results.get("phase_seconds", {}).items()])
    out += ["", "## Machine", ""]
    machine = results.get("machine", {})
    pg = results.get("postgres", {})
    out += _table(
        ["What", "Value"],
        [
            ["CPU", f"{machine.get('cpu_model')} ({machine.get('cores')} cores)"],
            ["Memory", f"{machine.get('memory_gib')} GiB"],
            ["OS", machine.get("os")],
            ["Python", machine.get("python")],
            ["PostgreSQL", f"{pg.get('server_version')} ({'embedded' if pg.get('embedded') else 'configured'})"],
            [
                "PostgreSQL settings",
                ", ".join(f"{k}={v}" for k, v in pg.items() if k not in ("server_version", "embedded")),
            ],
            ["Broker", f"{machine.get('tansu') or 'configured'}"],
            ["Packages", ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items())],
        ],
    )
    return "\n".join(out) + "\n"


def _replicas_section(results: dict[str, Any]) -> list[str]:
    out = ["## Replicas", ""]
    section = results.get("replicas") or {}
    runs = section.get("runs") or []
    if not runs:
        return out
    cores = _get(results, "machine", "cores")
    out += [
        f"The API-usage backlog (up to {section.get('fraction', 1) * 100:.0f}% of it) drained by 1, 2 and 3 worker "
        "processes on one consumer group, each run into a fresh database. With N > 1, N - 1 processes start "
        "together and the N-th joins once the first batch is stored, as an autoscaler adds a replica: the group "
        "rebalances while it works. *Per second*: from the first member's `positions_synced` to the last stored "
        "offset; *settled*: from the moment every member held its final partitions (the N-replica rate). "
        "*Rebalance s*: the new replica's start until the group settled; *stall*: the longest time in it without "
        "a stored offset; *lag*: produced minus stored offsets (messages) when the group settled. *Busy cores*: "
        "CPU seconds of the workers, PostgreSQL and the broker per second of the run.",
        "",
    ]
    base = _get(runs[0], "settled_per_second") or _get(runs[0], "per_second")
    rows = []
    for run in runs:
        cpu = run.get("cpu_seconds") or {}
        used = sum(v for v in cpu.values() if isinstance(v, (int, float)))
        rate = run.get("settled_per_second") or run.get("per_second")
        rows.append(
            [
                run["replicas"],
                run.get("units"),
                run.get("per_second"),
                run.get("settled_per_second"),
                _ratio(rate, base),
                run.get("first_ready_seconds"),
                run.get("rebalance_seconds"),
                run.get("stall_seconds"),
                run.get("lag_at_settled"),
                run.get("assignments"),
                cpu.get("workers"),
                cpu.get("postgres"),
                round(used / run["done_seconds"], 2) if run.get("done_seconds") else None,
                " / ".join(",".join(map(str, parts)) or "-" for parts in run.get("final_partitions", [])),
            ]
        )
    out += _table(
        [
            "Replicas",
            "Units",
            "Per second",
            "Per second (settled)",
            "vs 1 replica",
            "First ready s",
            "Rebalance s",
            "Stall s",
            "Lag at settle",
            "Assignments",
            "Workers CPU s",
            "PostgreSQL CPU s",
            "Busy cores",
            "Partitions per replica",
        ],
        rows,
    )
    out += [
        "",
        f"This machine has {_fmt(cores)} cores for everything: the worker processes, PostgreSQL and the broker. "
        "Once one worker and PostgreSQL keep both busy, a second or third process only takes turns on the "
        "same cores: the figures show the cost and the behaviour of a rebalance, not the scaling N replicas give "
        "where PostgreSQL has cores of its own (see Capacity).",
        "",
    ]
    return out


def _tenants_section(results: dict[str, Any]) -> list[str]:
    out = ["", "## Budgets at platform scale", ""]
    t = results.get("tenants") or {}
    if not t:
        return out
    rollups = t.get("rollups") or {}
    history = t.get("history_backlog") or {}
    out += [
        f"{_fmt(t.get('organizations'))} organizations with 3 budgets each ({_fmt(t.get('budgets'))} budgets: "
        "organization, project, user; monthly, never crossed). Periods full: the worker first drained one event "
        f"per organization and hour for {_fmt(history.get('hours'))} hours of the month "
        f"({_fmt(history.get('events'))} events: {_fmt(rollups.get('project_metrics'))} project and "
        f"{_fmt(rollups.get('user_metrics'))} user rollup rows). The budgets' user scopes were then registered in "
        f"the spend aggregate, as their first evaluation would ({_fmt(t.get('registration_ms'))} ms for "
        f"{_fmt(t.get('organizations'))} user budgets, once). Then {_fmt(t.get('events'))} events from one "
        "organization, and as many spread over all of them, were drained into that database. Budget figures: "
        "the worker's own metrics (periods evaluated per batch, mean evaluation time per batch).",
        "",
    ]
    rows = []
    floor = t.get("floor") or {}
    for name, orgs, d in (
        ("single", 1, t.get("single") or {}),
        ("spread", t.get("organizations"), t.get("spread") or {}),
        ("floor: single", 1, floor.get("single") or {}),
        ("floor: spread", t.get("organizations"), floor.get("spread") or {}),
    ):
        if not d:
            continue
        stages = _get(d, "worker_metrics", "batch_stage_seconds") or {}
        rows.append(
            [
                name + (" **time-boxed**" if d.get("time_boxed") else ""),
                orgs,
                d.get("units"),
                d.get("per_second"),
                d.get("periods_per_batch"),
                d.get("evaluation_mean_ms"),
                _get(stages, "database", "mean_ms"),
                _get(d, "worker_metrics", "mean_batch_messages"),
            ]
        )
    out += _table(
        [
            "Drain",
            "Organizations",
            "Events",
            "Per second",
            "Budget periods per batch",
            "Evaluation ms per batch",
            "DB ms per batch",
            "Msgs/batch",
        ],
        rows,
    )
    out += ["", f"Spread over single: **{_fmt(t.get('spread_over_single'))}** (target >= 0.8).", ""]
    if floor:
        rollups = floor.get("rollups") or {}
        out += [
            f"The floor: the same backlogs drained into a second database with no budgets and the spend "
            f"aggregate's triggers disabled ({_fmt(rollups.get('spend_hourly'))} aggregate rows after the drains), "
            "so each batch wrote only what its transaction holds without budgets: the `api_usage` rows, the two "
            f"hourly rollups ({_fmt(rollups.get('project_metrics'))} project and "
            f"{_fmt(rollups.get('user_metrics'))} user rows in the end) and the offsets. Spread over single there: "
            f"**{_fmt(floor.get('spread_over_single'))}**, the bound on the figure above for any budget design "
            "that keeps the rollups in the batch's transaction.",
            "",
        ]
    return out


def _capacity_section(results: dict[str, Any]) -> list[str]:
    model = capacity.model(results)
    got, assume = model["inputs"], model["assumptions"]
    out = [
        "",
        "## Capacity",
        "",
        "Measured in this run (README's capacity model cites this section):",
        "",
    ]
    out += _table(
        ["Figure", "Value"],
        [
            ["API-usage events/s, one worker replica", got["replica_events_per_second"]],
            ["Ledger lines/s, one worker replica", got["drain_lines_per_second"]],
            ["Set-based upsert ceiling into api_usage (rows/s, one connection)", got["upsert_api_usage_per_second"]],
            ["Set-based upsert ceiling into cost_data (rows/s, one connection)", got["upsert_cost_data_per_second"]],
            ["PostgreSQL CPU per API-usage event (µs)", got["postgres_cpu_us_per_event"]],
            ["Worker CPU per API-usage event (µs)", got["worker_cpu_us_per_event"]],
            ["WAL per API-usage event (bytes)", got["wal_bytes_per_event"]],
            ["WAL per ledger line (bytes)", got["wal_bytes_per_line"]],
            ["api_usage bytes per row, incl. indexes (as the worker wrote them)", got["api_usage_bytes_per_row"]],
            ["cost_data bytes per row, incl. indexes (as the worker wrote them)", got["cost_data_bytes_per_row"]],
            ["api_usage bytes per row, incl. indexes (pre-filled, settled)", got["api_usage_bytes_per_row_grown"]],
            ["cost_data bytes per row, incl. indexes (pre-filled, settled)", got["cost_data_bytes_per_row_grown"]],
        ],
    )
    out += [
        "",
        "Projected per month (30.44 days) of API-usage events at the issue's reference rate and at 1x, 10x and "
        f"100x the upsert ceiling above, planning at {assume['headroom']:g} of every ceiling (replicas, "
        "PostgreSQL cores). One primary is assumed to offer "
        f"{assume['primary_cores']} cores, {assume['primary_wal_mb_per_second']:g} MB/s of WAL and "
        f"{assume['primary_storage_tb']:g} TB for {assume['retained_months']} months of per-request detail "
        "(assumptions, not measurements). api_usage is partitioned by month: one partition a month, of the size "
        "shown.",
        "",
    ]
    out += _table(
        [
            "Rate",
            "Events/s",
            "api_usage rows/month",
            "GB/month",
            "Partitions/month",
            f"TB kept ({assume['retained_months']} months)",
            "Replicas (= Kafka partitions, at least)",
            "PostgreSQL cores",
            "WAL MB/s",
            "One primary?",
        ],
        [
            [
                r["label"],
                r["events_per_second"],
                r["api_usage_rows_per_month"],
                r["api_usage_gb_per_month"],
                r["table_partitions_per_month"],
                r["retained_tb"],
                r["replicas"],
                r["postgres_cores"],
                r["wal_mb_per_second"],
                "-" if r["one_primary"] is None else ("yes" if r["one_primary"] else "no: " + ", ".join(r["limits"])),
            ]
            for r in model["rows"]
        ],
    )
    limits = model["primary_limits"]
    out += [
        "",
        "Sustained API-usage events/s at which one primary runs out of each resource (same assumptions): "
        f"PostgreSQL CPU {_fmt(limits['cpu_events_per_second'])}, WAL {_fmt(limits['wal_events_per_second'])}, "
        f"storage for {assume['retained_months']} months of detail {_fmt(limits['storage_events_per_second'])}: "
        f"**one primary holds about {_fmt(limits['events_per_second'])} events/s**.",
    ]
    return out


# ------------------------------------------------------------------------------------------ progress lines


def drain_figure(d: dict[str, Any]) -> str:
    """One drain in a line, for the progress display."""
    boxed = " (time-boxed)" if d.get("time_boxed") else ""
    return (
        f"{_fmt(d.get('units'))} {d.get('unit')} at {_fmt(d.get('per_second'))}/s{boxed}, "
        f"peak RSS {_fmt(d.get('peak_rss_mb'))} MB"
    )


def replicas_figure(r: dict[str, Any]) -> str:
    return (
        f"{_fmt(r.get('per_second'))}/s, settled {_fmt(r.get('settled_per_second'))}/s, "
        f"rebalance {_fmt(r.get('rebalance_seconds'))} s, lag at settle {_fmt(r.get('lag_at_settled'))}"
    )


def phase_figure(name: str, results: dict[str, Any]) -> str:
    """What a phase measured, in a line, said when it ends."""
    g = results.get
    if name == "prepare":
        return (
            f"{_fmt(_get(results, 'backlog', 'events', 'messages'))} events and "
            f"{_fmt(_get(results, 'backlog', 'buckets', 'lines'))} ledger lines in "
            f"{_fmt(_get(results, 'backlog', 'buckets', 'messages'))} envelopes produced"
        )
    if name == "ceilings":
        db = _get(results, "ceilings", "database") or {}
        return (
            f"upsert {_fmt(_get(db, 'api_usage', 'upsert', 'per_second'))} api_usage rows/s, "
            f"{_fmt(_get(db, 'cost_data', 'upsert', 'per_second'))} cost_data rows/s; decode "
            f"{_fmt(_get(results, 'ceilings', 'decode', 'api_usage_events', 'per_second'))} events/s on one core"
        )
    if name == "naive":
        return f"{_fmt(_get(results, 'naive', 'per_second'))} events/s"
    if name in ("drain", "growth"):
        parts = [f"{_fmt(_get(results, name, kind, 'per_second'))} {kind}/s" for kind in ("events", "lines")]
        sizes = _get(results, name, "sizes") or {}
        if sizes:
            parts.append(
                f"{_fmt(_get(sizes, 'api_usage', 'bytes_per_row'))} B per api_usage row, "
                f"{_fmt(_get(sizes, 'cost_data', 'bytes_per_row'))} B per cost_data row"
            )
        return "; ".join(parts)
    if name == "replicas":
        runs = _get(results, "replicas", "runs") or []
        return "; ".join(f"{r['replicas']}: {_fmt(r.get('settled_per_second') or r.get('per_second'))}/s" for r in runs)
    if name == "latency":
        return f"p50 {_fmt(_get(results, 'latency', 'p50_ms'))} ms, p99 {_fmt(_get(results, 'latency', 'p99_ms'))} ms"
    if name == "budgets":
        cases = _get(results, "budgets", "cases") or {}
        return ", ".join(f"{k} {_fmt(_get(c, 'median_ms'))} ms" for k, c in cases.items())
    if name == "tenants":
        t = g("tenants") or {}
        return (
            f"one organization {_fmt(_get(t, 'single', 'per_second'))}/s, {_fmt(t.get('organizations'))} "
            f"organizations {_fmt(_get(t, 'spread', 'per_second'))}/s: {_fmt(t.get('spread_over_single'))}x"
        )
    return ""


def verdict(results: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for target in results.get("targets") or evaluate_targets(results):
        counts[target["status"]] = counts.get(target["status"], 0) + 1
    errors = len(results.get("errors") or {})
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + (
        f"; {errors} phase error(s)" if errors else ""
    )


# ------------------------------------------------------------------------------------------ chart


def chart(results: dict[str, Any], path: Path) -> bool:
    """Throughput bars, the latency distribution and the drains' progress, as one PNG. False without
    matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    bars = [
        ("consume-only", _get(results, "ceilings", "consume", "per_second")),
        ("COPY api_usage", _get(results, "ceilings", "database", "api_usage", "copy", "per_second")),
        ("upsert api_usage", _get(results, "ceilings", "database", "api_usage", "upsert", "per_second")),
        ("COPY cost_data", _get(results, "ceilings", "database", "cost_data", "copy", "per_second")),
        ("upsert cost_data", _get(results, "ceilings", "database", "cost_data", "upsert", "per_second")),
        ("naive worker", _get(results, "naive", "per_second")),
        ("worker: events", _get(results, "drain", "events", "per_second")),
        ("worker: lines", _get(results, "drain", "lines", "per_second")),
        ("worker: events, pre-filled", _get(results, "growth", "events", "per_second")),
        ("worker: lines, pre-filled", _get(results, "growth", "lines", "per_second")),
        *[
            (f"worker: {r['replicas']} replica(s)", r.get("settled_per_second") or r.get("per_second"))
            for r in _get(results, "replicas", "runs") or []
        ],
        ("budgets: 1 organization", _get(results, "tenants", "single", "per_second")),
        ("budgets: all organizations", _get(results, "tenants", "spread", "per_second")),
    ]
    bars = [(name, value) for name, value in bars if value]
    ax = axes[0]
    ceilings = ("consume", "COPY", "upsert")
    colors = ["#4c72b0" if name.startswith(ceilings) else "#dd8452" for name, _ in bars]
    ax.barh([n for n, _ in bars], [v for _, v in bars], color=colors)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("per second (log)")
    ax.set_title("Throughput: ceilings (blue) and workers (orange)")
    for i, (_, value) in enumerate(bars):
        ax.text(value, i, f" {value:,.0f}", va="center", fontsize=8)

    ax = axes[1]
    hist = _get(results, "latency", "histogram_ms") or []
    if hist:
        edges = [e for e, _ in hist]
        lefts = [edges[0] / (edges[1] / edges[0]), *edges[:-1]] if len(edges) > 1 else [0.0]
        widths = [right - left for left, right in zip(lefts, edges, strict=True)]
        ax.bar(lefts, [c for _, c in hist], width=widths, align="edge")
        ax.set_xscale("log")
        for key, style in (("p50_ms", "--"), ("p99_ms", "-")):
            value = _get(results, "latency", key)
            if value:
                ax.axvline(value, color="red", linestyle=style, label=f"{key[:-3]} {value:.0f} ms")
        ax.axvline(500, color="black", linestyle=":", label="target p99 500 ms")
        ax.legend()
    ax.set_xlabel("produce -> committed (ms, log)")
    ax.set_ylabel("events")
    ax.set_title(f"Latency at {_get(results, 'latency', 'offered_per_second') or '?'} events/s offered")

    ax = axes[2]
    for section, kind, label in (
        ("drain", "events", "events"),
        ("drain", "lines", "lines"),
        ("growth", "events", "events, pre-filled"),
        ("growth", "lines", "lines, pre-filled"),
    ):
        progress = _get(results, section, kind, "progress") or []
        end = _get(results, section, kind, "backlog_messages") or _get(results, section, kind, "messages")
        if progress and end:
            ax.plot([t for t, _ in progress], [n / end * 100 for _, n in progress], label=label)
    backlog = _get(results, "backlog", "events", "messages")
    for run in _get(results, "replicas", "runs") or []:
        progress = run.get("progress") or []
        if progress and backlog:
            ax.plot(
                [t for t, _ in progress],
                [n / backlog * 100 for _, n in progress],
                linestyle="--",
                label=f"events, {run['replicas']} replica{'s' if run['replicas'] > 1 else ''}",
            )
    ax.set_xlabel("seconds since the (first) worker process started")
    ax.set_ylabel("% of the backlog's offsets stored")
    ax.set_title("Drains")
    if ax.lines:  # a run of some phases only may have drawn none
        ax.legend()
    fig.suptitle(f"cost-worker benchmark {results.get('started_at')} (scale {_get(results, 'config', 'scale_label')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(results: dict[str, Any], out_dir: Path, stamp: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate_targets(results)
    paths = {"json": out_dir / f"{stamp}.json", "markdown": out_dir / f"{stamp}.md", "chart": out_dir / f"{stamp}.png"}
    results["files"] = {k: p.name for k, p in paths.items()}
    if not chart(results, paths["chart"]):
        results["files"].pop("chart")
    paths["markdown"].write_text(markdown(results), encoding="utf-8")
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    written = {}
    for kind, path in paths.items():
        if path.exists():
            latest = out_dir / f"latest{path.suffix}"
            shutil.copyfile(path, latest)
            written[kind] = str(path)
    return written
