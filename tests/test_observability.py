"""What operators are told to look at exists: every metric named in the docs, the alerts, the KEDA query and
the dashboard is exported by the real running process that owns it (a scrape of its /metrics, not the registry):
``cost_worker_notify_*`` by ``cost-worker notify run``, ``cost_worker_collect_*`` by ``cost-worker collect`` (each
started as its own process, as in production), every other one by the worker."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from tests.factories import api_event, dumps, envelope, make_org, openai_cost_bucket, openai_usage_bucket
from tests.fake_providers import Canned
from tests.kafka_helpers import create_topics, produce, worker_env
from tests.test_budgets import add_budget
from tests.test_collect import COMPLETIONS, World, seed_truth, world  # noqa: F401 - `world`: the fake providers
from tests.test_notify import KEY, Receiver, add, alert_message, ok
from tests.test_operations import eventually, http_get
from worker.app import Worker
from worker.config import Settings
from worker.devstack import free_port

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


# The process that exports a metric, by its name's prefix; every other cost_worker_* metric is the worker's.
COMPONENT_PREFIXES = {"notify": "cost_worker_notify_", "collector": "cost_worker_collect_"}
WORKER = "worker"


def component(name: str) -> str:
    return next((c for c, prefix in COMPONENT_PREFIXES.items() if name.startswith(prefix)), WORKER)


def documented_metrics(of: str | None = None) -> dict[str, set[str]]:
    """Metric (or series) name -> the documents that name it; only the component ``of``'s when given."""
    excluded = NOT_METRICS | sql_identifiers()
    found: dict[str, set[str]] = {}
    for document in DOCUMENTS:
        for word in METRIC_WORD.findall((REPO / document).read_text(encoding="utf-8")):
            if word in excluded or word.startswith("cost_worker_deploy_check"):
                continue
            if of is None or component(word) == of:
                found.setdefault(word, set()).add(document)
    return found


def never_exported(of: str, exported: set[str]) -> list[str]:
    """The component's documented names its scrape lacks. A name matches a series of it (``_total``, ``_bucket``
    ...); a word ending in ``_`` (``cost_worker_notify_*`` in prose) matches any series it starts."""
    missing = []
    for name, documents in sorted(documented_metrics(of).items()):
        stem = name if name.endswith("_") else name + "_"
        if name in exported or any(n.startswith(stem) for n in exported):
            continue
        missing.append(f"{name} (named in {', '.join(sorted(documents))})")
    return missing


def test_documented_metric_names_are_found_in_every_kind_of_document() -> None:
    found = documented_metrics()
    sources = {document for documents in found.values() for document in documents}
    assert sources == set(DOCUMENTS), f"no metric found in {set(DOCUMENTS) - sources}"
    assert "cost_worker_circuit_breaker_invalid_ratio" in found
    assert "cost_worker_owner" not in found, "SQL roles are not metrics"
    # Every component has documented metrics of its own, so each scrape below checks something.
    assert {component(name) for name in found} == {WORKER, *COMPONENT_PREFIXES}
    assert "cost_worker_notify_attempts_total" in documented_metrics("notify")
    assert "cost_worker_collect_active" in documented_metrics("collector")
    assert not [name for name in documented_metrics(WORKER) if name.startswith(tuple(COMPONENT_PREFIXES.values()))]


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
    await add_budget(db, "organization", org, "1000", currency="EUR")  # USD rows converted at EUR/USD
    await add_budget(db, "organization", org, "1000", currency="GBP")  # no GBP rate: unconvertible
    await db.execute(
        "INSERT INTO exchange_rates (base, quote, effective_date, rate, source) "
        "SELECT 'EUR', 'USD', d, 1.05, 'test' FROM generate_series('2026-01-01'::date, '2027-12-31', '1 day') d"
    )
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
        "cost_worker_budget_converted_rows_total",
        "cost_worker_budget_unconvertible_total",
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
    # The breaker's gauge says what its window holds: 5 invalid among the 26 messages, once every one of them is
    # seen (the alert may be raised by a batch that does not hold the junk yet).
    seen: list[float] = []

    async def breaker_settled() -> bool:
        samples, _ = await asyncio.to_thread(scrape, port)
        seen[:] = [v for k, v in samples.items() if k.startswith("cost_worker_circuit_breaker_invalid_ratio{")]
        return seen == [pytest.approx(5 / 26)]

    try:
        await eventually(breaker_settled, timeout=30)
    except AssertionError:
        pytest.fail(f"the breaker's gauge never showed 5 of 26 messages invalid: {seen}")

    # The provider's cost report for the events' hour says they cost less than the estimate: spend falls below the
    # open alert's level in that period and the batch resolves it. (Not left to the sweep: it evaluates the current
    # period, which holds the events' fixed date only during their month.)
    costs = openai_cost_bucket("2026-11-21T10:00:00", "2026-11-21T11:00:00", [("proj_a", "x", "0.001")])
    report = envelope("openai", org.ai_org, "costs_v1", [costs], collected_at="2026-11-22T00:00:00Z")
    await produce(settings, settings.topic_provider_buckets, [dumps(report)])
    wanted.add("cost_worker_alerts_resolved_total")
    try:
        result = await eventually(settled, timeout=30)
    except AssertionError:
        pytest.fail(f"never exported: {sorted(wanted - last[0])}")
    samples, _ = result
    exported = names(samples)

    missing = never_exported(WORKER, exported)
    assert not missing, "documented but never exported by a running worker:\n" + "\n".join(missing)


def tail(log: Path) -> str:
    return log.read_text(encoding="utf-8")[-3000:]


async def scrape_process(
    process: subprocess.Popen[bytes], port: int, wanted: set[str], log: Path
) -> tuple[dict[str, float], set[str]]:
    """Scrape a child process' /metrics until every name in ``wanted`` is among its series."""
    last: list[set[str]] = [set()]

    async def settled() -> tuple[dict[str, float], set[str]] | None:
        assert process.poll() is None, f"the process exited: {tail(log)}"
        try:
            samples, families = await asyncio.to_thread(scrape, port)
        except OSError:  # not listening yet
            return None
        last[0] = names(samples)
        return (samples, families) if wanted <= last[0] else None

    try:
        result: tuple[dict[str, float], set[str]] = await eventually(settled, timeout=60)
    except AssertionError:
        pytest.fail(f"never exported: {sorted(wanted - last[0])}\n{tail(log)}")
    return result


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def spawn(settings: Settings, args: list[str], log: Path, **extra: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env(settings, **extra),
        )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A local webhook receiver that accepts every delivery."""
    sink = Receiver(ok)
    app = web.Application()
    app.router.add_post("/hook/{token}", sink.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook/sink"
    yield sink
    await runner.cleanup()


async def test_every_documented_notify_metric_is_exported_by_a_running_notify_process(
    db: asyncpg.Connection,
    settings: Settings,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    notify_settings = settings.model_copy(
        update={
            "notify_secrets_key": SecretStr(KEY),
            "notify_allow_http": True,
            "notify_allowed_networks": "127.0.0.0/8",
        }
    )
    await create_topics(settings)
    org = await make_org(db)
    await add(notify_settings, capsys, org, receiver.url)
    # A matching alert (delivered), and one that is not an alert message at all.
    await produce(settings, settings.topic_budget_alerts, [alert_message(org), b"not json"])
    port = free_port()
    log = tmp_path / "notify.log"
    process = spawn(
        settings,
        ["notify", "run"],
        log,
        COST_WORKER_METRICS_PORT=str(port),
        COST_WORKER_NOTIFY_SECRETS_KEY=KEY,
        COST_WORKER_NOTIFY_ALLOW_HTTP="true",
        COST_WORKER_NOTIFY_ALLOWED_NETWORKS="127.0.0.0/8",
    )
    try:
        wanted = {"cost_worker_notify_delivery_latency_seconds_count", "cost_worker_notify_alerts_total"}
        samples, _ = await scrape_process(process, port, wanted, log)
    finally:
        stop(process)
    exported = names(samples)
    missing = never_exported("notify", exported)
    assert not missing, "documented but never exported by a running notify process:\n" + "\n".join(missing)
    # This process's own figures: one delivery, made by it.
    assert samples["cost_worker_notify_attempts_total{kind=webhook,outcome=delivered}"] == 1
    assert len(receiver.requests) == 1


async def test_every_documented_collector_metric_is_exported_by_a_running_collector_process(
    world: World,  # noqa: F811 - the fixture imported from tests.test_collect
    tmp_path: Path,
) -> None:
    seed_truth(world.fake)  # one good account per provider; org-bad's key is refused (401)
    world.fake.script[("org-oa", COMPLETIONS)] = [Canned(403)]  # one endpoint refused to org-oa's key (403)
    port = free_port()
    log = tmp_path / "collector.log"
    process = spawn(
        world.settings,
        ["collect"],
        log,
        COST_WORKER_METRICS_PORT=str(port),
        COST_WORKER_DATABASE_ROLE="cost_worker_collector",
    )
    try:
        wanted = {
            "cost_worker_collect_buckets_published_total",
            "cost_worker_collect_auth_failures_total",
            "cost_worker_collect_endpoint_refused",
            "cost_worker_collect_seconds_since_last_success",
        }
        samples, _ = await scrape_process(process, port, wanted, log)
    finally:
        stop(process)
    exported = names(samples)
    missing = never_exported("collector", exported)
    assert not missing, "documented but never exported by a running collector process:\n" + "\n".join(missing)
    assert samples["cost_worker_collect_active{}"] == 1, "the only replica holds the poller lock"
