"""The pod's metrics are plain numbers turned into Prometheus families when scraped; what a
scrape shows must be what prometheus_client's own metrics would show for the same updates."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.metrics import LATENCY_BUCKETS, Metrics

observations = st.lists(
    st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(min_value=0, max_value=1000, allow_nan=False)), max_size=40
)


def samples(exposition: bytes) -> set[str]:
    """Sample lines, without prometheus_client's `_created` series (ours has none)."""
    return {
        line
        for line in exposition.decode().splitlines()
        if line and not line.startswith("#") and "_created" not in line.split("{")[0].split(" ")[0]
    }


@given(observations, st.lists(st.sampled_from(["completed", "failed"]), max_size=10), st.integers(-5, 5))
def test_a_scrape_shows_what_prometheus_client_would(values, outcomes, depth):
    ours = Metrics()
    registry = CollectorRegistry()
    theirs_hist = Histogram("mailbox_dispatch_runtime_seconds", "Handler run time by outcome", ["outcome"],
                            buckets=LATENCY_BUCKETS, registry=registry)
    theirs_runs = Counter("mailbox_runs_total", "Run attempts by outcome", ["outcome"], registry=registry)
    theirs_active = Gauge("mailbox_active_runs", "Runs executing on this pod", registry=registry)
    for i, v in enumerate(values):
        outcome = outcomes[i % len(outcomes)] if outcomes else "completed"
        ours.runtime.labels(outcome).observe(v)
        theirs_hist.labels(outcome).observe(v)
    for outcome in outcomes:
        ours.runs.labels(outcome).inc()
        theirs_runs.labels(outcome).inc()
    ours.active_runs.inc(depth)
    ours.active_runs.dec()
    theirs_active.inc(depth)
    theirs_active.dec()
    mine = {s for s in samples(ours.exposition()) if s.startswith(("mailbox_dispatch_runtime", "mailbox_runs", "mailbox_active"))}
    assert mine == samples(generate_latest(registry))


def test_a_timed_operation_counts_its_errors_and_its_duration():
    m = Metrics()
    with m.timed("claim"):
        pass
    try:
        with m.timed("claim"):
            raise KeyError("x")
    except KeyError:
        pass
    assert m.operations.labels("claim", "ok").value == 1 and m.operations.labels("claim", "error").value == 1
    assert sum(m.operation_seconds.labels("claim").counts) == 2
