"""OpenTelemetry tracing: spans for submit, claim and execution, with the W3C trace
context carried in NATS headers from the submitting service, stored with the run, and
restored around the handler (so it survives signals, retries and pod changes).

Export is configured by the standard `OTEL_*` variables: with `OTEL_EXPORTER_OTLP_ENDPOINT`
(or `OTEL_TRACES_EXPORTER=otlp`) set and `opentelemetry-exporter-otlp` installed, spans go
to the collector; `OTEL_TRACES_EXPORTER=console` prints them; otherwise tracing is a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

log = logging.getLogger("mailbox.tracing")

TRACE_HEADERS = ("traceparent", "tracestate")


def tracer_from_env(environ: Mapping[str, str] | None = None) -> trace.Tracer:
    """A tracer configured by the OTEL_* variables (a no-op tracer when none are set)."""
    env = os.environ if environ is None else environ
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "otlp" if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none")
    if exporter_name == "none":
        return trace.NoOpTracer()
    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "mailbox")}))
    if exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore
        except ImportError:
            log.warning("event=otlp_exporter_missing hint='pip install opentelemetry-exporter-otlp-proto-http'")
            return trace.NoOpTracer()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider.get_tracer("mailbox")


def carrier_from(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The trace headers of an incoming message (empty when it carries none)."""
    if not headers:
        return {}
    return {k: headers[k] for k in TRACE_HEADERS if k in headers}


def current_carrier() -> dict[str, str]:
    """The current span's context as headers to send or store."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from(carrier: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(carrier or {}))
