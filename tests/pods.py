"""Helpers for tests that run whole pods (in this process or as OS processes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from service.app import Pod, start_pod
from service.config import Settings
from service.handlers import RunContext
from service.model import RunRecord, RunStatus
from service.protocol import SubmitRequest

FAST = dict(
    lease_ms=3000,
    lease_renewal_ms=500,
    suspended_lease_ms=6000,
    sweep_interval_ms=500,
    gc_interval_ms=1000,
    republish_after_ms=1000,
    fetch_expires_ms=200,
    retry_base_ms=100,
    retry_cap_ms=1000,
    nak_base_ms=200,
    nak_cap_ms=2000,
    ack_wait_ms=5000,
    drain_timeout_ms=3000,
)


def fast_settings(prefix: str, **overrides: Any) -> Settings:
    return Settings(prefix=prefix, **{**FAST, **overrides})


@dataclass
class Execution:
    thread_id: str
    run_id: str
    dispatch_id: str
    attempt: int
    started: float
    ended: float = 0.0


@dataclass
class Recorder:
    """A handler that records every execution (start and end) and runs `body` in between."""

    body: Callable[[RunContext], Awaitable[Any]] | None = None
    executions: list[Execution] = field(default_factory=list)
    running: int = 0
    max_running: int = 0

    async def __call__(self, run: RunContext) -> Any:
        e = Execution(run.thread_id, run.run_id, run.dispatch_id, run.attempt, time.monotonic())
        self.executions.append(e)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            return await self.body(run) if self.body else run.input
        finally:
            self.running -= 1
            e.ended = time.monotonic()

    def overlaps(self) -> list[tuple[Execution, Execution]]:
        """Pairs of executions of one thread that ran at the same time."""
        by_thread: dict[str, list[Execution]] = {}
        for e in self.executions:
            by_thread.setdefault(e.thread_id, []).append(e)
        bad = []
        for runs in by_thread.values():
            runs.sort(key=lambda e: e.started)
            for a, b in zip(runs, runs[1:]):
                if a.ended == 0.0 or b.started < a.ended:
                    bad.append((a, b))
        return bad


async def pods(n: int, url: str, settings: Settings, handler: Any) -> list[Pod]:
    return [await start_pod(settings, url=url, handler=handler, consumer_id=f"pod{i}") for i in range(n)]


async def stop_all(pods: list[Pod]) -> None:
    await asyncio.gather(*(p.stop(drain_timeout_ms=2000) for p in pods), return_exceptions=True)


async def submit(pod: Pod, thread_id: str, input: Any = None, **kw: Any) -> str:
    reply = await pod.mailbox.submit(SubmitRequest(thread_id=thread_id, input=input, **kw))
    return reply.run_id


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 20.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


async def wait_runs(pod: Pod, run_ids: list[str], status: RunStatus = RunStatus.DONE, timeout: float = 30.0) -> list[RunRecord]:
    runs: list[RunRecord] = []

    async def all_there() -> bool:
        nonlocal runs
        runs = [r for r in [await pod.store.load_run(i) for i in run_ids] if r is not None]
        return len(runs) == len(run_ids) and all(r.status == status for r in runs)

    await wait_for(all_there, timeout)
    return runs


def replace(obj: Any, **kw: Any) -> Any:
    return msgspec.structs.replace(obj, **kw)
