"""What operators are told to look at exists: every metric named in the docs, the alerts, the KEDA query and
the dashboard is exported by a real running worker (a scrape of its /metrics, not the registry)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import api_event, dumps, envelope, make_org, openai_usage_bucket
from tests.kafka_helpers import create_topics, produce
from tests.test_budgets import add_budget
from tests.test_operations import eventually, http_get
from worker.app import Worker
from worker.config import Settings

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = (
    "README.md",
    "deploy/README.md",
    "deploy/base/prometheusrule.yaml",
    "deploy/base/scaledobject.yaml",
    "deploy/grafana/cost-worker.json",
)
# cost_worker_* words in those documents that are database objects, not metrics: the logins of the
# deployment guide, and every identifier the SQL under schema/ defines (roles, functions).
NOT_METRICS = {"cost_worker_app", "cost_worker_migrator"}
METRIC_WORD = re.compile(r"\bcost_worker_[a-z0-9_]+\b")


def sql_identifiers() -> set[str]:
    words: set[str] = set()
    for path in (REPO / "schema").rglob("*.sql"):
        words |= set(METRIC_WORD.findall(path.read_text(encoding="utf-8")))
    return words


def documented_metrics() -> dict[str, set[str]]:
    """Metric (or series) name -> the documents that name it."""
    excluded = NOT_METRICS | sql_identifiers()
    found: dict[str, set[str]] = {}
    for document in DOCUMENTS:
        for word in METRIC_WORD.findall((REPO / document).read_text(encoding="utf-8")):
            if word not in excluded and not word.startswith("cost_worker_deploy_check"):
                found.setdefault(word, set()).add(document)
    return found


def test_documented_metric_names_are_found_in_every_kind_of_document() -> None:
    found = documented_metrics()
    sources = {document for documents in found.values() for document in documents}
    assert sources == set(DOCUMENTS), f"no metric found in {set(DOCUMENTS) - sources}"
    assert "cost_worker_circuit_breaker_invalid_ratio" in found
    assert "cost_worker_owner" not in found, "SQL roles are not metrics"


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[Worker]:
    """A worker in this process whose statements time out after a second (so a held lock makes it retry)."""
    settings = settings.model_copy(update={"database_statement_timeout": 1.0})
    await create_topics(settings)
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())

    async def listening() -> bool:
        return worker.http is not None and worker.http.port != 0 and worker.consumer is not None

    await eventually(listening)
    yield worker
    worker.stop.set()
    assert await asyncio.wait_for(task, 60) == 0


def scrape(port: int) -> tuple[dict[str, float], set[str]]:
    """(sample name with labels -> value, declared family names) of one /metrics scrape."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples: dict[str, float] = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(body):
        families.add(family.name)
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples, families


def names(samples: dict[str, float]) -> set[str]:
    return {key.split("{", 1)[0] for key in samples}


async def test_every_documented_metric_is_exported_by_a_running_worker(
    db: asyncpg.Connection, settings: Settings, running: Worker
) -> None:
    assert running.http is not None
    port = running.http.port
    org = await make_org(db)
    await add_budget(db, "organization", org, "0.01", thresholds=(50,))  # crossed: an alert, the outbox
    await add_budget(db, "organization", org, "1000", currency="EUR")  # USD rows left out of a EUR budget
    good = [dumps(api_event(org, project=org.projects["proj_a"])) for _ in range(20)]
    junk = [b"not json", b"{", b"\xff\xfe", b"[]", b'{"event_id": 1}']
    usage = envelope(
        "openai",
        org.ai_org,
        "usage_v1",
        [
            openai_usage_bucket(
                "2026-11-20T00:00:00",
                "2026-11-20T01:00:00",
                [{"project_id": "proj_a", "model": "x-1", "input_tokens": 10}],
            )
        ],
    )
    # A message the producer refuses (larger than its max request size), as a broker rejecting a publish would.
    await db.execute(
        "INSERT INTO outbox (topic, key, value) VALUES ($1, $2, $3)",
        settings.topic_dead_letter,
        b"oversized",
        b"x" * (8 * 1_048_576),
    )
    # A held lock outlasts the worker's statement timeout: the batch fails transiently and is retried.
    async with db.transaction():
        await db.execute("LOCK TABLE api_usage IN ACCESS EXCLUSIVE MODE")
        await produce(settings, settings.topic_api_usage, [*good, *junk])
        await produce(settings, settings.topic_provider_buckets, [dumps(usage)])

        async def retried() -> bool:
            samples, _ = await asyncio.to_thread(scrape, port)
            return "cost_worker_database_retries_total" in names(samples)

        await eventually(retried, timeout=30)

    wanted = {
        "cost_worker_alerts_raised_total",
        "cost_worker_outbox_published_total",
        "cost_worker_unpriced_usage_lines_total",
        "cost_worker_budget_foreign_currency_rows_total",
        "cost_worker_outbox_failures_total",
    }

    last: list[set[str]] = [set()]

    async def settled() -> tuple[dict[str, float], set[str]] | None:
        samples, families = await asyncio.to_thread(scrape, port)
        last[0] = names(samples)
        return (samples, families) if wanted <= last[0] else None

    try:
        result = await eventually(settled, timeout=30)
    except AssertionError:
        pytest.fail(f"never exported: {sorted(wanted - last[0])}")
    samples, _ = result
    exported = names(samples)

    missing = []
    for name, documents in sorted(documented_metrics().items()):
        if name in exported or any(n.startswith(name + "_") for n in exported):
            continue
        missing.append(f"{name} (named in {', '.join(sorted(documents))})")
    assert not missing, "documented but never exported by a running worker:\n" + "\n".join(missing)

    # The breaker's gauge says what its window holds: 5 invalid among the 26 messages seen so far.
    (ratio,) = [v for k, v in samples.items() if k.startswith("cost_worker_circuit_breaker_invalid_ratio{")]
    assert ratio == pytest.approx(5 / 26)
