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

from bench import (
    budgets,
    capacity,
    ceilings,
    config,
    kafka_io,
    latency,
    machine,
    naive,
    replicas,
    report,
    services,
    tenants,
)
from bench import world as w
from bench.config import BenchConfig
from bench.drain import Topics, drain, rate_until
from bench.progress import Console
from worker.config import Settings

DECODE_SAMPLE = 50_000  # events decoded for the Python decode ceiling
DEFAULT_LATENCY_RATE = 2_000.0  # events/s offered when the drain phase did not run

# What each phase measures, said as it starts (its figure is said when it ends: report.phase_figure).
WHAT = {
    "prepare": "a migrated template database, the world, and the backlogs produced once to the broker",
    "ceilings": "consume-only, the worker's decode on one core, COPY and the set-based upsert into both tables",
    "naive": "a naive worker: one upsert and one commit per event (the floor to beat)",
    "drain": "the worker process draining the API-usage backlog, then the provider-bucket backlog (empty tables); "
    "then the set-based upsert ceiling and the naive worker again",
    "replicas": "1, 2 and 3 worker processes on one consumer group: rate, rebalance time and lag",
    "latency": "produce-to-committed latency at half the measured events rate",
    "growth": "the same drains into tables pre-filled with the growth rows, against the empty-table rate",
    "budgets": "budget evaluation of one batch with 10 and with many active budgets",
    "tenants": "events over many organizations with 3 budgets each, periods full, against one organization",
}


class Run:
    def __init__(
        self, cfg: BenchConfig, servers: services.Servers, workdir: Path, console: Console | None = None
    ) -> None:
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
        self.events_offsets: dict[int, int] = {}  # partition -> produced end offset of the events topic
        self.console = console or Console()
        self.console.phase_total = len(cfg.phases)

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        self.console.phase(name, WHAT[name])
        started = time.perf_counter()
        failed = False
        try:
            yield
        except Exception as exc:  # a failed phase is reported; the others still run
            failed = True
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            (self.workdir / f"error-{name}.txt").write_text(traceback.format_exc())
        finally:
            seconds = round(time.perf_counter() - started, 1)
            self.results["phase_seconds"][name] = seconds
            if failed:
                self.console.failed(name, self.results["errors"][name], seconds)
            else:
                self.console.figure(name, report.phase_figure(name, self.results), seconds)

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
        async with self.console.timed(f"producing {self.cfg.events:,} events"):
            events = await kafka_io.produce(self.servers.bootstrap, self.events_topic, self.event_payloads())
        async with self.console.timed(f"producing {self.cfg.lines:,}+ ledger lines"):
            envelopes = w.envelopes(self.world, self.cfg.lines)
            buckets = await kafka_io.produce(self.servers.bootstrap, self.buckets_topic, envelopes.payloads)
        self.events_end, self.buckets_end, self.lines = events.end, buckets.end, envelopes.lines
        self.events_offsets = dict(events.next_offsets)
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
        async with self.console.timed("consume-only"):
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
        async with self.console.timed(f"COPY and upsert, {self.cfg.ceiling_rows:,} rows per table"):
            out["database"] = await ceilings.database_ceilings(url, self.world, self.cfg.ceiling_rows)

    async def naive(self, *, again: bool = False) -> None:
        """The naive worker over the first events of the backlog, into a fresh database; ``again``: its second
        run, after the drains (``results["naive"]["after"]``)."""
        database = await self.database("naive_after" if again else "naive")
        count = min(self.cfg.naive, self.events_end)
        async with self.console.timed(f"naive worker{' again' if again else ''}, {count:,} events"):
            result = await naive.naive_worker(
                self.servers.url(database), self.servers.bootstrap, self.events_topic, count, self.world
            )
        if again:
            self.results["naive"]["after"] = result
        else:
            self.results["naive"] = result

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
            stop = round(end * fraction) if fraction < 1 else end
            task = self.console.task(f"{label}: {unit}", units * stop / end, unit)
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
                progress=task.feed(units / end),
            )
            task.close(report.drain_figure(result))
            self.samples[(label, kind)] = result.pop("samples")
            out[kind] = result
        return out

    async def drain(self) -> None:
        database = await self.database("empty")
        self.results["drain"] = out = {}
        out.update(await self._drains(database, "empty", max_seconds=self.cfg.drain_max_seconds))
        events_rows = out["events"]["rows_after"]["api_usage"]
        lines_rows = out["lines"]["rows_after"]["cost_data"]
        out["sizes"] = await capacity.table_sizes(self.servers.url(database))
        # The references the ratio targets compare with, measured again minutes after their phases: the targets
        # use the mean of the two (capacity.upsert_rate, capacity.naive_rate).
        if "ceilings" in self.databases:
            async with self.console.timed(f"upsert ceiling again, {self.cfg.ceiling_rows:,} rows per table"):
                self.results["ceilings"]["database_after"] = await ceilings.database_ceilings(
                    self.servers.url(self.databases["ceilings"]), self.world, self.cfg.ceiling_rows, copy=False
                )
        if "naive" in self.databases:
            await self.naive(again=True)
        complete = out["events"]["complete"] and out["lines"]["complete"]
        if complete and (events_rows != self.events_end or lines_rows != self.lines):
            self.results["errors"]["drain_check"] = (
                f"stored {events_rows} api_usage rows of {self.events_end}, {lines_rows} cost_data rows of {self.lines}"
            )

    async def replicas(self) -> None:
        """The events backlog (up to ``replicas_fraction`` of it) drained by 1, 2 and 3 worker processes on
        one group, each run into a fresh database."""
        runs: list[dict[str, Any]] = []
        self.results["replicas"] = {"runs": runs, "fraction": self.cfg.replicas_fraction}
        topics = Topics(self.events_topic, self.none.buckets, self.none.alerts, self.none.dead_letter)
        stop_at = round(self.events_end * self.cfg.replicas_fraction)
        for count in replicas.COUNTS:
            database = await self.database(f"replicas{count}")
            task = self.console.task(f"{count} replica{'s' if count > 1 else ''}: API-usage events", stop_at, "events")
            result = await replicas.group_drain(
                self.servers,
                replicas=count,
                label=f"replicas{count}",
                database=database,
                group=f"bench-{self.servers.run_id}-replicas{count}",
                topics=topics,
                ends=self.events_offsets,
                units=self.events_end,
                unit="API-usage events",
                stop_at=stop_at,
                idle=self.cfg.idle_exit,
                workdir=self.workdir,
                extra_env=self.cfg.worker_env,
                max_seconds=self.cfg.replicas_max_seconds,
                progress=task.feed(),
            )
            task.close(report.replicas_figure(result))
            runs.append(result)
            await services.drop_database(self.servers, database)  # a copy of the events each: free the disk

    async def tenants(self) -> None:
        """Budgets at platform scale: a history drain fills the month, then the single-organization and the
        spread backlogs are drained into the same database with 3 budgets per organization."""
        cfg = self.cfg
        world = tenants.tenant_world(cfg, cfg.tenant_orgs)
        database = await self.database("tenants")
        url = self.servers.url(database)
        await tenants.install(url, world)
        prefix = f"bench-{self.servers.run_id}-tenants"
        start, hours = tenants.history_window(world, cfg.tenant_history_hours)
        backlogs = {"history": f"{prefix}-history", "single": f"{prefix}-single", "spread": f"{prefix}-spread"}
        await kafka_io.create_topics(self.servers.bootstrap, dict.fromkeys(backlogs.values(), cfg.partitions))
        history_count = hours * len(world.orgs)
        async with self.console.timed(f"producing {history_count:,} history events and 2 x {cfg.tenant_events:,}"):
            produced = {
                "history": await kafka_io.produce(
                    self.servers.bootstrap, backlogs["history"], tenants.history_events(world, start, hours)
                ),
                "single": await kafka_io.produce(
                    self.servers.bootstrap,
                    backlogs["single"],
                    tenants.measured_events(tenants.single(world), cfg.tenant_events, "tenants-single"),
                ),
                "spread": await kafka_io.produce(
                    self.servers.bootstrap,
                    backlogs["spread"],
                    tenants.measured_events(world, cfg.tenant_events, "tenants-spread"),
                ),
            }
        out: dict[str, Any] = {
            "organizations": len(world.orgs),
            "history_backlog": {"from": start.isoformat(), "hours": hours, "events": produced["history"].count},
            "events": cfg.tenant_events,
        }
        self.results["tenants"] = out
        await self._tenant_drains(out, database, backlogs, produced, budgets=world)
        # The floor: the same three backlogs drained into a second database where nothing of budgets runs (no
        # budgets, the spend aggregate's triggers disabled), so each batch writes only what the mission puts in
        # its transaction without budgets: the rows, the two hourly rollups and the offsets. Whatever budgets
        # cost, the ratio above cannot pass this one.
        floor_database = await self.database("tenants_floor")
        floor_url = self.servers.url(floor_database)
        await tenants.install(floor_url, world)
        await tenants.without_budget_machinery(floor_url)
        floor: dict[str, Any] = {}
        out["floor"] = floor
        await self._tenant_drains(floor, floor_database, backlogs, produced, budgets=None)
        floor["rollups"] = await tenants.rollup_counts(floor_url)
        await services.drop_database(self.servers, floor_database)

    async def _tenant_drains(
        self,
        out: dict[str, Any],
        database: str,
        backlogs: dict[str, str],
        produced: dict[str, Any],
        *,
        budgets: w.World | None,
    ) -> None:
        """History, then the single and the spread backlog, each by a fresh group, into ``database``; with
        ``budgets``, that world's 3 budgets per organization are added once the history is in."""
        cfg = self.cfg
        url = self.servers.url(database)
        label = "tenants" if budgets is not None else "tenants floor"
        prefix = f"bench-{self.servers.run_id}-{label.replace(' ', '-')}"
        for name, boxed in (
            ("history", None),
            ("single", cfg.tenant_max_seconds[0]),
            ("spread", cfg.tenant_max_seconds[1]),
        ):
            if name == "single" and budgets is not None:  # the history is in: the budgets, the periods are full
                out["budgets"], out["registration_ms"] = await tenants.add_budgets(url, budgets)
                out["rollups"] = await tenants.rollup_counts(url)
            end = produced[name].end
            task = self.console.task(f"{label}: {name}", end, "events")
            result = await drain(
                self.servers,
                label=f"{label.replace(' ', '-')}-{name}",
                database=database,
                group=f"{prefix}-{name}",
                topics=Topics(backlogs[name], self.none.buckets, self.none.alerts, self.none.dead_letter),
                end=end,
                units=end,
                unit="API-usage events",
                max_seconds=boxed,
                idle=cfg.idle_exit,
                workdir=self.workdir,
                extra_env=cfg.worker_env,
                progress=task.feed(),
                with_statements=name != "history",
            )
            task.close(report.drain_figure(result))
            result.pop("samples")
            result.pop("rss_samples_mb")
            out[name] = result | tenants.budget_figures(result)
        single, spread = out["single"].get("per_second"), out["spread"].get("per_second")
        out["spread_over_single"] = round(spread / single, 3) if single and spread else None

    async def latency(self) -> None:
        database = await self.database("latency")
        measured = (self.results.get("drain") or {}).get("events", {}).get("per_second")
        rate = measured / 2 if measured else DEFAULT_LATENCY_RATE
        duration = min(5.0, self.cfg.latency_seconds)
        async with self.console.timed(f"broker alone at {rate:,.0f}/s", duration):
            floor = await latency.broker_floor(
                self.servers.bootstrap, self.probe_topic, self.world, rate=rate, duration=duration
            )
        # The worker's start and warm-up come first, then the paced run of latency_seconds.
        async with self.console.timed(f"worker at {rate:,.0f}/s (after its start)"):
            self.results["latency"] = await self._latency_run(database, rate)
        self.results["latency"]["broker_floor"] = floor

    async def _latency_run(self, database: str, rate: float) -> dict[str, Any]:
        return await latency.latency_run(
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

    async def growth(self) -> None:
        database = await self.database("grown")
        self.results["growth"] = out = {}
        async with self.console.timed(f"pre-filling {self.cfg.prefill:,} rows into each table"):
            out["prefill"] = await w.prefill(self.servers.url(database), self.world, self.cfg.prefill)
        out["sizes"] = await capacity.table_sizes(self.servers.url(database))
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
        async with self.console.timed("evaluations (few, many, many touched)"):
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
    console = Console()
    console.note(f"benchmark at scale {cfg.scale_label}: phases {', '.join(cfg.phases)}")
    with tempfile.TemporaryDirectory(prefix="cwb-logs-") as tmp:
        workdir = keep_logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        console.note("starting PostgreSQL and the broker (embedded unless BENCH_DATABASE_URL / ..._BOOTSTRAP_SERVERS)")
        async with services.servers() as servers:
            bench = Run(cfg, servers, workdir, console)
            bench.results = results | bench.results
            results = bench.results
            results["postgres"] = await services.server_facts(servers)
            results["servers"] = {"embedded_postgres": servers.embedded_pg, "embedded_broker": servers.embedded_broker}
            async with bench.phase("prepare"):
                await bench.prepare()
            if "prepare" not in results["errors"]:
                for name in config.PHASES[1:]:
                    if bench.wanted(name):
                        async with bench.phase(name):
                            await getattr(bench, name)()
            with contextlib.suppress(Exception):
                await services.drop_databases(servers)
        results["logs"] = {p.name: p.read_text()[-4000:] for p in sorted(workdir.glob("error-*.txt"))}
    results["machine"]["load_average_end"] = machine.load_average()
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["files"] = report.write(results, out_dir, stamp)
    console.note(f"done in {results['total_seconds']:.0f} s: {report.verdict(results)}")
    return results
