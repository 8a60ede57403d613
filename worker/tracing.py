"""Optional OpenTelemetry tracing: off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

One span per batch (``batch``) with the children ``decode``, ``database`` and ``kafka_commit``; the batch log
line carries its ``trace_id``. The exporter is OTLP over HTTP, configured by the standard ``OTEL_*`` variables
(endpoint, headers, timeout, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``). The asyncpg and aiokafka
instrumentations are switched on when importable, unless named in ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS``;
their spans (statements, produce/consume) nest under the batch's stages.

When tracing is off the tracer is OpenTelemetry's no-op one: a batch costs a few non-recording span objects.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace
from opentelemetry.trace import Span, Tracer, format_span_id, format_trace_id

from worker import __version__

if TYPE_CHECKING:  # the SDK is imported only when tracing is switched on
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["Span", "child", "configure", "instrument_drivers", "log_fields", "shutdown", "stage", "start_batch", "use"]

log = structlog.get_logger("worker.tracing")

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
DISABLED_ENV = "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"
SERVICE_NAME = "cost-worker"
INSTRUMENTATIONS = {  # name in OTEL_PYTHON_DISABLED_INSTRUMENTATIONS -> (module, instrumentor class)
    "asyncpg": ("opentelemetry.instrumentation.asyncpg", "AsyncPGInstrumentor"),
    "aiokafka": ("opentelemetry.instrumentation.aiokafka", "AIOKafkaInstrumentor"),
}

_tracer: Tracer = trace.NoOpTracer()


def configure(environ: Mapping[str, str] = os.environ, *, set_global: bool = True) -> TracerProvider | None:
    """Set up tracing from the environment; ``None`` (and nothing changes) when no endpoint is set."""
    if not environ.get(ENDPOINT_ENV):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    attributes: dict[str, str] = {"service.version": __version__}
    if not environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    use(provider)
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def use(provider: trace.TracerProvider | None) -> None:
    """Make the worker's spans go to ``provider`` (``None``: back to the no-op tracer)."""
    global _tracer  # noqa: PLW0603 - one tracer for the process, like OpenTelemetry's own global
    _tracer = trace.NoOpTracer() if provider is None else provider.get_tracer("worker", __version__)


def instrument_drivers(provider: trace.TracerProvider, environ: Mapping[str, str] = os.environ) -> list[Any]:
    """Switch on the installed driver instrumentations; returns the instrumentors (to uninstrument)."""
    disabled = {name.strip() for name in environ.get(DISABLED_ENV, "").split(",")}
    done = []
    for name, (module, cls) in INSTRUMENTATIONS.items():
        if name in disabled:
            continue
        try:
            instrumentor = getattr(importlib.import_module(module), cls)()
        except ImportError:
            log.info("tracing_instrumentation_missing", instrumentation=name)
            continue
        instrumentor.instrument(tracer_provider=provider)
        done.append(instrumentor)
    return done


def shutdown(provider: TracerProvider | None) -> None:
    """Export what is buffered (the exporter's own timeout bounds it)."""
    if provider is not None:
        provider.shutdown()


def start_batch() -> Span:
    """The span of one batch; the caller ends it when the batch is committed, fenced or abandoned."""
    return _tracer.start_span("batch")


def child(batch: Span, name: str) -> Span:
    """A child span of the batch that is not made current (CPU-only work: nothing nests under it)."""
    return _tracer.start_span(name, context=trace.set_span_in_context(batch))


@contextmanager
def stage(batch: Span, name: str) -> Iterator[Span]:
    """A child span of the batch, current while the block runs (driver spans nest under it)."""
    with _tracer.start_as_current_span(name, context=trace.set_span_in_context(batch)) as span:
        yield span


def log_fields(span: Span) -> dict[str, str]:
    """``trace_id``/``span_id`` for a log line, when the span is recorded."""
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format_trace_id(context.trace_id), "span_id": format_span_id(context.span_id)}
