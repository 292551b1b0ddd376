"""Pods as OS processes: three sharing threads, SIGKILL mid-run, SIGTERM drain; and no
signal stranded under a burst."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.app import start_pod
from service.handlers import RunContext, TransientError
from service.model import DispatchStatus, RunStatus, VersionConflictError
from service.protocol import SubmitRequest

from .conftest import unique_prefix
from .pods import Recorder, fast_settings, stop_all, submit, wait_for, wait_runs

ROOT = Path(__file__).resolve().parent.parent


class PodProcess:
    def __init__(self, url: str, prefix: str, journal: Path, **settings: int) -> None:
        args = [f"{k}={v}" for k, v in settings.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.pod_process", url, prefix, str(journal), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 20) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready" and time.monotonic() < deadline, line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def journal_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "journal.jsonl"


async def test_three_processes_serialize_50_threads_of_20_runs(nats_url, journal):
    prefix = unique_prefix("p3")
    control = await start_pod(fast_settings(prefix), url=nats_url, handler="echo", start_worker=False)
    rng = random.Random(3)
    order: dict[str, list[tuple[int, int, str]]] = {}
    n = 0
    for _ in range(20):
        for t in range(50):
            prio = rng.choice([0, 100, 128, 255])
            reply = await control.mailbox.submit(
                SubmitRequest(thread_id=f"t{t}", input={"sleep": 0.002}, priority=prio)
            )
            order.setdefault(f"t{t}", []).append((prio, n, reply.run_id))
            n += 1
    procs = [PodProcess(nats_url, prefix, journal, concurrency=8) for _ in range(3)]
    try:
        for p in procs:
            p.wait_ready()
        all_ids = [r for rows in order.values() for _, _, r in rows]
        await wait_runs(control, all_ids, timeout=120)
        lines = journal_lines(journal)
        starts = [x for x in lines if x["event"] == "start"]
        assert sorted(x["run"] for x in starts) == sorted(all_ids)  # exactly once each
        assert len({x["pod"] for x in starts}) == 3  # all three took a share
        ends = {x["run"]: x["t"] for x in lines if x["event"] == "end"}
        for thread, rows in order.items():
            mine = sorted((x for x in starts if x["thread"] == thread), key=lambda x: x["t"])
            assert [x["run"] for x in mine] == [r for _, _, r in sorted(rows)]  # priority, then FIFO
            for a, b in zip(mine, mine[1:]):
                assert b["t"] >= ends[a["run"]], f"overlap on {thread}"
    finally:
        for p in procs:
            p.kill()
        await control.stop()


async def test_a_pod_killed_mid_run_is_taken_over_after_its_lease(nats_url, journal):
    prefix = unique_prefix("kill")
    proc = PodProcess(nats_url, prefix, journal, lease_ms=1500, lease_renewal_ms=300)
    rec = Recorder()
    try:
        proc.wait_ready()
        control = await start_pod(fast_settings(prefix, lease_ms=1500, lease_renewal_ms=300), url=nats_url,
                                  handler=rec, start_worker=False)
        run_id = await submit(control, "t", {"sleep": 30})
        await wait_for(lambda: _started(journal, run_id))
        run = await control.store.load_run(run_id)
        claimed = await control.store.load_dispatch(run.dispatch_id)
        assert claimed.status == DispatchStatus.CLAIMED
        proc.kill()
        killed_at = time.monotonic()
        survivor = await start_pod(fast_settings(prefix, lease_ms=1500, lease_renewal_ms=300), url=nats_url,
                                   handler=rec)
        try:
            [done] = await wait_runs(survivor, [run_id], timeout=20)
            assert time.monotonic() - killed_at >= 1.0  # not before the lease ran out
            assert [e.attempt for e in rec.executions] == [2]
            d = await survivor.store.load_dispatch(run.dispatch_id)
            assert d.status == DispatchStatus.ACKED and d.attempt_count == 1
            assert done.attempts == 2
            # the dead pod's late writes are rejected
            for late in (
                survivor.store.ack(d.dispatch_id, claimed.claim_token, survivor.worker.clock()),
                survivor.store.nack(d.dispatch_id, claimed.claim_token, 0, "late", survivor.worker.clock()),
            ):
                with pytest.raises(VersionConflictError):
                    await late
            assert not await survivor.store.extend_lease(d.dispatch_id, claimed.claim_token, 1000, 1)
        finally:
            await stop_all([control, survivor])
    finally:
        proc.kill()


async def _started(journal: Path, run_id: str) -> bool:
    return any(x["event"] == "start" and x["run"] == run_id for x in journal_lines(journal))


async def test_sigterm_drains_in_flight_runs_and_exits_0(nats_url, journal):
    prefix = unique_prefix("term")
    proc = PodProcess(nats_url, prefix, journal, concurrency=2, drain_timeout_ms=5000)
    try:
        proc.wait_ready()
        control = await start_pod(fast_settings(prefix), url=nats_url, handler="echo", start_worker=False)
        busy = [await submit(control, f"t{i}", {"sleep": 1.0}) for i in range(2)]
        await wait_for(lambda: _all_started(journal, busy))
        behind = [await submit(control, f"t{i}", {"sleep": 0}) for i in range(2)]
        await asyncio.sleep(0.3)  # their signals reach the busy pod
        code = await asyncio.to_thread(proc.terminate)
        assert code == 0
        for run_id in busy:
            assert (await control.store.load_run(run_id)).status == RunStatus.DONE  # finished inside the drain
        for run_id in behind:  # not started, still queued, and woken again for the next pod
            run = await control.store.load_run(run_id)
            assert run.status == RunStatus.CREATED
            assert (await control.store.load_dispatch(run.dispatch_id)).status == DispatchStatus.QUEUED

        async def woken_again() -> bool:  # the server counts new signals for the consumer asynchronously
            num_pending, ack_pending, _ = await control.signals.pending()
            return num_pending + ack_pending >= 2

        await wait_for(woken_again, timeout=5)
        successor = await start_pod(fast_settings(prefix), url=nats_url, handler="echo", recover=False)
        try:
            await wait_runs(successor, behind, timeout=10)
        finally:
            await stop_all([control, successor])
    finally:
        proc.kill()


async def _all_started(journal: Path, run_ids: list[str]) -> bool:
    started = {x["run"] for x in journal_lines(journal) if x["event"] == "start"}
    return all(r in started for r in run_ids)


async def test_no_signal_is_stranded_under_a_burst(nats_url):
    """10,000 runs over 1,000 threads, some failing, some hanging for a while: afterwards
    the consumer's ack-pending falls back to nothing within seconds (never waiting for
    ack_wait), and redeliveries stay under 1% of signals."""
    prefix = unique_prefix("burst")
    rng = random.Random(11)
    fail = set(rng.sample(range(10_000), 200))
    hang = set(rng.sample(range(10_000), 50))

    async def body(run: RunContext):
        i = run.input
        if i in hang and run.attempt == 1:
            await asyncio.sleep(2.0)
        if i in fail and run.attempt == 1:
            raise TransientError("flaky")
        return None

    settings = fast_settings(prefix, concurrency=64, signal_batch=64, ack_wait_ms=30_000, retry_base_ms=50,
                             sweep_interval_ms=2000)
    control = await start_pod(settings, url=nats_url, handler=body, start_worker=False)
    workers = [await start_pod(settings, url=nats_url, handler=body, consumer_id=f"w{i}") for i in range(2)]
    try:
        run_ids = []
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                r = await control.mailbox.submit(SubmitRequest(thread_id=f"t{i % 1000}", input=i))
                run_ids.append(r.run_id)

        await asyncio.gather(*(one(i) for i in range(10_000)))

        async def all_done() -> bool:
            counts = await control.store.count_all_by_status()
            return counts[DispatchStatus.QUEUED] == 0 and counts[DispatchStatus.CLAIMED] == 0

        await wait_for(all_done, timeout=240, every=0.5)
        finished = time.monotonic()

        async def settled() -> bool:
            num_pending, ack_pending, _ = await control.signals.pending()
            running = sum(w.worker.running for w in workers)
            return num_pending == 0 and ack_pending <= running

        await wait_for(settled, timeout=5)
        assert time.monotonic() - finished < settings.ack_wait_ms / 1000
        pulled = sum(w.worker.signal_stats["pulled"] for w in workers)
        redelivered = sum(w.worker.signal_stats["redelivered"] for w in workers)
        assert pulled > 0 and redelivered / pulled < 0.01, (redelivered, pulled)
        counts = await control.store.count_all_by_status()
        assert counts[DispatchStatus.ACKED] == 10_000
    finally:
        await stop_all([control, *workers])
