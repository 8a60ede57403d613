"""The fault suite's figures: each scenario records them, and a run can write them to RESULTS.md.

``COST_WORKER_FAULT_RESULTS=path`` (set by ``make test-faults``) writes the Markdown table at the end of the
session; without it nothing is written.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.faults.harness import RESULTS, Record

STARTED = time.monotonic()


def render(records: list[Record], wall: float) -> str:
    passed = sum(1 for r in records if r.passed)
    lines = [
        "# Fault suite results",
        "",
        f"Produced by `make test-faults` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
        f"({platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}); "
        f"the whole run took {wall / 60:.1f} minutes.",
        "",
        "| scenario | result | faults injected | messages | bad inputs | alerts | events lost | double counted "
        "| duplicate alerts | re-published (at least once) | seconds | observed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        kinds = f" ({', '.join(sorted(set(r.fault_kinds)))})" if r.fault_kinds else ""
        lines.append(
            f"| {r.name} | {'passed' if r.passed else 'FAILED'} | {r.faults}{kinds} | {r.messages} | {r.bad_inputs} "
            f"| {r.alerts} | {r.lost} | {r.double_counted} | {r.duplicate_alerts} | {r.republished} | {r.seconds:.0f} "
            f"| {'; '.join(r.notes)} |"
        )
    total = Record("total")
    for r in records:
        total.faults += r.faults
        total.messages += r.messages
        total.bad_inputs += r.bad_inputs
        total.alerts += r.alerts
        total.lost += r.lost
        total.double_counted += r.double_counted
        total.duplicate_alerts += r.duplicate_alerts
        total.republished += r.republished
        total.seconds += r.seconds
    lines += [
        f"| **{passed} of {len(records)} passed** | | **{total.faults}** | **{total.messages}** "
        f"| **{total.bad_inputs}** "
        f"| **{total.alerts}** | **{total.lost}** | **{total.double_counted}** | **{total.duplicate_alerts}** "
        f"| {total.republished} | {total.seconds:.0f} | |",
        "",
        "Events lost: expected rows missing from `api_usage`/`cost_data`. Double counted: requests in the rollups or",
        "events beyond the expected ones. Duplicate alerts: `budget_alerts` rows for an already alerted (budget,",
        "period, threshold). Re-published: extra copies of an alert or dead letter on the output topics, which",
        "at-least-once publishing allows (consumers dedupe on the stable alert id or the source coordinates).",
        "",
    ]
    return "\n".join(lines)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get("COST_WORKER_FAULT_RESULTS")
    if target and RESULTS:
        Path(target).write_text(render(RESULTS, time.monotonic() - STARTED), encoding="utf-8")
