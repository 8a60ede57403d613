"""The README and the published schemas say what the code does (they are generated or checked here)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY

from worker import metrics  # noqa: F401 - registers the metrics
from worker.cli import COMMANDS
from worker.config import settings_table
from worker.models import json_schemas
from worker.quarantine import Reason

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def between(text: str, marker: str) -> str:
    start = text.index(f"<!-- {marker}:start -->\n") + len(f"<!-- {marker}:start -->\n")
    return text[start : text.index(f"<!-- {marker}:end -->")]


def test_configuration_table_is_generated_from_the_settings() -> None:
    assert between(README, "settings-table").strip() == settings_table().strip(), (
        "README's configuration table is stale: paste the output of `python -m worker.config`"
    )


def test_published_json_schemas_match_the_models() -> None:
    directory = ROOT / "schema" / "events"
    for name, text in json_schemas().items():
        assert (directory / name).read_text(encoding="utf-8") == text, (
            f"schema/events/{name} is stale: run `python -m worker.models schema/events`"
        )


def test_every_quarantine_reason_is_documented() -> None:
    table = README[README.index("### Quarantine reasons") :]
    for reason in Reason:
        assert f"`{reason.value}`" in table, reason


def test_every_metric_is_documented() -> None:
    exported = {metric.name for metric in REGISTRY.collect() if metric.name.startswith("cost_worker_")}
    assert len(exported) > 15
    for name in exported:
        documented = name if f"`{name}" in README else f"{name}_total"  # counters are collected without _total
        assert f"`{documented}" in README, name


def test_every_command_and_both_make_targets_are_documented() -> None:
    for command in COMMANDS:
        assert re.search(rf"`cost-worker {re.escape(command)}\b", README), command
    assert "make dev" in README
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_collector_log_line_is_documented() -> None:
    """Operators search the collector's log by event name: each one it writes is named in its README section."""
    section = README[README.index("## Collecting from the providers") : README.index("## Configuration")]
    events = set()
    for path in (ROOT / "worker" / "collect").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        events |= set(re.findall(r'\blog\.(?:debug|info|warning|error|exception)\(\s*"([a-z_]+)"', text))
    assert len(events) > 10
    assert sorted(name for name in events if f"`{name}`" not in section) == []
