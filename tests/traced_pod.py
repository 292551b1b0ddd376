"""A pod process with an in-memory span exporter; on SIGTERM it writes its spans as JSON
lines (name, trace_id, span_id, parent_id) to the file given.

    python -m tests.traced_pod <nats_url> <prefix> <spans.jsonl>
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.app import start_pod
from service.handlers import RunContext

from .pods import fast_settings


def main() -> None:
    url, prefix, out = sys.argv[1:4]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    async def handler(run: RunContext):
        with tracer.start_as_current_span("handler.work"):  # a span the user's code creates
            return run.input

    async def run() -> None:
        pod = await start_pod(fast_settings(prefix), url=url, handler=handler, tracer=tracer)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await pod.stop()

    asyncio.run(run())
    with open(out, "w") as f:
        for span in exporter.get_finished_spans():
            f.write(json.dumps({
                "name": span.name,
                "trace_id": format(span.context.trace_id, "032x"),
                "span_id": format(span.context.span_id, "016x"),
                "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
            }) + "\n")


if __name__ == "__main__":
    main()
