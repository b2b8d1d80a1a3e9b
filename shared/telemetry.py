"""Logging (structlog) and tracing (OpenTelemetry), with trace context carried in NATS headers.

`setup(service, settings)` configures both once per process. Logs are JSON in services
and console-friendly for humans; every line carries the bound context (run, rollout and
trace ids where they exist), with credentials masked (shared/redact.py). Spans export over
OTLP/HTTP only when an endpoint is set.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from shared import redact
from shared.config import ServiceSettings

_configured = False
_exporting = False  # spans are only worth creating when something exports them


def setup(service: str, settings: ServiceSettings) -> structlog.stdlib.BoundLogger:
    """Configure logs and traces for this process and return its logger."""
    global _configured
    if not _configured:
        _setup_logging(settings.log_format, settings.log_level)
        _setup_tracing(service, settings.otlp_endpoint)
        _configured = True
        global _tracer, _exporting
        _tracer = None  # re-resolve against the provider just installed
        _exporting = bool(settings.otlp_endpoint)
    return structlog.get_logger(service).bind(service=service)


def _setup_logging(fmt: str, level: str) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_ids,
            structlog.processors.format_exc_info,
            # After format_exc_info, so a traceback's text is redacted too; last before rendering.
            redact.redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through stdlib logging (uvicorn, nats) go to stderr at warning+,
    # redacted like our own lines.
    redact.install_stdlib_redaction()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)


def _add_trace_ids(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    span = trace.get_current_span()
    ctx = span.get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def _setup_tracing(service: str, endpoint: str | None) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": f"relayrl-{service}"}))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
    trace.set_tracer_provider(provider)


_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    # Cached: get_tracer() compares instrumentation scopes on every call (hot in per-message paths).
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer("relayrl")
    return _tracer


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Return `headers` with the current W3C trace context (`traceparent`) added."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


@contextmanager
def span_from_headers(name: str, headers: Mapping[str, str] | None, **attributes: Any) -> Iterator[trace.Span]:
    """Continue the trace whose context rides in NATS `headers`.

    With an exporter configured this starts a child span; without one it only attaches the
    incoming context (a fraction of the cost per message) so logs and trajectories still
    carry the trace id that the gateway started."""
    ctx = propagate.extract(dict(headers or {}))
    token = otel_context.attach(ctx)
    try:
        if _exporting:
            with tracer().start_as_current_span(name, attributes=attributes) as span:
                yield span
        else:
            yield trace.get_current_span()
    finally:
        otel_context.detach(token)


@contextmanager
def child_span(name: str, parent: otel_context.Context | None, **attributes: Any) -> Iterator[trace.Span | None]:
    """A span under `parent` (a context captured earlier, e.g. in another task), or None when
    nothing exports spans (then this costs nothing)."""
    if not _exporting:
        yield None
        return
    with tracer().start_as_current_span(name, context=parent, attributes=attributes) as span:
        yield span


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
