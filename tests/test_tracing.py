"""OpenTelemetry tracing: off by default; when on, one span per batch with decode, database and kafka_commit
children, driver spans nested under them, and the batch log line carrying the trace id."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_trace_id
from structlog.testing import capture_logs

from tests.factories import api_event, dumps, make_org
from tests.kafka_helpers import create_topics, produce, run_worker_until
from worker import tracing
from worker.config import Settings


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """The worker's spans go to memory for this test (the process-wide provider is left alone)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    instrumentors = tracing.instrument_drivers(provider, {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "aiokafka"})
    try:
        yield memory
    finally:
        for instrumentor in instrumentors:
            instrumentor.uninstrument()
        tracing.use(None)
        provider.shutdown()


def test_off_unless_an_endpoint_is_set() -> None:
    assert tracing.configure({}) is None
    span = tracing.start_batch()
    assert not span.is_recording()
    assert tracing.log_fields(span) == {}


def test_an_endpoint_switches_on_the_otlp_exporter() -> None:
    provider = tracing.configure({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, set_global=False)
    try:
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "cost-worker"
        span = tracing.start_batch()  # never ended, so never exported (nothing listens there)
        assert span.is_recording()
        assert set(tracing.log_fields(span)) == {"trace_id", "span_id"}
    finally:
        tracing.use(None)
        assert provider is not None
        provider.shutdown()
    assert trace.get_tracer_provider() is not provider


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_one_span_per_batch_with_stages_and_the_trace_id_in_the_log_line(
    db: asyncpg.Connection, settings: Settings, exporter: InMemorySpanExporter
) -> None:
    await create_topics(settings)
    org = await make_org(db)
    await produce(settings, settings.topic_api_usage, [dumps(api_event(org)) for _ in range(12)])

    async def landed() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM api_usage WHERE organization_id = $1", org.id) == 12)

    with capture_logs() as logs:
        assert await run_worker_until(settings, landed) == 0

    spans = list(exporter.get_finished_spans())
    batches = [s for s in spans if s.name == "batch"]
    batch_lines = [line for line in logs if line["event"] == "batch"]
    assert batches
    assert len(batch_lines) == len(batches), "every batch that committed logged once, under its own span"
    logged = {line["trace_id"] for line in batch_lines}
    assert logged == {format_trace_id(b.context.trace_id) for b in batches if b.context is not None}
    assert sum(line["messages"] for line in batch_lines) == 12

    for batch in batches:
        stages = children(spans, batch)
        assert [s.name for s in stages] == ["decode", "database", "kafka_commit"]
        assert all(s.context is not None and batch.context is not None for s in stages)
        assert {s.context.trace_id for s in stages if s.context} == {batch.context.trace_id if batch.context else 0}
        (database,) = [s for s in stages if s.name == "database"]
        # The asyncpg instrumentation's statement spans nest under the database stage.
        statements = children(spans, database)
        assert statements, "no asyncpg spans under the database stage"
        assert all(s.attributes and s.attributes.get("db.system") == "postgresql" for s in statements)
