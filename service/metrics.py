"""Prometheus metrics (DESIGN.md §6), in a registry of their own (no global state).

Names are listed in the README. Every pod exports its own counters; the depth gauges are
refreshed by the maintenance leader from one scan per sweep.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from collections.abc import Callable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

M = TypeVar("M", Counter, Gauge, Histogram)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _Labelled(Generic[M]):
    """A labelled metric whose children are looked up once per label set: prometheus_client
    checks the values and takes a lock on every `labels` call (a few per run, on the hot path)."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.depth = _Labelled(Gauge("mailbox_dispatch_depth", "Dispatches by status (maintenance leader's last scan)",
                                     ["status"], registry=r))
        self.active_runs = Gauge("mailbox_active_runs", "Runs executing on this pod", registry=r)
        self.operations = _Labelled(Counter("mailbox_operations_total", "Store operations by name and result",
                                            ["operation", "result"], registry=r))
        self.operation_seconds = _Labelled(Histogram("mailbox_operation_duration_seconds", "Store operation latency",
                                                     ["operation"], buckets=LATENCY_BUCKETS, registry=r))
        self.signals_pulled = Counter("mailbox_signal_pulled_total", "Signals fetched", registry=r)
        self.signals_acked = Counter("mailbox_signal_ack_total", "Signals acked", registry=r)
        self.signals_naked = _Labelled(Counter("mailbox_signal_nak_total", "Signals nak'ed", ["delayed"], registry=r))
        self.signals_redelivered = Counter("mailbox_signal_redelivery_total", "Signals delivered more than once",
                                           registry=r)
        self.signals_republished = Counter("mailbox_signal_republish_total", "Signals republished by the sweeper",
                                           registry=r)
        self.enqueue_to_start = Histogram("mailbox_dispatch_enqueue_to_start_seconds",
                                          "From a dispatch's creation to its handler start",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.claim_to_start = Histogram("mailbox_dispatch_claim_to_start_seconds", "From claim to handler start",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.runtime = _Labelled(Histogram("mailbox_dispatch_runtime_seconds", "Handler run time by outcome",
                                           ["outcome"], buckets=LATENCY_BUCKETS, registry=r))
        self.enqueue_to_complete = _Labelled(Histogram("mailbox_dispatch_enqueue_to_complete_seconds",
                                                       "From creation to the end of the attempt, by outcome",
                                                       ["outcome"], buckets=LATENCY_BUCKETS, registry=r))
        self.runs = _Labelled(Counter("mailbox_runs_total", "Run attempts by outcome", ["outcome"], registry=r))
        self.lease_renewals = _Labelled(Counter("mailbox_lease_renewals_total", "Lease renewals by result",
                                                ["result"], registry=r))
        self.reclaims = Counter("mailbox_reclaims_total", "Expired leases reclaimed", registry=r)
        self.live_deliveries = _Labelled(Counter("mailbox_live_deliveries_total", "Live commands sent, by result",
                                                 ["result"], registry=r))
        self.submits = _Labelled(Counter("mailbox_submits_total", "Submits by strategy and result",
                                         ["strategy", "result"], registry=r))

    @contextmanager
    def timed(self, operation: str) -> Iterator[None]:
        """Count and time one store operation; an exception counts as `error`."""
        started = time.perf_counter()
        result = "ok"
        try:
            yield
        except BaseException:
            result = "error"
            raise
        finally:
            self.operations.labels(operation, result).inc()
            self.operation_seconds.labels(operation).observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def count_nats_requests(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export `counts()` (NATS requests made, by kind) as `mailbox_nats_requests_total`."""
        self.registry.register(_RequestCounts(counts))


class _RequestCounts(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self):  # type: ignore[no-untyped-def]
        family = CounterMetricFamily("mailbox_nats_requests", "NATS requests this pod made, by kind", labels=["kind"])
        for kind, n in self.counts().items():
            family.add_metric([kind], n)
        yield family
