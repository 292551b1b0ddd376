"""One pod, assembled: NATS connection, store, signals, events, worker manager, control plane.

`mailbox serve` builds a `Pod` from Settings; tests build several on separate connections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST

from .api import start_api as start_api_service
from .config import Settings
from .connection import ConnectError, connect, connect_options  # noqa: F401  (re-exported)
from .events import EventStream
from .handlers import Handler, load_handler
from .health import HttpEndpoints, text
from .mailbox import Mailbox
from .metrics import Metrics
from .signals import Signals
from .store import NatsDispatchStore
from .tracing import tracer_from_env
from .worker import WorkerManager, wall_clock_ms

log = logging.getLogger("mailbox.app")


@dataclass
class Pod:
    nc: NATS
    store: NatsDispatchStore
    signals: Signals
    events: EventStream
    worker: WorkerManager
    mailbox: Mailbox
    settings: Settings
    metrics: Metrics
    api: Any = None
    """The `mailbox` micro service (service.api.ApiService) when started with `start_api=True`."""
    http: list[HttpEndpoints] = field(default_factory=list)
    """/metrics and /healthz, /readyz servers when started with `serve_http=True`."""

    def nats_requests(self) -> dict[str, int]:
        """NATS requests this pod made so far, by kind (a cost measure: round trips)."""
        st = self.store.stats
        return {
            "thread_read": st.snapshots,
            "thread_probe": st.probes,
            "key_read": st.gets,
            "write": st.publishes,
            "atomic_batch": st.batches,
            "signal_publish": self.signals.published,
            "signal_fetch": self.signals.fetches,
            "event_publish": self.events.published,
        }

    def ready(self) -> tuple[bool, str]:
        """Ready = NATS connected, streams and bucket verified (done at start), worker loop running."""
        if not self.nc.is_connected:
            return False, "nats disconnected"
        if self.worker.signals is not None and self.mailbox.worker is not None and not self.worker.signal_loop_running:
            return False, "worker loop not running"
        return True, "ready"

    async def serve_http(self) -> None:
        """Start /metrics (MAILBOX_METRICS_PORT) and /healthz, /readyz (MAILBOX_HEALTH_PORT)."""

        async def metrics() -> tuple[int, str, bytes]:
            return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()

        async def healthz() -> tuple[int, str, bytes]:
            return text(200, "ok\n")

        async def readyz() -> tuple[int, str, bytes]:
            ok, why = self.ready()
            return text(200 if ok else 503, why + "\n")

        self.http.append(await HttpEndpoints({"/metrics": metrics}, port=self.settings.metrics_port).start())
        self.http.append(
            await HttpEndpoints({"/healthz": healthz, "/readyz": readyz}, port=self.settings.health_port).start()
        )

    async def stop(self, drain_timeout_ms: int | None = None) -> None:
        """Graceful: stop the API (requests in flight finish), drain the worker, then close everything."""
        if self.api is not None:
            await self.api.stop()
        await self.worker.stop(drain_timeout_ms)
        for server in self.http:
            await server.stop()
        await self.events.close()
        await self.signals.close()
        await self.store.close()
        try:
            await self.nc.drain()
        except Exception:  # already closed or reconnecting: nothing left to flush
            pass

    async def kill(self) -> None:
        """Abrupt: drop the connection without settling anything (a crashed pod, as far
        as NATS can tell); in-flight tasks are cancelled."""
        if self.api is not None:
            self.api.abort()
        self.worker._stopping = True
        for t in list(self.worker._loops):
            t.cancel()
        for e in self.worker._executions():
            if e.task is not None:
                e.task.cancel()
        try:
            await self.nc.close()
        except Exception:
            pass


async def start_pod(
    settings: Settings,
    *,
    url: str | None = None,
    handler: Handler | str | None = None,
    consumer_id: str | None = None,
    clock: Callable[[], int] = wall_clock_ms,
    start_worker: bool = True,
    recover: bool = True,
    start_api: bool = True,
    serve_http: bool = False,
    tracer: Any = None,
) -> Pod:
    """Connect and start one pod (with the `mailbox` micro service unless `start_api=False`;
    with its /metrics, /healthz and /readyz endpoints if `serve_http`)."""
    nc = await connect(settings, url)
    metrics = Metrics()
    tracer = tracer or tracer_from_env()
    try:
        store = await NatsDispatchStore.connect(nc, prefix=settings.prefix, replicas=settings.replicas)
        signals = Signals(nc, settings.prefix)
        await signals.ensure(
            replicas=settings.replicas,
            ack_wait_ms=settings.ack_wait_ms,
            max_ack_pending=settings.max_ack_pending,
            max_deliver=settings.max_deliver,
        )
        events = EventStream(nc, settings.prefix)
        await events.ensure(replicas=settings.replicas, max_age_ms=settings.events_max_age_ms)
        resolved = load_handler(handler if isinstance(handler, str) else settings.handler) if not callable(handler) else handler
        worker = WorkerManager(
            store=store,
            handler=resolved,
            settings=settings,
            signals=signals,
            events=events,
            nc=nc,
            consumer_id=consumer_id,
            clock=clock,
            metrics=metrics,
            tracer=tracer,
        )
        mailbox = Mailbox(
            store=store,
            prefix=settings.prefix,
            signals=signals,
            events=events,
            nc=nc,
            worker=worker if start_worker else None,
            max_payload=settings.max_payload,
            default_max_attempts=settings.max_attempts,
            clock=clock,
            tracer=tracer,
            metrics=metrics,
        )
        if start_worker:
            await worker.start(recover=recover)
        pod = Pod(nc=nc, store=store, signals=signals, events=events, worker=worker, mailbox=mailbox,
                  settings=settings, metrics=metrics)
        metrics.count_nats_requests(pod.nats_requests)
        if serve_http:
            await pod.serve_http()
        if start_api:
            try:
                pod.api = await start_api_service(pod)
            except BaseException:
                await worker.stop(0)
                raise
    except BaseException:
        await nc.close()
        raise
    return pod
