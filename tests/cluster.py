"""Clustered JetStream for tests: a 3-node nats-server cluster on loopback.

    from .cluster import nats_cluster, cluster_settings  # noqa: F401 (the fixture)

    async def test_x(nats_cluster):
        pod = await start_pod(cluster_settings(prefix), url=nats_cluster.url, ...)
        leader = await nats_cluster.stream_leader(f"KV_{prefix}-state")
        nats_cluster.kill_node(leader); ...; nats_cluster.start_node(leader)

`nats_cluster` is a fresh `service.embedded.NatsCluster` per test (tests kill, pause and
restart its nodes), already started, with the JetStream meta group formed (`$JS.API.INFO`
answers and an R3 stream can be created). `url` is the comma-separated list of the three
client URLs (what `start_pod(url=...)` and `MAILBOX_NATS_URL` take), `urls` the list (what
`nats.connect` takes). Fault helpers take a server name (`NatsServer.name`, which is what
`$JS.API.STREAM.INFO` reports as `cluster.leader`): `kill_node`, `stop_node`, `start_node`,
`restart_node`, `pause_node`/`resume_node`; `await stream_leader(stream)` and
`await wait_stream_current(stream)` (leader elected and every replica caught up).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from service.config import Settings
from service.embedded import NatsCluster
from service.store import keys

from .pods import fast_settings


@pytest_asyncio.fixture
async def nats_cluster() -> AsyncIterator[NatsCluster]:
    cluster = NatsCluster()
    try:
        cluster.start()
        await cluster.wait_jetstream()
        yield cluster
    finally:
        cluster.cleanup()


def cluster_settings(prefix: str, **overrides: Any) -> Settings:
    """Fast test settings with R3 bucket and streams."""
    return fast_settings(prefix, **{"replicas": 3, **overrides})


def state_stream(prefix: str) -> str:
    """The stream behind the state bucket: `KV_<prefix>-state`."""
    return keys.stream_of_bucket(keys.bucket_name(prefix))


def signals_stream(prefix: str) -> str:
    return f"{prefix}-signals"
