"""The benchmark (``make bench``) on a tiny input: it runs every phase and writes well-formed results.

Only the shape of the output is checked, never a timing: the machine running the suite is shared.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench import capacity, progress, replicas, report

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("ceilings", "naive", "drain", "replicas", "latency", "growth", "budgets", "tenants")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COST_WORKER_", "BENCH_"))}
    # Servers the suite was pointed at are used by the benchmark too; otherwise it starts its own.
    if os.environ.get("COST_WORKER_TEST_DATABASE_URL"):
        env["BENCH_DATABASE_URL"] = os.environ["COST_WORKER_TEST_DATABASE_URL"]
    if os.environ.get("COST_WORKER_TEST_KAFKA_BOOTSTRAP_SERVERS"):
        env["BENCH_KAFKA_BOOTSTRAP_SERVERS"] = os.environ["COST_WORKER_TEST_KAFKA_BOOTSTRAP_SERVERS"]
    return env


def test_tiny_benchmark_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--scale", "tiny", "--out", str(out)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "latest.json").read_text())
    stamped = json.loads((out / f"{results['started_at']}.json").read_text())
    assert stamped == results
    assert results["errors"] == {}
    assert results["config"]["scale_label"] == "tiny"
    for section in SECTIONS:
        assert results[section], section

    machine = results["machine"]
    for key in ("cores", "cpu_model", "memory_gib", "python", "packages", "load_average_start", "load_average_end"):
        assert machine[key] is not None, key
    assert results["postgres"]["server_version"]

    ceilings = results["ceilings"]
    assert ceilings["consume"]["complete"]
    for table in ("api_usage", "cost_data"):
        for how in ("copy", "upsert"):
            assert ceilings["database"][table][how]["per_second"] > 0
        # The upsert measured again after the drains; the ratio targets use the mean of the two.
        after = ceilings["database_after"][table]
        assert set(after) == {"upsert"}
        assert after["upsert"]["rows"] == results["config"]["ceiling_rows"]
        mean = (ceilings["database"][table]["upsert"]["per_second"] + after["upsert"]["per_second"]) / 2
        assert capacity.upsert_rate(results, table) == round(mean, 1)
    naive = results["naive"]
    assert naive["stored"] == naive["events"]
    assert naive["after"]["stored"] == naive["after"]["events"] == naive["events"]
    assert capacity.naive_rate(results) == round((naive["per_second"] + naive["after"]["per_second"]) / 2, 1)

    config = results["config"]
    for section in ("drain", "growth"):
        for kind in ("events", "lines"):
            drained = results[section][kind]
            assert drained["complete"], (section, kind)
            assert drained["exit_code"] == 0, (section, kind)
            assert drained["per_second"] > 0
            assert drained["peak_rss_mb"] > 0
    # Every event and every ledger line of the backlogs is in the database, exactly once.
    assert results["drain"]["events"]["rows_after"]["api_usage"] == config["events"]
    assert results["drain"]["lines"]["rows_after"]["cost_data"] == results["backlog"]["buckets"]["lines"]
    assert results["drain"]["lines"]["rows_after"]["quarantine"] == 0
    assert results["growth"]["prefill"]["api_usage"]["rows"] >= config["prefill"]

    latency = results["latency"]
    assert latency["complete"]
    assert latency["count"] == latency["events"] > 0
    assert latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert "offset_polling" in latency["methods"]
    assert latency["broker_floor"]["count"] > 0

    cases = results["budgets"]["cases"]
    assert [cases[c]["active"] for c in ("few", "many")] == config["budgets"]
    assert cases["few"]["candidates"] == cases["many"]["candidates"] == 10
    assert cases["many_touched"]["candidates"] > 10

    # N replicas on one group: every run stored what it reports, the added replica joined the running group
    # (a rebalance, timed from the workers' own logs) and every process stopped cleanly.
    runs = results["replicas"]["runs"]
    assert [run["replicas"] for run in runs] == [1, 2, 3]
    for run in runs:
        assert run["complete"], run["replicas"]
        assert run["exit_codes"] == [0] * run["replicas"], run
        assert run["rows_after"] >= run["units"] == config["events"]
        assert run["per_second"] > 0
        assert len([p for p in run["final_partitions"] if p]) == min(run["replicas"], config["partitions"])
        assert run["lag"][-1][1] == 0
    for run in runs[1:]:
        assert run["assignments"] > run["replicas"]  # the added replica made the first ones re-join
        assert run["rebalance_seconds"] > 0

    # Budgets at platform scale: the history filled the month's rollups before the budgets existed, then both
    # backlogs were stored whole, with every batch evaluating its touched budgets.
    tenants = results["tenants"]
    orgs = config["tenant_orgs"]
    assert tenants["organizations"] == orgs
    assert tenants["budgets"] == 3 * orgs
    assert tenants["history_backlog"]["events"] == orgs * tenants["history_backlog"]["hours"] > 0
    assert tenants["rollups"]["project_metrics"] >= tenants["history_backlog"]["events"]
    assert tenants["rollups"]["api_usage"] == tenants["history_backlog"]["events"]
    for name in ("history", "single", "spread"):
        drained = tenants[name]
        assert drained["complete"], name
        assert drained["exit_code"] == 0, name
        assert drained["units"] == (
            tenants["history_backlog"]["events"] if name == "history" else config["tenant_events"]
        )
    assert tenants["single"]["periods_per_batch"] > 0
    assert tenants["spread"]["periods_per_batch"] > tenants["single"]["periods_per_batch"]
    assert tenants["spread_over_single"] > 0
    assert tenants["rollups"]["spend_hourly"] > 0  # the aggregate is kept beside the rollups
    # The floor: the same backlogs stored whole where no budget exists and the aggregate is not maintained.
    floor = tenants["floor"]
    for name in ("history", "single", "spread"):
        assert floor[name]["complete"], name
        assert floor[name]["units"] == tenants[name]["units"], name
        assert not floor[name]["periods_per_batch"], name
    assert floor["rollups"]["spend_hourly"] == 0
    assert floor["rollups"]["api_usage"] == tenants["history_backlog"]["events"] + 2 * config["tenant_events"]
    assert floor["spread_over_single"] > 0
    assert "(the floor)" in (out / "latest.md").read_text()

    # Bytes per row (partitions and indexes included) for the capacity model, measured where the worker wrote.
    for table in ("api_usage", "cost_data"):
        sizes = results["drain"]["sizes"][table]
        assert sizes["rows"] > 0
        assert sizes["bytes"] > sizes["index_bytes"] > 0
        assert 100 < sizes["bytes_per_row"] < 10_000
    assert results["drain"]["events"]["wal_bytes"] > 0

    targets = {t["key"]: t for t in results["targets"]}
    assert set(targets) == {key for key, *_ in report.TARGETS}
    events = results["drain"]["events"]["per_second"]
    assert targets["api_events_vs_upsert"]["value"] == round(events / capacity.upsert_rate(results, "api_usage"), 3)
    assert "before and" in targets["api_events_vs_upsert"]["detail"]
    assert {t["status"] for t in targets.values()} <= {"PASS", "FAIL"}
    assert {t["issue"] for t in targets.values()} <= {"7", "18", "7, 18"}

    markdown = (out / "latest.md").read_text()
    assert markdown == (out / f"{results['started_at']}.md").read_text()
    for section in report.SECTIONS:
        assert f"\n## {section}\n" in markdown, section
    for _, _, what, _, _ in report.TARGETS:
        assert what in markdown
    assert "| 100x ceiling |" in markdown

    # Watchable: not a terminal here, so plain lines. Every phase said what it measures as it started and
    # its figure as it ended, and the drains said how far they were while they ran.
    progress = done.stderr
    for number, name in enumerate(config["phases"], start=1):
        assert f"==> [{number}/{len(config['phases'])}] {name}: " in progress, name
        assert f"<== {name} (" in progress, name
    assert "empty: API-usage events: started of 3,000 API-usage events" in progress
    assert "\r" not in progress
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latest.png").read_bytes().startswith(b"\x89PNG")


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    ticks = itertools.count()

    def clock() -> float:
        return next(ticks) * 0.2  # 0.2 s per look at the clock

    terminal = io.StringIO()
    console = progress.Console(terminal, tty=True, clock=clock)
    task = console.task("empty: events", 1_000, "events")
    task.update(500)
    task.close("1,000 events at 100/s")
    shown = terminal.getvalue()
    assert "\r\x1b[2K" in shown
    assert "[" + "#" * (progress.BAR_WIDTH // 2) + "-" * (progress.BAR_WIDTH // 2) + "]  50.0%" in shown
    assert shown.endswith(" s)\n")
    assert shown.rsplit("\r\x1b[2K", 1)[1].startswith("    empty: events: 1,000 events at 100/s (")

    piped = io.StringIO()
    console = progress.Console(piped, tty=False, clock=clock)
    console.phase_total = 2
    console.phase("drain", "the worker draining")
    task = console.task("empty: events", 1_000, "events")
    for done in range(0, 1_001, 50):  # 21 updates in ~8 s: one plain line per tenth, not one per update
        task.update(done)
    task.close()
    lines = piped.getvalue().splitlines()
    assert lines[0] == "==> [1/2] drain: the worker draining"
    assert lines[1] == "    empty: events: started of 1,000 events"
    assert len([line for line in lines if "%" in line]) == 10
    assert "\r" not in piped.getvalue()


def test_group_timeline_reads_when_an_added_replica_settled_the_group(tmp_path: Path) -> None:
    """Rebalance time and final assignments come from the workers' own JSON log lines (seconds after the
    first processes were spawned); lines after the end of the measurement do not count."""
    spawned = 1_000_000.0

    def log(name: str, *events: tuple[float, str, list[str]]) -> Path:
        path = tmp_path / name
        lines = [
            json.dumps(
                {
                    "event": event,
                    "timestamp": datetime.fromtimestamp(spawned + at, UTC).isoformat().replace("+00:00", "Z"),
                    "partitions": partitions,
                }
            )
            for at, event, partitions in events
        ]
        path.write_text("\n".join(["not json", *lines]) + "\n")
        return path

    first = log(
        "first.log",
        (3.0, "partitions_assigned", ["ev:0", "ev:1", "ev:2", "other:0"]),
        (3.2, "positions_synced", []),
        (9.0, "partitions_revoked", ["ev:0", "ev:1", "ev:2", "other:0"]),
        (11.0, "partitions_assigned", ["ev:0", "ev:2"]),
        (11.1, "positions_synced", []),
        (30.0, "partitions_revoked", ["ev:0", "ev:2"]),  # SIGTERM after the measurement
    )
    added = log("added.log", (11.0, "partitions_assigned", ["ev:1"]), (11.4, "positions_synced", []))
    timeline = replicas.group_timeline([first, added], spawned, until=20.0, joined=6.0, topic="ev")
    assert timeline["first_ready_seconds"] == 3.2
    assert timeline["settled_seconds"] == 11.4
    assert timeline["rebalance_seconds"] == 5.4
    assert timeline["assignments"] == 3
    assert timeline["revocations"] == 1
    assert timeline["final_partitions"] == [[0, 2], [1]]

    samples = [(0.0, 0), (4.0, 100), (6.5, 200), (7.0, 300), (10.5, 300), (11.5, 400), (12.0, 600)]
    assert replicas._longest_stall(samples, 6.0, 12.0) == 4.5  # 7.0 -> 11.5 without a stored offset
