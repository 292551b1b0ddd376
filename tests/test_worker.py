"""The worker manager against real nats-server: settle table, serialization across pods,
failures, interrupts, human decisions, recovery, sweep and GC."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from service.app import start_pod
from service.handlers import PermanentError, RunContext, TransientError, approval
from service.live import LiveCommand
from service.model import RUN_SUPERSEDED, DispatchStatus, RunDispatch, RunRecord, RunStatus, TerminationKind
from service.protocol import SubmitRequest
from service.worker import CancelReason, Execution

from .conftest import unique_prefix
from .pods import Recorder, fast_settings, replace, stop_all, submit, wait_for, wait_runs


@pytest.fixture
def prefix() -> str:
    return unique_prefix("w")


def record_signals(pod) -> list[tuple[float, str, int]]:
    """Wrap the pod's signal handler to log (time, dispatch_id, delivery count)."""
    seen: list[tuple[float, str, int]] = []
    real = pod.worker._handle_signal

    async def spy(signal):
        seen.append((time.monotonic(), signal.dispatch_id, signal.receipt.deliveries))
        await real(signal)

    pod.worker._handle_signal = spy
    return seen


# ---------------------------------------------------------------------- settle table


async def test_a_blocked_signal_waits_its_nak_delay_which_grows_and_caps(nats_url, prefix):
    settings = fast_settings(prefix, nak_base_ms=300, nak_cap_ms=700, sweep_interval_ms=3_600_000)
    pod = await start_pod(settings, url=nats_url, handler="echo", recover=False)
    try:
        seen = record_signals(pod)
        now = pod.worker.clock()
        # a pod that died holds the thread; its lease has expired but no sweep reclaimed it yet
        await pod.store.create_run(RunRecord(run_id="r1", thread_id="t", created_at=now, updated_at=now),
                                   RunDispatch.queued("d1", "t", "r1", now))
        assert await pod.store.claim("t", "dead-pod", 1, now, 1)
        await pod.store.create_run(RunRecord(run_id="r2", thread_id="t", created_at=now, updated_at=now),
                                   RunDispatch.queued("d2", "t", "r2", now + 1))
        await pod.signals.publish("t", "d2")
        await wait_for(lambda: _async(sum(1 for s in seen if s[1] == "d2") >= 5), timeout=10)
        times = [t for t, d, _ in seen if d == "d2"]
        deliveries = [n for _, d, n in seen if d == "d2"]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert deliveries[:5] == [1, 2, 3, 4, 5]
        assert gaps[0] >= 0.29  # 300 ms
        assert gaps[1] >= 0.58  # 600 ms
        assert 0.68 <= gaps[2] < 1.1  # capped at 700 ms (uncapped would be 1200)
        assert 0.68 <= gaps[3] < 1.1
        assert (await pod.store.load_dispatch("d2")).status == DispatchStatus.QUEUED  # never claimed, never acked
    finally:
        await pod.stop()


async def test_a_signal_blocked_by_a_live_claim_is_acked_and_the_owner_chains(nats_url, prefix):
    gate = asyncio.Event()

    async def first_blocks(run: RunContext):
        if run.input == "first":
            await gate.wait()
        return run.input

    a = await start_pod(fast_settings(prefix), url=nats_url, handler=first_blocks, consumer_id="a")
    b = await start_pod(fast_settings(prefix), url=nats_url, handler=first_blocks, consumer_id="b")
    try:
        seen = record_signals(b)
        first = await submit(a, "t", "first")  # a runs it
        await wait_for(lambda: _run_status(a, first, RunStatus.RUNNING))
        second = await b.mailbox.submit(SubmitRequest(thread_id="t", input="second"))
        assert second.status == "queued"
        await wait_for(lambda: _async(any(d == second.dispatch_id for _, d, _ in seen)), timeout=5)
        await asyncio.sleep(0.3)
        assert [n for _, d, n in seen if d == second.dispatch_id] == [1]  # acked, not bounced
        gate.set()
        await wait_runs(a, [first, second.run_id])
    finally:
        await stop_all([a, b])


async def _async(value):
    return value


async def test_a_delayed_dispatch_starts_at_available_at(nats_url, prefix):
    rec = Recorder()
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=rec)
    try:
        t0 = time.monotonic()
        run_id = await submit(pod, "t", "later", delay_ms=800)
        await wait_runs(pod, [run_id])
        waited = rec.executions[0].started - t0
        assert 0.79 <= waited < 0.79 + 0.6
    finally:
        await pod.stop()


async def test_no_more_handlers_at_once_than_configured(nats_url, prefix):
    async def slow(run: RunContext):
        await asyncio.sleep(0.2)

    rec = Recorder(slow)
    pod = await start_pod(fast_settings(prefix, concurrency=3, signal_batch=10), url=nats_url, handler=rec)
    try:
        ids = [await submit(pod, f"t{i}", i) for i in range(12)]
        await wait_runs(pod, ids)
        assert rec.max_running == 3
        assert len(rec.executions) == 12
    finally:
        await pod.stop()


async def test_runs_that_outlive_their_lease_keep_it_renewed(nats_url, prefix):
    """Handlers that run for several leases keep their claims: the sweep (every 100 ms here)
    reclaims none of them, and each runs exactly once."""
    async def slow(run: RunContext):
        await asyncio.sleep(1.2)
        return run.input

    rec = Recorder(slow)
    settings = fast_settings(prefix, lease_ms=400, lease_renewal_ms=150, sweep_interval_ms=100)
    pod = await start_pod(settings, url=nats_url, handler=rec)
    try:
        ids = [await submit(pod, f"t{i}", i) for i in range(3)]
        runs = await wait_runs(pod, ids)
        assert [r.output for r in runs] == [0, 1, 2] and all(r.attempts == 1 for r in runs)
        assert len(rec.executions) == 3
        assert pod.metrics.lease_renewals.labels("ok").value >= 3 * 5
    finally:
        await pod.stop()


# ---------------------------------------------------------------------- serialization


async def test_three_pods_serialize_each_thread_and_start_in_priority_then_fifo_order(nats_url, prefix):
    async def body(run: RunContext):
        await asyncio.sleep(random.uniform(0, 0.003))

    rec = Recorder(body)
    settings = fast_settings(prefix, concurrency=8)
    control = await start_pod(settings, url=nats_url, handler=rec, start_worker=False)
    rng = random.Random(7)
    expected: dict[str, list[str]] = {}
    keys: dict[str, tuple[int, int]] = {}
    n = 0
    for i in range(20):
        for t in range(50):
            prio = rng.choice([0, 64, 128, 128, 200])
            reply = await control.mailbox.submit(SubmitRequest(thread_id=f"t{t}", input=n, priority=prio))
            keys[reply.run_id] = (prio, n)
            expected.setdefault(f"t{t}", []).append(reply.run_id)
            n += 1
    workers = [await start_pod(settings, url=nats_url, handler=rec, consumer_id=f"pod{i}") for i in range(3)]
    try:
        all_ids = [r for ids in expected.values() for r in ids]
        await wait_runs(control, all_ids, timeout=90)
        assert rec.overlaps() == []
        executed = [e.run_id for e in rec.executions]
        assert sorted(executed) == sorted(all_ids)  # each run exactly once
        for thread, ids in expected.items():
            started = [e.run_id for e in sorted(rec.executions, key=lambda e: e.started) if e.thread_id == thread]
            assert started == sorted(ids, key=lambda r: keys[r]), thread
        assert sum(1 for w in workers if w.worker.signal_stats["pulled"] > 0) >= 2
    finally:
        await stop_all([control, *workers])


# ---------------------------------------------------------------------- failures


async def test_transient_errors_are_retried_with_backoff(nats_url, prefix):
    async def flaky(run: RunContext):
        if run.attempt < 3:
            raise TransientError(f"try {run.attempt}")
        return "ok"

    rec = Recorder(flaky)
    pod = await start_pod(fast_settings(prefix, retry_base_ms=200), url=nats_url, handler=rec)
    try:
        run_id = await submit(pod, "t", None)
        [run] = await wait_runs(pod, [run_id])
        assert run.output == "ok" and run.attempts == 3
        starts = [e.started for e in rec.executions]
        assert [e.attempt for e in rec.executions] == [1, 2, 3]
        assert starts[1] - starts[0] >= 0.19 and starts[2] - starts[1] >= 0.19  # 200, 200 ms
        d = await pod.store.load_dispatch(run.dispatch_id)
        assert d.status == DispatchStatus.ACKED and d.attempt_count == 2 and d.last_error == "try 2"
        kinds = [e.kind for e in await _events(pod, run_id)]
        assert kinds.count("rescheduled") == 2 and kinds[-1] == "finished"
    finally:
        await pod.stop()


async def test_the_backoff_grows_and_caps(nats_url, prefix):
    from service.retry import retry_delay_ms

    assert [retry_delay_ms(n, 250, 30_000) for n in range(0, 9)] == [250, 250, 500, 1000, 2000, 4000, 8000, 16000, 16000]
    assert retry_delay_ms(9, 250, 3000) == 3000


async def test_transient_failures_dead_letter_after_max_attempts(nats_url, prefix):
    async def always(run: RunContext):
        raise TransientError("down")

    rec = Recorder(always)
    pod = await start_pod(fast_settings(prefix, retry_base_ms=20), url=nats_url, handler=rec)
    try:
        run_id = await submit(pod, "t", None, max_attempts=3)
        [run] = await wait_runs(pod, [run_id])
        assert len(rec.executions) == 3
        assert run.error == "down" and run.termination.type == TerminationKind.ERROR
        d = await pod.store.load_dispatch(run.dispatch_id)
        assert d.status == DispatchStatus.DEAD_LETTER and d.attempt_count == 3
        assert [e.kind for e in await _events(pod, run_id)][-1] == "dead_lettered"
    finally:
        await pod.stop()


async def test_a_permanent_error_dead_letters_exactly_once(nats_url, prefix):
    async def fatal(run: RunContext):
        raise PermanentError("bad input")

    rec = Recorder(fatal)
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=rec)
    try:
        run_id = await submit(pod, "t", None)
        [run] = await wait_runs(pod, [run_id])
        await asyncio.sleep(0.5)
        assert len(rec.executions) == 1
        d = await pod.store.load_dispatch(run.dispatch_id)
        assert d.status == DispatchStatus.DEAD_LETTER and d.attempt_count == 0 and d.last_error == "bad input"
        kinds = [e.kind for e in await _events(pod, run_id)]
        assert kinds.count("dead_lettered") == 1
    finally:
        await pod.stop()


async def test_any_other_exception_is_transient(nats_url, prefix):
    async def oops(run: RunContext):
        if run.attempt == 1:
            raise KeyError("surprise")
        return "recovered"

    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=oops)
    try:
        run_id = await submit(pod, "t", None)
        [run] = await wait_runs(pod, [run_id])
        assert run.output == "recovered" and run.attempts == 2
    finally:
        await pod.stop()


# ---------------------------------------------------------------------- interrupts


async def test_a_stale_claimed_dispatch_never_enters_the_handler(nats_url, prefix):
    rec = Recorder()
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=rec)
    try:
        now = pod.worker.clock()
        await pod.store.create_run(RunRecord(run_id="r1", thread_id="t", created_at=now, updated_at=now, dispatch_id="d1"),
                                   RunDispatch.queued("d1", "t", "r1", now))
        [claimed] = await pod.store.claim("t", pod.worker.consumer_id, 30_000, now, 1)
        await pod.mailbox.interrupt("t")  # after the claim, before the start
        assert pod.worker.adopt(claimed)
        await wait_for(lambda: _dispatch_status(pod, "d1", DispatchStatus.SUPERSEDED))
        await asyncio.sleep(0.2)
        assert rec.executions == []
        run = await pod.store.load_run("r1")
        assert run.status == RunStatus.DONE and run.termination.type == TerminationKind.CANCELLED
    finally:
        await pod.stop()


async def _dispatch_status(pod, dispatch_id, status) -> bool:
    d = await pod.store.load_dispatch(dispatch_id)
    return d is not None and d.status == status


async def _run_status(pod, run_id, status) -> bool:
    r = await pod.store.load_run(run_id)
    return r is not None and r.status == status


async def test_an_interrupt_cancels_the_active_run_cooperatively(nats_url, prefix):
    saw_cancel = asyncio.Event()

    async def forever(run: RunContext):
        try:
            await asyncio.sleep(3600)
        finally:
            if run.cancelled.is_set():
                saw_cancel.set()

    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=forever)
    try:
        run_id = await submit(pod, "t", None)
        await wait_for(lambda: _run_status(pod, run_id, RunStatus.RUNNING))
        reply = await pod.mailbox.interrupt("t")
        assert reply.active_run_id == run_id and reply.active_cancelled
        [run] = await wait_runs(pod, [run_id])
        assert saw_cancel.is_set()
        assert run.termination.type == TerminationKind.CANCELLED and run.error == RUN_SUPERSEDED
        assert (await pod.store.load_dispatch(run.dispatch_id)).status == DispatchStatus.SUPERSEDED
        assert [e.kind for e in await _events(pod, run_id)][-1] == "superseded"
    finally:
        await pod.stop()


async def test_a_handler_that_swallows_the_cancel_and_returns_still_ends_cancelled(nats_url, prefix):
    """An interrupted handler that catches the cancel and returns a result anyway: the run
    ends superseded, and the result that came after the cancel is not recorded."""

    async def stubborn(run: RunContext):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return "finished anyway"

    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=stubborn)
    try:
        run_id = await submit(pod, "t", None)
        await wait_for(lambda: _run_status(pod, run_id, RunStatus.RUNNING))
        assert (await pod.mailbox.interrupt("t")).active_cancelled
        [run] = await wait_runs(pod, [run_id])
        assert run.termination.type == TerminationKind.CANCELLED and run.error == RUN_SUPERSEDED
        assert run.output is None
        assert (await pod.store.load_dispatch(run.dispatch_id)).status == DispatchStatus.SUPERSEDED
    finally:
        await pod.stop()


async def test_submit_with_interrupt_strategy_wins_over_older_work(nats_url, prefix):
    gate = asyncio.Event()

    async def blocked(run: RunContext):
        if run.input == "old":
            await gate.wait()
        return run.input

    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=blocked)
    try:
        old = await submit(pod, "t", "old")
        await wait_for(lambda: _run_status(pod, old, RunStatus.RUNNING))
        queued = await submit(pod, "t", "queued")
        new = await submit(pod, "t", "new", strategy="interrupt")
        runs = await wait_runs(pod, [old, queued, new])
        assert [r.output for r in runs] == [None, None, "new"]
        assert runs[0].error == RUN_SUPERSEDED and runs[1].error == RUN_SUPERSEDED
    finally:
        gate.set()
        await pod.stop()


# ---------------------------------------------------------------------- human decisions


async def test_a_decision_reaches_the_waiting_run_live(nats_url, prefix):
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=approval)
    try:
        run_id = await submit(pod, "t", {"question": "ship it?"})
        await wait_for(lambda: _run_status(pod, run_id, RunStatus.WAITING))
        run = await pod.store.load_run(run_id)
        assert run.waiting.ticket == "approval" and run.waiting.prompt == {"question": "ship it?"}

        async def suspended_lease() -> bool:  # the lease switches to the suspended lease
            d = await pod.store.load_dispatch(run.dispatch_id)
            return d.lease_until - pod.worker.clock() > pod.settings.lease_ms

        await wait_for(suspended_lease, timeout=5)
        reply = await pod.mailbox.decide(run_id, "approval", {"approved": True})
        assert reply.delivered == "live"
        [done] = await wait_runs(pod, [run_id])
        assert done.output == {"approved": True, "decision": {"approved": True}}
        assert done.dispatch_id == run.dispatch_id  # same attempt, no new dispatch
        kinds = [e.kind for e in await _events(pod, run_id)]
        assert kinds == ["queued", "started", "suspended", "resumed", "finished"]
    finally:
        await pod.stop()


async def test_a_decision_resumes_the_run_on_another_pod_when_its_pod_is_gone(nats_url, prefix):
    settings = fast_settings(prefix, decision_wait_ms=300)
    a = await start_pod(settings, url=nats_url, handler=approval, consumer_id="pod-a")
    run_id = await submit(a, "t", "approve?")
    await wait_for(lambda: _run_status(a, run_id, RunStatus.WAITING))
    first = await a.store.load_run(run_id)
    await asyncio.sleep(0.5)  # the in-run wait ends: the attempt closes as `waiting`
    await a.kill()
    rec = Recorder(approval)
    b = await start_pod(settings, url=nats_url, handler=rec, consumer_id="pod-b")
    try:
        reply = await b.mailbox.decide(run_id, "approval", "yes")
        assert reply.delivered == "durable" and reply.dispatch_id != first.dispatch_id
        [done] = await wait_runs(b, [run_id])
        assert done.output == {"approved": "yes", "decision": "yes"}
        assert done.dispatch_id == reply.dispatch_id
        assert [e.run_id for e in rec.executions] == [run_id]  # resumed on pod b
    finally:
        await b.stop()


async def test_a_run_waiting_in_a_dead_pod_resumes_after_its_suspended_lease(nats_url, prefix):
    settings = fast_settings(prefix, suspended_lease_ms=1500, decision_wait_ms=600_000)
    a = await start_pod(settings, url=nats_url, handler=approval, consumer_id="pod-a")
    run_id = await submit(a, "t", "approve?")
    await wait_for(lambda: _run_status(a, run_id, RunStatus.WAITING))
    await a.kill()  # dies while waiting in-run: its claim outlives it
    b = await start_pod(settings, url=nats_url, handler=approval, consumer_id="pod-b")
    try:
        reply = await b.mailbox.decide(run_id, "approval", "go")
        assert reply.delivered == "durable"
        [done] = await wait_runs(b, [run_id], timeout=20)
        assert done.output["decision"] == "go"
    finally:
        await b.stop()


# ---------------------------------------------------------------------- recovery, sweep, gc


async def test_expired_leases_are_reclaimed_at_start(nats_url, prefix):
    rec = Recorder()
    control = await start_pod(fast_settings(prefix), url=nats_url, handler=rec, start_worker=False)
    now = control.worker.clock()
    await control.store.create_run(RunRecord(run_id="r1", thread_id="t", created_at=now, updated_at=now, dispatch_id="d1"),
                                   RunDispatch.queued("d1", "t", "r1", now))
    [dead] = await control.store.claim("t", "crashed-pod", 1, now, 1)
    await asyncio.sleep(0.01)
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=rec)
    try:
        await wait_runs(pod, ["r1"])
        assert [e.attempt for e in rec.executions] == [2]
        d = await pod.store.load_dispatch("d1")
        assert d.status == DispatchStatus.ACKED and d.attempt_count == 1
        with pytest.raises(Exception):  # the dead pod's late write is rejected
            await pod.store.ack("d1", dead.claim_token, pod.worker.clock())
    finally:
        await stop_all([control, pod])


async def test_the_sweeper_repairs_a_lost_signal(nats_url, prefix):
    rec = Recorder()
    settings = fast_settings(prefix, sweep_interval_ms=400, republish_after_ms=200)
    pod = await start_pod(settings, url=nats_url, handler=rec)
    try:
        now = pod.worker.clock()
        # written without a signal: as if the pod crashed right after the store write
        await pod.store.create_run(RunRecord(run_id="r1", thread_id="t", created_at=now, updated_at=now, dispatch_id="d1"),
                                   RunDispatch.queued("d1", "t", "r1", now))
        t0 = time.monotonic()
        await wait_runs(pod, ["r1"], timeout=5)
        assert time.monotonic() - t0 < 0.2 + 0.4 * 2 + 0.5  # quiet for republish_after, then a sweep
    finally:
        await pod.stop()


async def test_runs_that_lost_their_dispatch_are_re_enqueued(nats_url, prefix):
    rec = Recorder()
    control = await start_pod(fast_settings(prefix), url=nats_url, handler=rec, start_worker=False)
    now = control.worker.clock()
    # the run record landed, the dispatch did not (a crash between the two writes)
    await control.store.create_run(RunRecord(run_id="r1", thread_id="t", created_at=now, updated_at=now, dispatch_id="d1"))
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=rec)
    try:
        [run] = await wait_runs(pod, ["r1"])
        assert run.dispatch_id == "d1" and (await pod.store.load_dispatch("d1")).status == DispatchStatus.ACKED
    finally:
        await stop_all([control, pod])


async def test_the_sweep_re_enqueues_a_run_that_lost_its_dispatch(nats_url, prefix):
    rec = Recorder()
    pod = await start_pod(fast_settings(prefix, sweep_interval_ms=3_600_000), url=nats_url, handler=rec)
    try:
        old = pod.worker.clock() - 2 * max(pod.settings.lease_ms, pod.settings.sweep_interval_ms)
        # a crash between the run record and its dispatch, a while ago, after the pod started
        await pod.store.create_run(RunRecord(run_id="r1", thread_id="t", created_at=old, updated_at=old, dispatch_id="d1"))
        # and one that is still being submitted: not lost yet
        fresh = pod.worker.clock()
        await pod.store.create_run(RunRecord(run_id="r2", thread_id="u", created_at=fresh, updated_at=fresh, dispatch_id="d2"))
        await pod.worker.sweep()
        [run] = await wait_runs(pod, ["r1"])
        assert run.dispatch_id == "d1" and [e.run_id for e in rec.executions] == ["r1"]
        assert await pod.store.load_dispatch("d2") is None
    finally:
        await stop_all([pod])


async def test_gc_removes_old_terminal_records_and_nothing_else(nats_url, prefix):
    pod = await start_pod(fast_settings(prefix, gc_ttl_ms=0, gc_interval_ms=3_600_000), url=nats_url, handler="echo")
    try:
        done = [await submit(pod, f"t{i}", i) for i in range(3)]
        await wait_runs(pod, done)
        delayed = await submit(pod, "later", "x", delay_ms=3_600_000)
        await asyncio.sleep(0.01)
        purged = await pod.worker.gc()
        assert purged == 3
        for run_id in done:
            assert await pod.store.load_run(run_id) is None
        assert (await pod.store.load_run(delayed)).status == RunStatus.CREATED
        assert await pod.store.count_dispatches_by_status(DispatchStatus.QUEUED) == 1
    finally:
        await pod.stop()


async def _events(pod, run_id: str):
    from service.store import keys

    js = pod.nc.jetstream()
    subject = f"{pod.settings.prefix}.events.*.{keys.H(run_id)}"
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                break
            import msgspec

            from service.events import Event

            out.append(msgspec.json.decode(msg.data, type=Event))
    finally:
        await sub.unsubscribe()
    return out


# ---------------------------------------------------------------------- reconciliation


async def _run_with_dispatch(pod, run_id: str, thread: str, status: RunStatus, now: int | None = None) -> RunDispatch:
    now = pod.worker.clock() if now is None else now
    d = RunDispatch.queued(f"d-{run_id}", thread, run_id, now)
    await pod.store.create_run(
        RunRecord(run_id=run_id, thread_id=thread, status=status, dispatch_id=d.dispatch_id, created_at=now,
                  updated_at=now), d)
    return d


async def test_the_sweep_finishes_runs_whose_dispatch_ended_without_them(nats_url, prefix):
    rec = Recorder()
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=rec, start_api=False, start_worker=False)
    runner = None
    try:
        now = pod.worker.clock()
        # superseded under a run still marked running (a stale claim the sweep reclaimed)
        await _run_with_dispatch(pod, "r-sup", "t1", now=now, status=RunStatus.RUNNING)
        [c] = await pod.store.claim("t1", "dead-pod", 1, now, 1)
        await pod.store.interrupt("t1", now)
        await pod.store.reclaim_expired_leases(now + 10, 10)
        # dead-lettered under a run still created
        await _run_with_dispatch(pod, "r-dl", "t2", now=now, status=RunStatus.CREATED)
        [c2] = await pod.store.claim("t2", "dead-pod", 60_000, now, 1)
        await pod.store.dead_letter(c2.dispatch_id, c2.claim_token, "boom", now)
        # acked while the run's own write failed: its outcome is lost, it must run again
        await _run_with_dispatch(pod, "r-ack", "t3", now=now, status=RunStatus.RUNNING)
        [c3] = await pod.store.claim("t3", "dead-pod", 60_000, now, 1)
        await pod.store.ack(c3.dispatch_id, c3.claim_token, now)
        # a durable wait (acked, waiting) is left alone
        await _run_with_dispatch(pod, "r-wait", "t4", now=now, status=RunStatus.WAITING)
        [c4] = await pod.store.claim("t4", "dead-pod", 60_000, now, 1)
        await pod.store.ack(c4.dispatch_id, c4.claim_token, now)

        later = now + pod.settings.lease_ms + 100
        repaired = await _reconcile(pod, later)
        assert repaired == 3
        sup = await pod.store.load_run("r-sup")
        assert sup.status == RunStatus.DONE and sup.error == RUN_SUPERSEDED
        dl = await pod.store.load_run("r-dl")
        assert dl.status == RunStatus.DONE and dl.error == "boom"
        assert await _reconcile(pod, later) == 0  # idempotent
        runner = await start_pod(fast_settings(prefix), url=nats_url, handler=rec, start_api=False)
        [again] = await wait_runs(pod, ["r-ack"])
        assert again.dispatch_id != c3.dispatch_id and [e.run_id for e in rec.executions] == ["r-ack"]
        assert (await pod.store.load_run("r-wait")).status == RunStatus.WAITING
    finally:
        await pod.stop()
        if runner is not None:
            await runner.stop()


async def test_a_stale_owner_never_rewrites_a_run_that_moved_on(nats_url, prefix):
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler="echo", start_api=False, start_worker=False)
    try:
        d = await _run_with_dispatch(pod, "r1", "t", RunStatus.RUNNING)
        await pod.store.update_run("r1", lambda r: replace(r, dispatch_id="newer"))
        from service.worker import _UNCHANGED, _started

        outcome = await pod.worker._update_run(d, lambda r: replace(r, status=RunStatus.CREATED))
        assert outcome is _UNCHANGED
        assert (await pod.store.load_run("r1")).status == RunStatus.RUNNING
        assert _started(await pod.store.load_run("r1"), d.dispatch_id, "i1", 1) is None
    finally:
        await pod.stop()


@contextlib.asynccontextmanager
async def _a_lapsed_attempt(nats_url: str, prefix: str):
    """Pod `old` runs a run's attempt 1 and stops renewing (like a paused pod, it takes no
    more signals either) until its lease lapses; pod `new` has not started its worker. Each
    attempt's handler waits for its gate. Yields (old, new, run_id, gates, started)."""
    gates = {1: asyncio.Event(), 2: asyncio.Event()}
    started: list[int] = []

    async def waits_for_its_gate(run: RunContext):
        started.append(run.attempt)
        await gates[run.attempt].wait()
        return f"attempt {run.attempt}"

    settings = fast_settings(prefix, lease_ms=600, lease_renewal_ms=3_600_000, sweep_interval_ms=3_600_000)
    old = await start_pod(settings, url=nats_url, handler=waits_for_its_gate, consumer_id="old")
    new = await start_pod(settings, url=nats_url, handler=waits_for_its_gate, consumer_id="new", start_worker=False)
    try:
        run_id = await submit(old, "t", "x")
        await wait_for(lambda: _async(started == [1]))
        old.worker._stopping = True
        await asyncio.sleep(0.7)  # the lease lapses (renewals are off)
        yield old, new, run_id, gates, started
    finally:
        for gate in gates.values():
            gate.set()
        await stop_all([old, new])


async def test_an_owner_whose_claim_was_reclaimed_never_rewrites_the_run(nats_url, prefix):
    """The same dispatch, claimed again after its lease lapsed: the run now belongs to the
    new attempt, and the old one's late result is refused (chaos seed 836066)."""
    async with _a_lapsed_attempt(nats_url, prefix) as (old, new, run_id, gates, started):
        await new.worker.sweep()  # reclaimed; its signal goes to the new pod
        await new.worker.start(recover=False)
        await wait_for(lambda: _async(started == [1, 2]))
        gates[1].set()  # attempt 1 finishes late, while attempt 2 runs
        await asyncio.sleep(0.5)
        run = await new.store.load_run(run_id)
        assert run.status == RunStatus.RUNNING and run.output is None
        gates[2].set()
        done = await wait_runs(new, [run_id])
        assert done[0].output == "attempt 2" and done[0].attempts == 2


async def _reconcile(pod, now: int) -> int:
    """The sweep's reconciliation step on its own, at `now`."""
    runs = await pod.store.scan_runs([RunStatus.CREATED, RunStatus.RUNNING, RunStatus.WAITING])
    survey = await pod.store.survey(want={r.dispatch_id for r in runs if r.dispatch_id})
    return await pod.worker.reconcile_runs(runs, survey.wanted, now)


async def test_a_live_cancel_of_a_run_already_being_cancelled_counts_as_delivered(nats_url, prefix):
    """An interrupt can make the run's lease renewal fail (its claim is stale now) before the
    interrupt's own live cancel arrives: the run is being cancelled either way, and the
    caller must hear so."""
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=Recorder(), start_api=False)
    try:
        d = RunDispatch.queued("d1", "t1", "r1", 1000)
        execution = Execution(dispatch=d, task=asyncio.create_task(asyncio.sleep(30)))
        pod.worker._cancel(execution, CancelReason.LEASE_LOST)
        reply = pod.worker.deliver_live(execution, LiveCommand(command="cancel", run_id="r1", reason="interrupt"))
        assert reply.delivered and reply.run_id == "r1"
        idle = Execution(dispatch=d)  # no task yet: nothing to cancel, nothing delivered
        assert not pod.worker.deliver_live(idle, LiveCommand(command="cancel", run_id="r1")).delivered
        with pytest.raises(asyncio.CancelledError):
            await execution.task
    finally:
        await stop_all([pod])


async def test_a_late_signal_for_a_run_this_pod_finished_costs_no_store_read(nats_url, prefix):
    """A thread's runs are mostly chained by the pod that ran the previous one, so their own
    signals arrive after they finished: such a signal is acked on what the pod knows."""
    pod = await start_pod(fast_settings(prefix, sweep_interval_ms=3_600_000), url=nats_url, handler="echo")
    try:
        seen = record_signals(pod)
        run_id = await submit(pod, "t", "x")
        await wait_runs(pod, [run_id])
        dispatch_id = (await pod.store.load_run(run_id)).dispatch_id
        await asyncio.sleep(0.2)  # its own signal, if any, is settled
        acked, stats = pod.worker.signal_stats["ack"], vars(pod.store.stats).copy()
        await pod.signals.publish("t", dispatch_id)  # a late copy (as if still in the backlog)
        await wait_for(lambda: _async(pod.worker.signal_stats["ack"] == acked + 1), timeout=5)
        assert [n for _, d, n in seen if d == dispatch_id][-1] == 1
        assert vars(pod.store.stats) == stats  # no probe, no thread read, no write
        assert (await pod.signals.pending())[0] == 0
    finally:
        await pod.stop()


async def test_a_thread_that_runs_dry_costs_no_extra_read_after_its_last_run(nats_url, prefix):
    """After completing a run the pod claims the thread's next one on what its own completion
    wrote (a guarded write, current as of then), so finding the thread empty reads nothing."""
    pod = await start_pod(fast_settings(prefix, sweep_interval_ms=3_600_000), url=nats_url, handler="echo")
    try:
        await wait_runs(pod, [await submit(pod, "warm", 0)])
        probes = pod.store.stats.probes
        for i in range(10):
            await wait_runs(pod, [await submit(pod, "t", i)])
        await asyncio.sleep(0.2)  # the last chain has looked
        assert pod.store.stats.probes - probes <= 1
    finally:
        await pod.stop()


async def test_a_signal_acked_while_the_chain_claims_is_claimed_after_all(nats_url, prefix):
    """Another pod enqueues while this pod's chain decides "nothing left" on its own last
    write; the new run's signal reaches this pod, finds the thread busy and is acked on the
    promise that the chain takes it: the chain must look again rather than strand it."""
    settings = fast_settings(prefix, sweep_interval_ms=3_600_000)
    pod = await start_pod(settings, url=nats_url, handler="echo", consumer_id="a")
    other = await start_pod(settings, url=nats_url, handler="echo", consumer_id="b", start_worker=False)
    real_claim = pod.store.claim
    late: list[str] = []

    async def claim_racing_an_enqueue(thread_id, *args, after_own_commit=False, **kw):
        if after_own_commit and thread_id == "t" and not late:
            late.append(await submit(other, "t", "late"))  # its signal goes to `pod`, busy claiming
            await wait_for(lambda: _async("t" in pod.worker._promised), timeout=5)
        return await real_claim(thread_id, *args, after_own_commit=after_own_commit, **kw)

    pod.store.claim = claim_racing_an_enqueue
    try:
        await wait_runs(pod, [await submit(pod, "t", "first")])
        await wait_for(lambda: _async(bool(late)), timeout=5)
        await wait_runs(pod, late, timeout=3)  # long before any sweep would republish it
    finally:
        await stop_all([pod, other])


async def test_a_run_submitted_behind_one_running_here_needs_no_signal(nats_url, prefix):
    """The pod that runs a thread claims its next dispatch when it is done, so a submit to
    that thread on the same pod sends no signal (no fetch, no ack) and still runs next."""
    gate = asyncio.Event()

    async def first_blocks(run: RunContext):
        if run.input == "first":
            await gate.wait()
        return run.input

    pod = await start_pod(fast_settings(prefix, sweep_interval_ms=3_600_000), url=nats_url, handler=first_blocks)
    try:
        first = await submit(pod, "t", "first")
        await wait_for(lambda: _run_status(pod, first, RunStatus.RUNNING))
        second = await pod.mailbox.submit(SubmitRequest(thread_id="t", input="second"))
        assert second.status == "queued"
        gate.set()
        await wait_runs(pod, [first, second.run_id], timeout=5)
        assert pod.worker.signal_stats["pulled"] == 0
        assert (await pod.signals.pending())[0] == 0
    finally:
        await pod.stop()


async def test_a_result_that_comes_after_the_lease_ran_out_waits_for_the_next_owner(nats_url, prefix):
    """The lease lapsed while the handler ran and the sweep put the dispatch back in the
    queue; no one has claimed it yet when the old attempt finishes: its result must not
    land (chaos seed 704359), and the next claim runs the run."""
    async with _a_lapsed_attempt(nats_url, prefix) as (old, new, run_id, gates, started):
        await new.worker.sweep()  # reclaimed: queued again, not yet claimed
        gates[1].set()  # attempt 1 finishes now
        await asyncio.sleep(0.5)
        run = await new.store.load_run(run_id)
        assert run.status != RunStatus.DONE and run.output is None
        gates[2].set()
        await new.worker.start(recover=False)
        done = await wait_runs(new, [run_id])
        assert done[0].output == "attempt 2" and started == [1, 2]


async def test_the_sweeper_leaves_a_fresh_backlog_alone(nats_url, prefix):
    """Queued dispatches whose signal went out recently are not signalled again on every
    sweep (a backlog of 10,000 would mean 10,000 publishes per sweep): only those quiet for
    longer than republish_after."""
    now = [10_000_000]
    settings = fast_settings(prefix, republish_after_ms=30_000, sweep_interval_ms=3_600_000)
    pod = await start_pod(settings, url=nats_url, handler="echo", start_worker=False, clock=lambda: now[0])
    republished: list[str] = []
    real_publish = pod.signals.publish

    async def spy(thread_id, dispatch_id, *, msg_id=None, **kw):
        if msg_id and msg_id.startswith("sweep:"):
            republished.append(dispatch_id)
        return await real_publish(thread_id, dispatch_id, msg_id=msg_id, **kw)

    pod.signals.publish = spy
    try:
        for i in range(5):
            await pod.store.enqueue(RunDispatch.queued(f"d{i}", f"t{i}", f"r{i}", now[0]))
        now[0] += 10_000
        await pod.worker.sweep()
        assert republished == []
        now[0] += 25_000  # 35 s quiet: their signals may be lost
        await pod.worker.sweep()
        assert sorted(republished) == [f"d{i}" for i in range(5)]
    finally:
        await pod.stop()
