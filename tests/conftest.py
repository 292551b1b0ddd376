"""Shared fixtures: real nats-server processes from the venv's binary (never mocks).

A session-wide server serves most tests, each test on its own prefix so nothing collides;
tests that kill or restart a server start their own. testcontainers is used only when a
Docker engine answers (MAILBOX_TEST_DOCKER=1), else the local binary.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from hypothesis import settings

from service.embedded import NatsServer
from service.store import MemoryDispatchStore, NatsDispatchStore

# No per-example deadline for property tests: on a shared CI machine one slow example (a GC
# pause, a busy core) would fail a correct test as "flaky"; a hang still hits pytest's timeout.
settings.register_profile("mailbox", deadline=None)
settings.load_profile("mailbox")

_prefixes = itertools.count()


def unique_prefix(name: str = "t") -> str:
    return f"{name}{os.getpid()}x{next(_prefixes)}"


def _docker_server() -> Iterator[str] | None:
    if os.environ.get("MAILBOX_TEST_DOCKER") != "1":
        return None
    try:
        from testcontainers.core.container import DockerContainer  # type: ignore[import-untyped]
        from testcontainers.core.waiting_utils import wait_for_logs  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        container = DockerContainer("nats:2.11").with_command("-js").with_exposed_ports(4222)
        container.start()
    except Exception:  # no Docker engine answered: fall back to the local binary
        return None
    wait_for_logs(container, "Server is ready")

    def gen() -> Iterator[str]:
        try:
            yield f"nats://{container.get_container_host_ip()}:{container.get_exposed_port(4222)}"
        finally:
            container.stop()

    return gen()


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    docker = _docker_server()
    if docker is not None:
        yield from docker
        return
    server = NatsServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A private server for tests that stop, kill or restart it."""
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest_asyncio.fixture
async def nats_store(nats_url: str) -> AsyncIterator[NatsDispatchStore]:
    store = await NatsDispatchStore.connect(nats_url, prefix=unique_prefix("s"))
    try:
        yield store
    finally:
        await store.close()


@pytest_asyncio.fixture(params=["memory", "nats"])
async def store(request: pytest.FixtureRequest, nats_url: str) -> AsyncIterator[object]:
    """The conformance suite runs against both stores."""
    if request.param == "memory":
        yield MemoryDispatchStore()
        return
    s = await NatsDispatchStore.connect(nats_url, prefix=unique_prefix("c"))
    try:
        yield s
    finally:
        await s.close()
