"""Metrics, health and tracing, observed from outside the pod."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.app import start_pod
from service.client import MailboxClient
from service.config import Settings
from service.handlers import RunContext
from service.protocol import SubmitRequest

from .conftest import unique_prefix
from .pods import fast_settings, submit, wait_for, wait_runs

ROOT = Path(__file__).resolve().parent.parent


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


async def test_metrics_count_what_happened(nats_url):
    prefix = unique_prefix("met")
    settings = fast_settings(prefix, metrics_port=0, health_port=0)
    control = await start_pod(settings, url=nats_url, handler="echo", start_worker=False, start_api=False)
    pod = await start_pod(settings, url=nats_url, handler="echo", serve_http=True, start_api=False)
    try:
        ids = [await submit(control, f"t{i % 3}", f"run {i}") for i in range(6)]
        await wait_runs(pod, ids)
        await pod.worker.sweep()  # the maintenance leader refreshes the depth gauges
        status, text = await http_get(pod.http[0].port, "/metrics")
        assert status == 200
        assert sample(text, "mailbox_runs_total", outcome="completed") == 6
        assert sample(text, "mailbox_signal_pulled_total") > 0
        assert sample(text, "mailbox_signal_ack_total") > 0
        assert sample(text, "mailbox_operations_total", operation="claim", result="ok") >= 6
        assert sample(text, "mailbox_dispatch_enqueue_to_start_seconds_count") == 6
        assert sample(text, "mailbox_dispatch_claim_to_start_seconds_count") == 6
        assert sample(text, "mailbox_dispatch_runtime_seconds_count", outcome="completed") == 6
        assert sample(text, "mailbox_dispatch_depth", status="acked") == 6
        assert sample(text, "mailbox_active_runs") == 0
        assert "mailbox_lease_renewals_total" in text and "mailbox_live_deliveries_total" in text
        assert sample(text, "mailbox_nats_requests_total", kind="write") >= 6 * 3  # claim, start, complete
        assert sample(text, "mailbox_nats_requests_total", kind="event_publish") >= 6 * 2
        status, _ = await http_get(pod.http[0].port, "/nope")
        assert status == 404
    finally:
        await pod.stop()
        await control.stop()


async def test_readyz_follows_the_nats_connection(nats_server):
    settings = fast_settings(unique_prefix("rdy"), metrics_port=0, health_port=0)
    pod = await start_pod(settings, url=nats_server.url, handler="echo", serve_http=True, start_api=False)
    port = pod.http[1].port
    try:
        assert await http_get(port, "/healthz") == (200, "ok\n")
        assert (await http_get(port, "/readyz"))[0] == 200
        nats_server.stop()

        async def unready() -> bool:
            return (await http_get(port, "/readyz"))[0] == 503

        await wait_for(unready, timeout=10)
        assert (await http_get(port, "/healthz"))[0] == 200  # alive all the same
        nats_server.start()

        async def ready() -> bool:
            return (await http_get(port, "/readyz"))[0] == 200

        await wait_for(ready, timeout=15)
    finally:
        await pod.stop()


async def test_one_trace_from_the_caller_through_the_signal_to_the_handler(nats_url, tmp_path):
    """The caller (this process) and the pod (another process) export spans separately; the
    submit span and the handler's span share the caller's trace id."""
    prefix = unique_prefix("trc")
    spans_file = tmp_path / "spans.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "tests.traced_pod", nats_url, prefix, str(spans_file)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        provider = TracerProvider()
        tracer = provider.get_tracer("caller")
        client = await MailboxClient.connect(nats_url, prefix=prefix)
        try:
            with tracer.start_as_current_span("caller.request") as root:
                trace_id = format(root.get_span_context().trace_id, "032x")
                reply = await client.submit("t", "traced")
            view = await client.wait(reply.run_id, timeout=20)
            assert view.status == "done"
        finally:
            await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
        by_name = {s["name"]: s for s in spans}
        for name in ("mailbox.submit", "mailbox.execute", "handler.work"):
            assert by_name[name]["trace_id"] == trace_id, (name, spans)
        assert by_name["handler.work"]["parent_id"] == by_name["mailbox.execute"]["span_id"]
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_without_an_exporter_each_handler_still_joins_its_callers_trace(nats_url, monkeypatch):
    """Tracing off in the service (no OTEL_* settings): it records nothing, but each run's
    trace context still passes through, so spans the handler's own code makes join the trace
    of the caller that submitted that run, also for a run chained after another caller's."""
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    exporter = InMemorySpanExporter()
    user_provider = TracerProvider()
    user_provider.add_span_processor(SimpleSpanProcessor(exporter))
    user_tracer = user_provider.get_tracer("user")
    second_queued = asyncio.Event()

    async def handler(run: RunContext):
        if run.input == "first":
            await second_queued.wait()  # the second run is chained after this one
        with user_tracer.start_as_current_span(f"handler.{run.input}"):
            return run.input

    pod = await start_pod(fast_settings(unique_prefix("pt")), url=nats_url, handler=handler)
    client = await MailboxClient.connect(nats_url, prefix=pod.settings.prefix)
    try:
        roots = {}
        replies = []
        for name in ("first", "second"):
            with user_tracer.start_as_current_span(f"caller.{name}") as roots[name]:
                replies.append(await client.submit("t", name))
        second_queued.set()
        for reply in replies:
            assert (await client.wait(reply.run_id, timeout=20)).status == "done"
        spans = {s.name: s for s in exporter.get_finished_spans()}
        assert sorted(spans) == ["caller.first", "caller.second", "handler.first", "handler.second"]
        for name in ("first", "second"):
            work, root = spans[f"handler.{name}"], roots[name].get_span_context()
            assert work.context.trace_id == root.trace_id and work.parent.span_id == root.span_id, name
    finally:
        await client.close()
        await pod.stop()
