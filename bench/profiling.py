"""``python -m bench profile``: where the worker spends its time while it drains a backlog.

1. The worker runs as a process under ``py-spy record --idle --format raw`` (a sampling profiler from PyPI,
   the ``bench`` extra) while it drains N API-usage events, then M ledger lines; the raw stacks are summed
   into the busiest functions (self and inclusive), the stages they belong to, and the share of time the
   event loop sat idle waiting (for PostgreSQL, the broker).
2. pg_stat_statements says which statements took the database time during each drain.
3. ``auto_explain`` (``log_analyze``, ``log_buffers``, nested statements) shows the plans of every statement
   of one realistic batch of each kind, applied with the worker's own ``Pipeline`` on the drained database.
Everything lands in ``bench/results/profile/<stamp>/``; ``bench/PROFILE.md`` is the written-up summary.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench import config, services
from bench import world as w
from bench.drain import Topics, drain
from bench.runner import Run
from worker.budgets import BudgetEngine
from worker.config import Settings
from worker.pipeline import Pipeline, decode_batch
from worker.store import Database

RATE = 250  # samples per second
# A sample whose innermost frame is one of these is a thread waiting (the event loop in epoll: for
# PostgreSQL, the broker, a timer), not working.
IDLE = re.compile(r"^(\w+\.)?(select|poll|wait|_worker) \((\S+/)?(selectors|threading|thread)\.py\)$")
STAGES = (  # (name, marker in a stack), first match wins
    ("start-up (imports)", "_find_and_load"),
    ("decode (jiter + pydantic + providers)", "decode_batch ("),
    ("budget evaluation (Python + asyncpg)", "worker/budgets.py"),
    ("statements: asyncpg (argument encoding, protocol, results)", "(asyncpg/"),
    ("pipeline Python (dedupe, attribution, pricing, columns)", "worker/pipeline.py"),
    ("aiokafka (fetch, record parsing, commit)", "(aiokafka/"),
    ("socket reads (asyncio; asyncpg's Cython protocol parses results there)", "_read_ready__data_received"),
    ("logging (structlog)", "(structlog/"),
    ("metrics (prometheus_client)", "(prometheus_client/"),
)


def _short(path: str | None) -> str:
    """``/.../site-packages/aiokafka/consumer/fetcher.py`` -> ``aiokafka/consumer/fetcher.py``; elsewhere the
    file and its folder (``worker/pipeline.py``, ``asyncio/events.py``)."""
    text = path or "?"
    if "site-packages/" in text:
        return text.rsplit("site-packages/", 1)[1]
    parts = Path(text).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]


@dataclass
class Stacks:
    samples: Counter[tuple[str, ...]]

    @classmethod
    def read(cls, path: Path, *, start: float = 0.0, end: float | None = None) -> Stacks:
        """Samples of a py-spy speedscope file (every thread) taken between ``start`` and ``end`` seconds
        after the process started; frames as ``function (file.py)``, outermost first."""
        data = json.loads(path.read_text(encoding="utf-8"))
        frames = [f"{f['name']} ({_short(f['file'])})" for f in data["shared"]["frames"]]
        samples: Counter[tuple[str, ...]] = Counter()
        for profile in data["profiles"]:
            at = 0.0
            for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
                # py-spy writes an empty stack for a sample it failed to take ("Errors: N" in its log)
                if stack and at >= start and (end is None or at <= end):
                    samples[tuple(frames[i] for i in stack)] += 1
                at += weight
        return cls(samples)


def summarize(path: Path, *, start: float = 0.0, end: float | None = None, top: int = 25) -> dict[str, Any]:
    """Where the samples between ``start`` and ``end`` (seconds since the process started) went."""
    stacks = Stacks.read(path, start=start, end=end)
    total = sum(stacks.samples.values())
    idle = sum(n for stack, n in stacks.samples.items() if IDLE.match(stack[-1]))
    active = {stack: n for stack, n in stacks.samples.items() if not IDLE.match(stack[-1])}
    busy = sum(active.values()) or 1
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    for stack, n in active.items():
        self_time[stack[-1]] += n
        for function in set(stack):
            inclusive[function] += n
        joined = ";".join(stack)
        stages[next((name for name, marker in STAGES if marker in joined), "other")] += n

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "samples": n, "percent": round(n * 100 / busy, 1)} for f, n in counter.most_common(top)]

    return {
        "samples": total,
        "window_seconds": [round(start, 2), round(end, 2) if end is not None else None],
        "idle_percent": round(idle * 100 / total, 1) if total else None,
        "busy_samples": sum(active.values()),
        "stages_percent_of_busy": {k: round(v * 100 / busy, 1) for k, v in stages.most_common()},
        "self": share(self_time),
        "inclusive": share(inclusive),
    }


# ------------------------------------------------------------------------------------- auto_explain

EXPLAIN_SETTINGS = {
    "session_preload_libraries": "auto_explain",
    "auto_explain.log_min_duration": "0",
    "auto_explain.log_analyze": "on",
    "auto_explain.log_buffers": "on",
    "auto_explain.log_timing": "on",
    "auto_explain.log_nested_statements": "on",
    "auto_explain.log_level": "notice",
}


def explain_report(plans: list[str]) -> str:
    """Every plan, except the per-row foreign-key checks and asyncpg's type introspection, which are only
    counted (with their total duration, inflated by auto_explain's per-statement timing)."""
    counted: Counter[str] = Counter()
    durations: dict[str, float] = {}
    kept: list[str] = []
    for plan in plans:
        match = re.search(r"duration: ([0-9.]+) ms", plan)
        text = plan.split("Query Text:", 1)[1].strip().splitlines()[0] if "Query Text:" in plan else plan[:80]
        if text.startswith(("SELECT 1 FROM ONLY", "WITH RECURSIVE typeinfo_tree", "SELECT t.oid")) or not text:
            key = text[:100] or "(empty)"
            counted[key] += 1
            durations[key] = durations.get(key, 0.0) + (float(match[1]) if match else 0.0)
            continue
        kept.append(plan)
    header = ["Counted, not shown (count, total ms):"]
    header += [f"  {n:6d} {durations[k]:10.1f}  {k}" for k, n in counted.most_common()]
    return "\n".join(header) + "\n\n" + "\n\n".join(kept)


async def explain_batches(url: str, database: str, world: w.World, events: int, lines: int) -> list[str]:
    """Apply one batch of ``events`` new API-usage events and one of provider envelopes carrying ~``lines``
    new lines with the worker's ``Pipeline`` (budgets included, 10 budgets on touched scopes), as the
    worker's role, and return every plan auto_explain reports for them."""
    admin = await asyncpg.connect(url)
    try:
        for name, value in EXPLAIN_SETTINGS.items():
            await admin.execute(f"ALTER DATABASE \"{database}\" SET {name} = '{value}'")
        for org in world.orgs[:2]:
            await admin.execute(
                "INSERT INTO ai_organization_budgets (organization_id, name, amount) VALUES ($1, 'profile', 1e9)",
                org.id,
            )
            await admin.executemany(
                "INSERT INTO ai_project_budgets (organization_id, project_id, name, amount) "
                "VALUES ($1, $2, 'profile', 1e9)",
                [(org.id, project) for project, _ in org.projects[:2]],
            )
    finally:
        await admin.close()
    plans: list[str] = []

    def listen(_: Any, message: Any) -> None:
        plans.append(str(message))

    async def setup(conn: Any) -> None:  # on every acquire: the pool drops listeners on release
        conn.add_log_listener(listen)

    pool = await asyncpg.create_pool(
        url, min_size=1, max_size=1, setup=setup, server_settings={"role": "cost_worker_writer"}
    )
    warnings.filterwarnings("ignore", message=".*active log listener", category=asyncpg.InterfaceWarning)
    settings = Settings(topic_api_usage="explain-events", topic_provider_buckets="explain-buckets")
    pipeline = Pipeline(Database(pool), settings, budgets=BudgetEngine(settings))
    try:
        payloads = [w.render_event(r) for r in w.event_rows(world, events, salt="explain")]
        envelopes = w.envelopes(replace(world, anchor=world.anchor - timedelta(days=120)), lines).payloads
        for label, topic, items in (
            ("API-usage batch", settings.topic_api_usage, payloads),
            ("provider batch", settings.topic_provider_buckets, envelopes),
        ):
            plans.append(f"==================== {label}: {len(items)} messages")
            records = [_Record(topic, 0, offset, payload) for offset, payload in enumerate(items)]
            batch = decode_batch(records, settings)
            await pipeline.apply(batch, {})
    finally:
        await pool.close()
        admin = await asyncpg.connect(url)
        try:
            for name in EXPLAIN_SETTINGS:
                await admin.execute(f'ALTER DATABASE "{database}" RESET {name}')
        finally:
            await admin.close()
    return plans


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


# ------------------------------------------------------------------------------------- report


def _markdown(summary: dict[str, Any]) -> str:
    out = [f"# Worker profile, {summary['started_at']}", ""]
    for kind in ("events", "lines"):
        d = summary.get(kind)
        if not d:
            continue
        p = d["profile"]
        out += [
            f"## Draining {d['units']:,} {d['unit']}: {d.get('per_second')}/s",
            "",
            f"{p['samples']} samples at {RATE} Hz between {p['window_seconds'][0]} s (partitions assigned) and "
            f"{p['window_seconds'][1]} s (last offset stored) after start; threads idle (waiting: the event loop in "
            f"epoll, for PostgreSQL or the broker) in {p['idle_percent']}% of them.",
            f"CPU seconds: {d['cpu_seconds']}.",
            "",
            "| Stage (share of busy samples) | % |",
            "| --- | --- |",
            *[f"| {k} | {v} |" for k, v in p["stages_percent_of_busy"].items()],
            "",
            "| Self time (busy samples) | % |",
            "| --- | --- |",
            *[f"| `{f['function']}` | {f['percent']} |" for f in p["self"][:20]],
            "",
            "| Inclusive time (busy samples) | % |",
            "| --- | --- |",
            *[f"| `{f['function']}` | {f['percent']} |" for f in p["inclusive"][:25]],
            "",
            "| Statement (pg_stat_statements) | Calls | Total ms | Mean ms | Rows | Blocks hit | Blocks read |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *[
                f"| {s['statement']} | {s['calls']} | {s['total_ms']} | {s['mean_ms']} | {s['rows']} | "
                f"{s['blocks_hit']} | {s['blocks_read']} |"
                for s in d["statements"]
            ],
            "",
            "Worker stage means (ms/batch): "
            + ", ".join(
                f"{stage} {v.get('mean_ms')}"
                for stage, v in ((d.get("worker_metrics") or {}).get("batch_stage_seconds") or {}).items()
            ),
            "",
        ]
    return "\n".join(out) + "\n"


def _py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


async def main(*, events: int, lines: int, out: Path) -> int:
    spy = _py_spy()
    if spy is None:
        print("py-spy is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    outdir = out / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    cfg = replace(config.from_scale("tiny"), events=events, lines=lines, scale_label="profile", idle_exit=1.0)
    summary: dict[str, Any] = {"started_at": stamp, "events": None, "lines": None}
    async with services.servers() as servers:
        run = Run(cfg, servers, outdir)
        await run.prepare()
        database = await run.database("profile")
        for kind, topics, end, units, unit in (
            ("events", Topics(run.events_topic, run.none.buckets, run.none.alerts, run.none.dead_letter),
             run.events_end, run.events_end, "API-usage events"),
            ("lines", Topics(run.none.api_usage, run.buckets_topic, run.none.alerts, run.none.dead_letter),
             run.buckets_end, run.lines, "ledger lines"),
        ):  # fmt: skip
            raw = outdir / f"{kind}.speedscope.json"
            prefix = [spy, "record", "--idle", "--format", "speedscope", "--rate", str(RATE), "--output", str(raw)]
            prefix.append("--")
            result = await drain(
                servers,
                label=f"profile-{kind}",
                database=database,
                group=f"bench-{servers.run_id}-profile-{kind}",
                topics=topics,
                end=end,
                units=units,
                unit=unit,
                idle=cfg.idle_exit,
                workdir=outdir,
                extra_env=cfg.worker_env,
                prefix=prefix,
            )
            for _ in range(100):  # py-spy writes its file once the worker exited
                if raw.exists():
                    break
                await asyncio.sleep(0.1)
            result.pop("samples", None)
            result.pop("progress", None)
            result.pop("rss_samples_mb", None)
            # Only the drain itself: from the group join (positions synced) to the last stored offset.
            result["profile"] = summarize(raw, start=result["ready_seconds"] or 0.0, end=result["done_seconds"])
            summary[kind] = result
        started = time.perf_counter()
        plans = await explain_batches(
            servers.url(database), database, run.world, config.CEILING_BATCH, config.CEILING_BATCH
        )
        summary["explain_seconds"] = round(time.perf_counter() - started, 1)
        (outdir / "explain.txt").write_text(explain_report(plans), encoding="utf-8")
        await services.drop_databases(servers)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    text = _markdown(summary)
    (outdir / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"profile files: {outdir}", file=sys.stderr)
    return 0
