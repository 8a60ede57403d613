"""Benchmark sizes and knobs. ``BENCH_SCALE`` scales every size; ``tiny`` is a seconds-long smoke run."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

# Full-size figures, as issue 7 asks for them.
FULL_EVENTS = 1_000_000  # API-usage events in the drained backlog
FULL_LINES = 500_000  # ledger lines carried by the provider-bucket backlog (at least)
FULL_PREFILL = 10_000_000  # rows pre-filled into cost_data and into api_usage for the growth phase
FULL_NAIVE = 20_000  # events the naive reference worker processes (~3k/s: a few seconds)
FULL_CEILING_ROWS = 200_000  # rows per database ceiling measurement (COPY, set-based upsert)
FULL_LATENCY_SECONDS = 30.0  # duration of the steady-load latency run
FULL_BUDGETS = (10, 10_000)  # total active budgets in the two budget cases
# The growth drains stop (SIGTERM) once this share of each backlog is stored, and compare with the empty
# drains' rate over the same first share: same messages, 10M existing rows instead of none.
GROWTH_FRACTION = 0.3
# Issue 18 item 5: the events backlog drained again by 1, 2 and 3 worker processes on one group, up to this
# share of it each time (a fresh database each), time-boxed.
REPLICAS_FRACTION = 0.4
REPLICAS_MAX_SECONDS = 120.0
# Issue 18 item 6: API-usage events over this many organizations with 3 budgets each, periods full (a month of
# hourly rollups), against the same number from one organization; each drain time-boxed (single, spread).
TENANT_ORGS = 1_000
FULL_TENANT_EVENTS = 100_000
TENANT_MAX_SECONDS = (120.0, 90.0)
CEILING_BATCH = 5_000  # rows per COPY chunk / per set-based upsert statement (the worker's batch size)
FULL_MONTH_HOURS = 720  # a month of hourly rollups (the tenants' history at full size: the month so far)
LINES_PER_MESSAGE = 100  # ledger lines in one provider envelope (a page of hourly buckets)

# Worker settings the benchmark sets (BENCH_WORKER_COST_WORKER_* overrides them). The group join of the
# development broker (Tansu) takes half the session timeout; 6 s instead of 30 s only shortens each worker's
# start (never counted in the per-second figures) and does not change the steady state.
WORKER_DEFAULTS = {"COST_WORKER_KAFKA_SESSION_TIMEOUT": "6", "COST_WORKER_KAFKA_HEARTBEAT_INTERVAL": "1"}

PHASES = ("prepare", "ceilings", "naive", "drain", "replicas", "latency", "growth", "budgets", "tenants")


@dataclass(frozen=True)
class BenchConfig:
    scale_label: str
    events: int
    lines: int
    prefill: int
    naive: int
    ceiling_rows: int
    latency_seconds: float
    budgets: tuple[int, int]
    budget_repeats: int
    growth_fraction: float = GROWTH_FRACTION
    budget_case_seconds: float = 15.0  # a budget case stops repeating after this (at least one evaluation)
    # Time boxes (seconds after the worker process starts) that keep a run within its 15 minutes however slow
    # the worker is: (events drain, lines drain). A boxed drain reports what it stored by then.
    drain_max_seconds: tuple[float, float] = (420.0, 240.0)
    growth_max_seconds: tuple[float, float] = (75.0, 60.0)
    replicas_fraction: float = REPLICAS_FRACTION
    replicas_max_seconds: float = REPLICAS_MAX_SECONDS
    tenant_orgs: int = TENANT_ORGS
    tenant_events: int = FULL_TENANT_EVENTS
    tenant_history_hours: int | None = None  # hours of history per organization; None: the whole month so far
    tenant_max_seconds: tuple[float, float] = TENANT_MAX_SECONDS
    partitions: int = 3
    organizations: int = 20
    projects_per_org: int = 5
    users_per_org: int = 10
    idle_exit: float = 2.0  # seconds the worker process waits, caught up, before it exits
    seed: int = 7
    phases: tuple[str, ...] = PHASES
    worker_env: dict[str, str] = field(default_factory=dict)  # extra COST_WORKER_* for the worker process

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["budgets"] = list(self.budgets)
        data["drain_max_seconds"] = list(self.drain_max_seconds)
        data["growth_max_seconds"] = list(self.growth_max_seconds)
        data["tenant_max_seconds"] = list(self.tenant_max_seconds)
        data["phases"] = list(self.phases)
        return data


def from_scale(scale: str | float | None = None, *, phases: tuple[str, ...] = PHASES) -> BenchConfig:
    """``scale``: ``"tiny"``, ``"full"`` (= 1) or a factor applied to every full-size count."""
    raw = str(scale if scale is not None else os.environ.get("BENCH_SCALE", "1")).strip().lower()
    extra = {k: v for k, v in os.environ.items() if k.startswith("BENCH_WORKER_COST_WORKER_")}
    overrides = {k.removeprefix("BENCH_WORKER_"): v for k, v in extra.items()}
    worker_env = WORKER_DEFAULTS | overrides
    if raw == "tiny":
        # Seconds matter more than realism here: the group join takes half the session timeout on Tansu.
        worker_env = WORKER_DEFAULTS | {"COST_WORKER_KAFKA_SESSION_TIMEOUT": "3"} | overrides
        return BenchConfig(
            scale_label="tiny",
            events=3_000,
            lines=2_000,
            prefill=20_000,
            naive=300,
            ceiling_rows=5_000,
            latency_seconds=2.0,
            budgets=(10, 1_000),
            budget_repeats=3,
            growth_fraction=1.0,
            budget_case_seconds=3.0,
            replicas_fraction=1.0,
            replicas_max_seconds=60.0,
            tenant_orgs=50,
            tenant_events=3_000,
            tenant_history_hours=12,
            tenant_max_seconds=(60.0, 60.0),
            idle_exit=0.5,
            phases=phases,
            worker_env=worker_env,
        )
    factor = 1.0 if raw == "full" else float(raw)
    if not 0 < factor <= 10:
        raise ValueError(f"BENCH_SCALE must be tiny, full or a factor in (0, 10], got {raw!r}")

    def scaled(full: int, floor: int) -> int:
        return max(floor, math.ceil(full * factor))

    return BenchConfig(
        scale_label="full" if factor == 1.0 else f"x{factor:g}",
        events=scaled(FULL_EVENTS, 1_000),
        lines=scaled(FULL_LINES, 1_000),
        prefill=scaled(FULL_PREFILL, 10_000),
        naive=scaled(FULL_NAIVE, 300),
        ceiling_rows=scaled(FULL_CEILING_ROWS, CEILING_BATCH),
        latency_seconds=max(3.0, FULL_LATENCY_SECONDS * min(1.0, factor * 4)),
        budgets=FULL_BUDGETS,
        budget_repeats=max(3, min(10, math.ceil(10 * factor * 4))),
        tenant_events=scaled(FULL_TENANT_EVENTS, 1_000),
        tenant_history_hours=None if factor >= 1 else max(24, math.ceil(FULL_MONTH_HOURS * factor)),
        phases=phases,
        worker_env=worker_env,
    )
