"""The benchmark (``make bench``) on a tiny input: it runs every phase and writes well-formed results.

Only the shape of the output is checked, never a timing: the machine running the suite is shared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import report

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("ceilings", "naive", "drain", "latency", "growth", "budgets")


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
    assert results["naive"]["stored"] == results["naive"]["events"]

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

    targets = {t["key"]: t for t in results["targets"]}
    assert set(targets) == {key for key, *_ in report.TARGETS}
    assert {t["status"] for t in targets.values()} <= {"PASS", "FAIL"}

    markdown = (out / "latest.md").read_text()
    assert markdown == (out / f"{results['started_at']}.md").read_text()
    for section in report.SECTIONS:
        assert f"\n## {section}\n" in markdown, section
    for _, what, _, _ in report.TARGETS:
        assert what in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latest.png").read_bytes().startswith(b"\x89PNG")
