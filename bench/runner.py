"""One benchmark run: every phase in order on one machine, then the report."""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import time
import traceback
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import budgets, ceilings, kafka_io, latency, machine, naive, report, services
from bench import world as w
from bench.config import BenchConfig
from bench.drain import Topics, drain, rate_until
from worker.config import Settings

DECODE_SAMPLE = 50_000  # events decoded for the Python decode ceiling
DEFAULT_LATENCY_RATE = 2_000.0  # events/s offered when the drain phase did not run


class Run:
    def __init__(self, cfg: BenchConfig, servers: services.Servers, workdir: Path) -> None:
        self.cfg = cfg
        self.servers = servers
        self.workdir = workdir
        self.world = w.build_world(cfg)
        self.results: dict[str, Any] = {"phase_seconds": {}, "errors": {}}
        prefix = f"bench-{servers.run_id}"
        self.events_topic = f"{prefix}-events"
        self.buckets_topic = f"{prefix}-buckets"
        self.none = Topics(f"{prefix}-no-events", f"{prefix}-no-buckets", f"{prefix}-alerts", f"{prefix}-dlq")
        self.latency_topic = f"{prefix}-latency-events"
        self.probe_topic = f"{prefix}-probe"
        self.template = ""
        self.events_end = 0
        self.buckets_end = 0
        self.lines = 0
        self.databases: dict[str, str] = {}
        self.samples: dict[tuple[str, str], list[tuple[float, int]]] = {}  # (label, kind) -> drain progress

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:  # a failed phase is reported; the others still run
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            (self.workdir / f"error-{name}.txt").write_text(traceback.format_exc())
        finally:
            self.results["phase_seconds"][name] = round(time.perf_counter() - started, 1)

    def wanted(self, name: str) -> bool:
        return name in self.cfg.phases

    def event_payloads(self) -> Any:
        return (w.render_event(row) for row in w.event_rows(self.world, self.cfg.events))

    async def database(self, purpose: str) -> str:
        name = self.servers.db_name(purpose)
        await services.create_database(self.servers, name, template=self.template)
        self.databases[purpose] = name
        return name

    # --- phases ---------------------------------------------------------------------------------------

    async def prepare(self) -> None:
        self.template = await services.create_template(self.servers)
        conn = await asyncpg.connect(self.servers.url(self.template))
        try:
            await w.install_world(conn, self.world)
        finally:
            await conn.close()
        partitions = self.cfg.partitions
        await kafka_io.create_topics(
            self.servers.bootstrap,
            {
                self.events_topic: partitions,
                self.buckets_topic: partitions,
                self.none.api_usage: partitions,
                self.none.buckets: partitions,
                self.none.alerts: 1,
                self.none.dead_letter: 1,
                self.latency_topic: partitions,
                self.probe_topic: partitions,
            },
        )
        events = await kafka_io.produce(self.servers.bootstrap, self.events_topic, self.event_payloads())
        envelopes = w.envelopes(self.world, self.cfg.lines)
        buckets = await kafka_io.produce(self.servers.bootstrap, self.buckets_topic, envelopes.payloads)
        self.events_end, self.buckets_end, self.lines = events.end, buckets.end, envelopes.lines
        self.envelopes = envelopes.payloads
        self.results["backlog"] = {
            "events": {"messages": events.count, "produce_per_second": round(events.rate, 1)},
            "buckets": {
                "messages": buckets.count,
                "lines": envelopes.lines,
                "bytes": sum(len(p) for p in envelopes.payloads),
                "produce_per_second": round(buckets.rate, 1),
            },
        }
        assert events.end == events.count, "offsets do not start at 0"
        assert buckets.end == buckets.count, "offsets do not start at 0"

    async def ceilings(self) -> None:
        out: dict[str, Any] = {}
        out["consume"] = await kafka_io.consume_rate(self.servers.bootstrap, self.events_topic, self.events_end)
        sample = list(itertools.islice(self.event_payloads(), DECODE_SAMPLE))
        share = max(1, len(self.envelopes) * DECODE_SAMPLE // max(self.cfg.events, 1))
        envelopes = self.envelopes[: min(len(self.envelopes), share)]
        lines = self.lines * len(envelopes) // len(self.envelopes)
        settings = Settings(topic_api_usage="events", topic_provider_buckets="buckets")
        out["decode"] = ceilings.decode_rates(settings, sample, envelopes, lines)
        self.results["ceilings"] = out
        database = await self.database("ceilings")
        url = self.servers.url(database)
        out["database"] = await ceilings.database_ceilings(url, self.world, self.cfg.ceiling_rows)

    async def naive(self) -> None:
        database = await self.database("naive")
        count = min(self.cfg.naive, self.events_end)
        self.results["naive"] = await naive.naive_worker(
            self.servers.url(database), self.servers.bootstrap, self.events_topic, count, self.world
        )

    async def _drains(
        self, database: str, label: str, *, fraction: float = 1.0, max_seconds: tuple[float, float]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        prefix = f"bench-{self.servers.run_id}-{label}"
        for kind, topics, end, units, unit, boxed in (
            ("events", Topics(self.events_topic, self.none.buckets, self.none.alerts, self.none.dead_letter),
             self.events_end, self.events_end, "API-usage events", max_seconds[0]),
            ("lines", Topics(self.none.api_usage, self.buckets_topic, self.none.alerts, self.none.dead_letter),
             self.buckets_end, self.lines, "ledger lines", max_seconds[1]),
        ):  # fmt: skip
            result = await drain(
                self.servers,
                label=f"{label}-{kind}",
                database=database,
                group=f"{prefix}-{kind}",
                topics=topics,
                end=end,
                units=units,
                unit=unit,
                stop_at=round(end * fraction) if fraction < 1 else None,
                max_seconds=boxed,
                idle=self.cfg.idle_exit,
                workdir=self.workdir,
                extra_env=self.cfg.worker_env,
            )
            self.samples[(label, kind)] = result.pop("samples")
            out[kind] = result
        return out

    async def drain(self) -> None:
        database = await self.database("empty")
        self.results["drain"] = out = {}
        out.update(await self._drains(database, "empty", max_seconds=self.cfg.drain_max_seconds))
        events_rows = out["events"]["rows_after"]["api_usage"]
        lines_rows = out["lines"]["rows_after"]["cost_data"]
        complete = out["events"]["complete"] and out["lines"]["complete"]
        if complete and (events_rows != self.events_end or lines_rows != self.lines):
            self.results["errors"]["drain_check"] = (
                f"stored {events_rows} api_usage rows of {self.events_end}, {lines_rows} cost_data rows of {self.lines}"
            )

    async def latency(self) -> None:
        database = await self.database("latency")
        measured = (self.results.get("drain") or {}).get("events", {}).get("per_second")
        rate = measured / 2 if measured else DEFAULT_LATENCY_RATE
        floor = await latency.broker_floor(
            self.servers.bootstrap,
            self.probe_topic,
            self.world,
            rate=rate,
            duration=min(5.0, self.cfg.latency_seconds),
        )
        self.results["latency"] = await latency.latency_run(
            self.servers,
            database=database,
            group=f"bench-{self.servers.run_id}-latency",
            topics=Topics(self.latency_topic, self.none.buckets, self.none.alerts, self.none.dead_letter),
            world=self.world,
            rate=rate,
            duration=self.cfg.latency_seconds,
            idle=self.cfg.idle_exit,
            workdir=self.workdir,
            extra_env=self.cfg.worker_env,
        )
        self.results["latency"]["broker_floor"] = floor

    async def growth(self) -> None:
        database = await self.database("grown")
        self.results["growth"] = out = {}
        out["prefill"] = await w.prefill(self.servers.url(database), self.world, self.cfg.prefill)
        fraction = self.cfg.growth_fraction
        out.update(await self._drains(database, "grown", fraction=fraction, max_seconds=self.cfg.growth_max_seconds))
        # The reference: the empty-table drains' rate over the same first messages of the same backlogs.
        for kind in ("events", "lines"):
            grown = out[kind]
            empty = (self.results.get("drain") or {}).get(kind) or {}
            samples = self.samples.get(("empty", kind))
            grown["fraction"] = fraction
            grown["empty_per_second"] = None
            if samples and empty.get("ready_seconds") is not None:
                per_message = empty["units"] / empty["messages"] if empty.get("messages") else 0
                rate = rate_until(samples, empty["ready_seconds"], grown["messages"], per_message)
                grown["empty_per_second"] = round(rate, 1) if rate else None

    async def budgets(self) -> None:
        database = self.databases.get("grown") or self.databases.get("empty") or await self.database("budgets")
        self.results["budgets"] = await budgets.budget_phase(
            self.servers.url(database),
            self.world,
            self.cfg.budgets,
            self.cfg.budget_repeats,
            self.cfg.budget_case_seconds,
        ) | {"database": "grown" if "grown" in self.databases else "empty"}


async def run(cfg: BenchConfig, out_dir: Path, *, keep_logs: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "schema": 1,
        "started_at": stamp,
        "config": cfg.as_dict(),
        "machine": machine.describe(),
    }
    with tempfile.TemporaryDirectory(prefix="cwb-logs-") as tmp:
        workdir = keep_logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        async with services.servers() as servers:
            bench = Run(cfg, servers, workdir)
            bench.results = results | bench.results
            results = bench.results
            results["postgres"] = await services.server_facts(servers)
            results["servers"] = {"embedded_postgres": servers.embedded_pg, "embedded_broker": servers.embedded_broker}
            async with bench.phase("prepare"):
                await bench.prepare()
            if "prepare" not in results["errors"]:
                for name in ("ceilings", "naive", "drain", "latency", "growth", "budgets"):
                    if bench.wanted(name):
                        async with bench.phase(name):
                            await getattr(bench, name)()
            with contextlib.suppress(Exception):
                await services.drop_databases(servers)
        results["logs"] = {p.name: p.read_text()[-4000:] for p in sorted(workdir.glob("error-*.txt"))}
    results["machine"]["load_average_end"] = machine.load_average()
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["files"] = report.write(results, out_dir, stamp)
    return results
