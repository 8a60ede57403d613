"""The README and the published schemas say what the code does (they are generated or checked here)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY

from tests.hostile import corpus
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


def exported_metrics() -> dict[str, tuple[str, ...]]:
    """Every metric /metrics serves (counters with and without `_total`) -> its label names."""
    names: dict[str, tuple[str, ...]] = {}
    # prometheus_client has no public accessor for a metric's label names before it has a sample.
    for collector in list(REGISTRY._collector_to_names):
        name = getattr(collector, "_name", "")
        if name.startswith("cost_worker_"):
            names[name] = tuple(getattr(collector, "_labelnames", ()))
            if getattr(collector, "_type", "") == "counter":
                names[f"{name}_total"] = names[name]
    return names


def test_every_documented_metric_is_exported_with_its_labels() -> None:
    """The other direction: a name or label the READMEs give must be what /metrics serves.

    A `cost_worker_` name in README.md or deploy/README.md is an exported metric, a database object of schema/
    (functions, views, roles) or one of the example logins deploy/README.md creates; a name written with labels
    (`name{a,b}`) has exactly those labels.
    """
    exported = exported_metrics()
    assert len(exported) > 15
    schema = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "schema").rglob("*.sql"))
    deploy_readme = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    logins = set(re.findall(r"CREATE ROLE (cost_worker_[a-z_]+) +LOGIN", deploy_readme))
    assert logins
    wrong: list[str] = []
    for source, text in (("README.md", README), ("deploy/README.md", deploy_readme)):
        for match in re.finditer(r"(cost_worker_[a-z0-9_]*[a-z0-9])(\{([a-z_, ]*)\})?(_\*)?", text):
            name, labels, wildcard = match.group(1), match.group(3), match.group(4)
            if wildcard:
                if not any(known.startswith(f"{name}_") for known in exported):
                    wrong.append(f"{source}: {name}_* matches no metric")
                continue
            if name in exported:
                if labels is not None and sorted(x.strip() for x in labels.split(",")) != sorted(exported[name]):
                    wrong.append(f"{source}: {name}{{{labels}}}, exported with {{{','.join(exported[name])}}}")
                continue
            if re.search(rf"\b{name}\b", schema) is None and name not in logins:
                wrong.append(f"{source}: {name} is neither an exported metric nor a schema object")
    assert sorted(set(wrong)) == []


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


def test_the_hostile_corpus_is_described_as_it_is() -> None:
    """README's Reliability section counts the hostile corpus; the counts follow the manifest."""
    manifest = corpus.manifest()
    files = sum(1 for entry in manifest if "file" in entry)
    generated = sum(1 for entry in manifest if "generate" in entry)
    reasons = {entry["reason"] for entry in manifest}
    assert reasons == {reason.value for reason in Reason}
    claim = f"{len(manifest)} bad messages ({files} files and {generated} generated"
    assert claim in README, claim
    assert f"covering all {len(reasons)} quarantine reasons" in README, len(reasons)
