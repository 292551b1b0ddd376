"""Every endpoint end to end through `MailboxClient`, against running pods and real NATS:
submit strategies on a busy thread, idempotent submits, cancel, interrupt, decide (live and
durable), send, dead letters and replay, stats, events; following a run live and
re-attaching after a disconnect (also through another pod, also across a server restart)."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from service.app import Pod, start_pod
from service.client import BadRequest, Conflict, MailboxApiError, MailboxClient, NotFound, Unavailable
from service.events import Event
from service.handlers import PermanentError, RunContext, approval
from service.model import DispatchStatus, RunStatus, TerminationKind

from .conftest import unique_prefix
from .test_api import fast_settings

pytestmark = pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning:nats.micro")


class Script:
    """A handler driven by its input: {"do": "block"} waits for `release`; {"do": "fail"}
    raises PermanentError until `healed`; {"do": "input"} returns the next input sent;
    {"do": "steps", "n": N} emits N `step` events, waiting for `release` halfway; anything
    else is echoed back."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()
        self.healed = False
        self.started: list[Any] = []
        self.cancelled: list[str] = []

    async def __call__(self, run: RunContext) -> Any:
        self.started.append(run.input)
        do = run.input.get("do") if isinstance(run.input, dict) else None
        try:
            if do == "block":
                self.blocked.set()
                await self.release.wait()
            elif do == "fail" and not self.healed:
                raise PermanentError("broken for good")
            elif do == "input":
                self.blocked.set()
                return {"got": await run.next_input(10)}
            elif do == "steps":
                n = run.input["n"]
                for i in range(n):
                    if i == n // 2:
                        self.blocked.set()
                        await self.release.wait()
                    await run.emit("step", i)
                    await asyncio.sleep(0.01)
            return run.input
        except asyncio.CancelledError:
            self.cancelled.append(run.run_id)
            raise


@asynccontextmanager
async def mailbox(nats_url: str, handler: Any, *, pods: int = 1, url: str | None = None,
                  **overrides: Any) -> AsyncIterator[tuple[list[Pod], MailboxClient]]:
    settings = fast_settings(unique_prefix("cli"), **overrides)
    started = [await start_pod(settings, url=url or nats_url, handler=handler, consumer_id=f"pod{i}") for i in range(pods)]
    client = await MailboxClient.connect(url or nats_url, settings.prefix)
    try:
        yield started, client
    finally:
        await client.close()
        await asyncio.gather(*(p.stop(drain_timeout_ms=1000) for p in started), return_exceptions=True)


@pytest.fixture
def script() -> Script:
    return Script()


async def eventually(check: Any, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------- submit, get, list, wait


async def test_submit_get_list_wait_and_events(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        reply = await client.submit("t1", {"hello": "world"}, metadata={"k": "v"}, priority=7)
        assert reply.thread_id == "t1" and reply.status in ("queued", "running") and not reply.duplicate
        done = await client.wait(reply.run_id, timeout=10)
        assert done.status == RunStatus.DONE and done.output == {"hello": "world"}
        assert done.metadata == {"k": "v"} and done.priority == 7
        assert done.termination is not None and done.termination.type == TerminationKind.NATURAL_END
        assert [d.dispatch_id for d in done.dispatches] == [reply.dispatch_id]
        assert done.dispatches[0].status == DispatchStatus.ACKED
        assert done.record.run_id == reply.run_id

        d = await client.get_dispatch(reply.dispatch_id)
        assert d.run_id == reply.run_id and d.status == DispatchStatus.ACKED
        assert (await client.get(reply.run_id, thread_id="t1")).run_id == reply.run_id
        with pytest.raises(NotFound):
            await client.get(reply.run_id, thread_id="another-thread")

        events = await client.events(reply.run_id)
        assert [e.kind for e in events.events] == ["queued", "started", "finished"]
        assert events.last_seq == events.events[-1].seq
        assert (await client.events(reply.run_id, after=events.events[0].seq)).events == events.events[1:]

        second = await client.submit("t1", 2)
        await client.wait(second.run_id, timeout=10)
        listed = await client.list("t1")
        assert [r.run_id for r in listed.runs] == [reply.run_id, second.run_id] and listed.next_offset is None
        page = await client.list("t1", limit=1)
        assert [r.run_id for r in page.runs] == [reply.run_id] and page.next_offset == 1
        page = await client.list("t1", limit=1, offset=1)
        assert [r.run_id for r in page.runs] == [second.run_id] and page.next_offset is None
        assert (await client.list("t1", status=["running"])).runs == []
        dispatches = await client.list("t1", dispatches=True, status=["acked"])
        assert [d.run_id for d in dispatches.dispatches] == [reply.run_id, second.run_id]
        assert (await client.list("empty-thread")).runs == []


async def test_typed_errors(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        with pytest.raises(NotFound) as nf:
            await client.get("missing")
        assert nf.value.code == 404 and "missing" in nf.value.message
        with pytest.raises(BadRequest) as br:
            await client.submit("   ")
        assert br.value.code == 400 and br.value.field == "thread_id"
        with pytest.raises(BadRequest) as br:
            await client.submit("t", strategy="sideways")  # type: ignore[arg-type]
        assert br.value.field == "strategy"
        with pytest.raises(BadRequest) as br:
            await client.list("t", status=["bogus"])
        assert br.value.field == "status"
        assert isinstance(br.value, MailboxApiError)
    # nobody serves this prefix
    client = await MailboxClient.connect(nats_url, unique_prefix("nobody"), timeout=1)
    try:
        with pytest.raises(Unavailable) as un:
            await client.stats()
        assert un.value.code == 503 and "no mailbox service" in un.value.message
    finally:
        await client.close()


async def test_connect_fails_fast_when_nats_is_not_there():
    with pytest.raises(Exception) as info:
        await MailboxClient.connect("nats://127.0.0.1:1", connect_attempts=1)
    assert "NoServers" in type(info.value).__name__


async def test_a_client_on_a_shared_connection_leaves_it_open(nats_url, script):
    async with mailbox(nats_url, script) as (pods, _):
        async with await MailboxClient.connect(pods[0].nc, pods[0].settings.prefix) as shared:
            assert (await shared.stats()).pods == 1
        assert pods[0].nc.is_connected


# ---------------------------------------------------------------------- strategies on a busy thread


async def test_enqueue_queues_behind_the_active_run(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        first = await client.submit("t", {"do": "block"})
        await asyncio.wait_for(script.blocked.wait(), 5)
        second = await client.submit("t", "next", strategy="enqueue")
        assert second.status == "queued"
        assert (await client.get(second.run_id)).status == RunStatus.CREATED
        assert (await client.stats()).active_runs == 1
        script.release.set()
        assert (await client.wait(second.run_id, timeout=10)).output == "next"
        assert (await client.get(first.run_id)).status == RunStatus.DONE
        assert script.started == [{"do": "block"}, "next"]


async def test_reject_fails_with_409_when_the_thread_is_busy(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        await client.submit("t", {"do": "block"})
        await asyncio.wait_for(script.blocked.wait(), 5)
        with pytest.raises(Conflict) as info:
            await client.submit("t", "no", strategy="reject")
        assert info.value.code == 409 and info.value.field == "strategy"
        assert [r.input for r in (await client.list("t")).runs] == [{"do": "block"}]
        ok = await client.submit("other-thread", "yes", strategy="reject")
        assert (await client.wait(ok.run_id, timeout=10)).output == "yes"
        script.release.set()


async def test_interrupt_strategy_supersedes_queued_and_cancels_the_active_run(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        active = await client.submit("t", {"do": "block"})
        await asyncio.wait_for(script.blocked.wait(), 5)
        queued = await client.submit("t", "stale")
        latest = await client.submit("t", "latest", strategy="interrupt")
        assert (await client.wait(latest.run_id, timeout=10)).output == "latest"
        a = await client.wait(active.run_id, timeout=10)
        q = await client.wait(queued.run_id, timeout=10)
        for run in (a, q):
            assert run.termination is not None and run.termination.type == TerminationKind.CANCELLED
        assert (await client.get_dispatch(queued.dispatch_id)).status == DispatchStatus.SUPERSEDED
        assert script.cancelled == [active.run_id]
        assert "stale" not in script.started
        kinds = [e.kind for e in (await client.events(queued.run_id)).events]
        assert kinds[-1] == "superseded"


async def test_steer_hands_the_input_to_the_active_run_else_enqueues(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        active = await client.submit("t", {"do": "input"})
        await asyncio.wait_for(script.blocked.wait(), 5)
        steered = await client.submit("t", "more", strategy="steer")
        assert steered.steered and steered.run_id == active.run_id and steered.status == "running"
        assert steered.dispatch_id == active.dispatch_id
        assert (await client.wait(active.run_id, timeout=10)).output == {"got": "more"}
        await no_live_run(client, "t")
        idle = await client.submit("t", "fresh", strategy="steer")
        assert not idle.steered and idle.run_id != active.run_id
        assert (await client.wait(idle.run_id, timeout=10)).output == "fresh"


# ---------------------------------------------------------------------- idempotency


async def test_submit_is_idempotent_on_run_id_and_dedupe_key(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        await client.submit("t", {"do": "block"})
        await asyncio.wait_for(script.blocked.wait(), 5)
        a = await client.submit("t", "x", run_id="my-run")
        again = await client.submit("t", "x", run_id="my-run")
        assert again.duplicate and (again.run_id, again.dispatch_id) == (a.run_id, a.dispatch_id) == ("my-run", a.dispatch_id)
        with pytest.raises(Conflict) as info:
            await client.submit("another-thread", "x", run_id="my-run")
        assert info.value.field == "run_id"

        d1 = await client.submit("t", "y", dedupe_key="k1")
        d2 = await client.submit("t", "y2", dedupe_key="k1")
        assert d2.duplicate and d2.run_id == d1.run_id and d2.dispatch_id == d1.dispatch_id
        assert [r.input for r in (await client.list("t")).runs].count("y2") == 0

        script.release.set()
        await client.wait(d1.run_id, timeout=10)
        # the dedupe key is free again once its dispatch is done
        d3 = await client.submit("t", "z", dedupe_key="k1")
        assert not d3.duplicate and d3.run_id != d1.run_id
        # a finished run_id stays a duplicate
        assert (await client.submit("t", "x", run_id="my-run")).duplicate


# ---------------------------------------------------------------------- cancel, interrupt


async def test_cancel_by_run_dispatch_and_thread(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        active = await client.submit("t", {"do": "block"})
        await asyncio.wait_for(script.blocked.wait(), 5)
        q1 = await client.submit("t", "q1")
        q2 = await client.submit("t", "q2")
        q3 = await client.submit("t", "q3")

        by_run = await client.cancel(run_id=q1.run_id)
        assert by_run.cancelled == [q1.dispatch_id] and by_run.signalled == []
        by_dispatch = await client.cancel(dispatch_id=q2.dispatch_id)
        assert by_dispatch.cancelled == [q2.dispatch_id]
        for r in (q1, q2):
            run = await client.get(r.run_id)
            assert run.status == RunStatus.DONE and run.termination.type == TerminationKind.CANCELLED
            assert (await client.events(r.run_id)).events[-1].kind == "cancelled"

        by_thread = await client.cancel(thread_id="t")
        assert by_thread.cancelled == [q3.dispatch_id] and by_thread.signalled == [active.run_id]
        cancelled = await client.wait(active.run_id, timeout=10)
        assert cancelled.termination.type == TerminationKind.CANCELLED
        assert script.cancelled == [active.run_id]
        # nothing left: cancelling again is a no-op, unknown ids are 404
        assert (await client.cancel(run_id=q1.run_id)).cancelled == []
        with pytest.raises(NotFound):
            await client.cancel(thread_id="never-used")
        with pytest.raises(BadRequest):
            await client.cancel(run_id="a", dispatch_id="b")


async def test_interrupt_endpoint(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        active = await client.submit("t", {"do": "block"})
        await asyncio.wait_for(script.blocked.wait(), 5)
        queued = await client.submit("t", "later")
        reply = await client.interrupt("t")
        assert reply.new_dispatch_epoch == 1
        assert reply.superseded == [queued.dispatch_id]
        assert reply.active_run_id == active.run_id and reply.active_cancelled
        await client.wait(active.run_id, timeout=10)
        assert (await client.get(queued.run_id)).termination.type == TerminationKind.CANCELLED
        # the thread works on afterwards
        after = await client.submit("t", "after")
        assert (await client.wait(after.run_id, timeout=10)).output == "after"
        with pytest.raises(NotFound):
            await client.interrupt("no-such-thread")


# ---------------------------------------------------------------------- decide, send


async def test_decide_live_to_a_waiting_run(nats_url):
    async with mailbox(nats_url, approval) as (_, client):
        run = await client.submit("t", {"question": "ship it?"})
        waiting = await eventually(lambda: _waiting(client, run.run_id))
        assert waiting.waiting.ticket == "approval" and waiting.waiting.prompt == {"question": "ship it?"}
        with pytest.raises(Conflict) as info:
            await client.decide(run.run_id, "wrong-ticket", True)
        assert info.value.field == "ticket"
        reply = await client.decide(run.run_id, "approval", {"approved": True})
        assert reply.delivered == "live"
        done = await client.wait(run.run_id, timeout=10)
        assert done.output == {"approved": True, "decision": {"approved": True}}
        kinds = [e.kind for e in (await client.events(run.run_id)).events]
        assert kinds == ["queued", "started", "suspended", "resumed", "finished"]
        with pytest.raises(Conflict):
            await client.decide(run.run_id, "approval", True)


async def test_decide_durably_resumes_a_run_whose_attempt_ended_waiting(nats_url):
    async with mailbox(nats_url, approval, decision_wait_ms=200) as (_, client):
        run = await client.submit("t", "approve?")

        async def parked() -> Any:
            view = await client.get(run.run_id)
            return view if view.status == RunStatus.WAITING and view.dispatches[-1].status == DispatchStatus.ACKED else None

        await eventually(parked)
        reply = await client.decide(run.run_id, "approval", False)
        assert reply.delivered == "durable" and reply.dispatch_id
        done = await client.wait(run.run_id, timeout=10)
        assert done.output == {"approved": False, "decision": False}
        assert [d.dispatch_id for d in done.dispatches][-1] == reply.dispatch_id


async def no_live_run(client: MailboxClient, thread_id: str) -> Any:
    """Wait until no run of the thread takes live input any more. (The worker records a run
    as done before it closes the run's live subscription, so for a moment a finished run can
    still be handed input that nobody reads.)"""

    async def idle() -> Any:
        reply = await client.send(None, thread_id=thread_id)
        return reply if not reply.delivered else None

    return await eventually(idle)


async def _waiting(client: MailboxClient, run_id: str) -> Any:
    view = await client.get(run_id)
    return view if view.status == RunStatus.WAITING else None


async def test_send_delivers_input_to_the_active_run(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        run = await client.submit("t", {"do": "input"})
        await asyncio.wait_for(script.blocked.wait(), 5)
        reply = await client.send({"text": "hi"}, thread_id="t")
        assert reply.delivered and reply.run_id == run.run_id
        assert (await client.wait(run.run_id, timeout=10)).output == {"got": {"text": "hi"}}
        idle = await no_live_run(client, "t")
        assert not idle.delivered and idle.reason
        by_run = await client.send("late", run_id=run.run_id)
        assert not by_run.delivered
        with pytest.raises(NotFound):
            await client.send("x", run_id="no-such-run")
        with pytest.raises(BadRequest) as info:
            await client.send("x", run_id=run.run_id, thread_id="other")
        assert info.value.field == "thread_id"


# ---------------------------------------------------------------------- dead letters


async def test_dead_letters_list_and_replay(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        run = await client.submit("t", {"do": "fail"})
        failed = await client.wait(run.run_id, timeout=10)
        assert failed.error == "broken for good"
        assert failed.termination.type == TerminationKind.ERROR
        dead = await client.dead_letters()
        assert [d.dispatch_id for d in dead.dispatches] == [run.dispatch_id]
        assert dead.dispatches[0].last_error == "broken for good"
        assert [d.dispatch_id for d in (await client.dead_letters(thread_id="t")).dispatches] == [run.dispatch_id]
        assert (await client.dead_letters(thread_id="other")).dispatches == []
        assert (await client.stats()).depth["dead_letter"] == 1
        assert (await client.events(run.run_id)).events[-1].kind == "dead_lettered"

        with pytest.raises(Conflict):  # only a dead letter can be replayed
            await client.replay((await client.submit("t2", "ok")).dispatch_id)
        script.healed = True
        replay = await client.replay(run.dispatch_id)
        assert replay.run_id == run.run_id and replay.thread_id == "t" and replay.dispatch_id != run.dispatch_id
        done = await client.wait(run.run_id, timeout=10)
        assert done.status == RunStatus.DONE and done.output == {"do": "fail"} and done.error is None
        assert [d.dispatch_id for d in done.dispatches] == [run.dispatch_id, replay.dispatch_id]
        with pytest.raises(Conflict):  # replayed already: it moved on
            await client.replay(run.dispatch_id)
        with pytest.raises(NotFound):
            await client.replay("no-such-dispatch")


async def test_dead_letters_paginate(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        runs = [await client.submit(f"t{i}", {"do": "fail"}) for i in range(3)]
        for r in runs:
            await client.wait(r.run_id, timeout=10)
        first = await client.dead_letters(limit=2)
        assert len(first.dispatches) == 2 and first.next_offset == 2
        rest = await client.dead_letters(limit=2, offset=2)
        assert len(rest.dispatches) == 1 and rest.next_offset is None
        assert {d.dispatch_id for d in first.dispatches + rest.dispatches} == {r.dispatch_id for r in runs}


# ---------------------------------------------------------------------- stats


async def test_stats(nats_url, script):
    async with mailbox(nats_url, script, pods=2) as (_, client):
        await client.submit("t", {"do": "block"})
        await asyncio.wait_for(script.blocked.wait(), 5)
        await client.submit("t", "queued")
        stats = await client.stats()
        assert stats.pods == 2 and stats.active_runs == 1
        assert stats.depth == {"queued": 1, "claimed": 1, "acked": 0, "cancelled": 0, "superseded": 0, "dead_letter": 0}
        script.release.set()


# ---------------------------------------------------------------------- following


async def test_a_follower_receives_every_event_of_a_run_in_order(nats_url, script):
    async with mailbox(nats_url, script) as (pods, client):
        run = await client.submit("t", {"do": "steps", "n": 20})
        got: list[Event] = []

        async def follow() -> None:
            async for e in client.follow(run.run_id):
                got.append(e)

        task = asyncio.create_task(follow())
        await asyncio.wait_for(script.blocked.wait(), 5)
        script.release.set()
        await asyncio.wait_for(task, 10)
        stored = await pods[0].events.history(run.run_id)
        assert got == stored
        assert [e.kind for e in got] == ["queued", "started"] + ["step"] * 20 + ["finished"]
        assert [e.data for e in got if e.kind == "step"] == list(range(20))
        assert all(a.seq < b.seq for a, b in zip(got, got[1:]))


async def test_a_follower_that_disconnects_mid_run_reattaches_through_another_pod_without_gap_or_duplicate(
    nats_url, script
):
    prefix = unique_prefix("reattach")
    settings = fast_settings(prefix)
    worker = await start_pod(settings, url=nats_url, handler=script, consumer_id="worker")
    api_only = await start_pod(settings, url=nats_url, handler=script, consumer_id="api-only", start_worker=False)
    try:
        first = await MailboxClient.connect(nats_url, prefix)
        run = await first.submit("t", {"do": "steps", "n": 10})
        seen: list[Event] = []
        async for e in first.follow(run.run_id):
            seen.append(e)
            if e.kind == "step" and e.data == 4:
                break  # the run is blocked halfway: disconnect mid-run
        await first.close()
        await asyncio.wait_for(script.blocked.wait(), 5)
        assert (await worker.store.load_run(run.run_id)).status == RunStatus.RUNNING

        await worker.api.stop()  # from now on only the other pod answers
        script.release.set()
        second = await MailboxClient.connect(nats_url, prefix)
        try:
            rest = [e async for e in second.follow(run.run_id, after=seen[-1].seq)]
        finally:
            await second.close()
        stored = await worker.events.history(run.run_id)
        assert seen + rest == stored
        assert [e.data for e in seen + rest if e.kind == "step"] == list(range(10))
        assert rest[-1].kind == "finished"
        served = {e["name"]: e["num_requests"] for e in api_only.api.stats().to_dict()["endpoints"]}
        assert served["events"] >= 1
    finally:
        await asyncio.gather(worker.stop(drain_timeout_ms=1000), api_only.stop(drain_timeout_ms=1000))


async def test_a_follower_reattaches_by_itself_when_its_pod_stops(nats_url, script):
    prefix = unique_prefix("reattach")
    settings = fast_settings(prefix)
    worker = await start_pod(settings, url=nats_url, handler=script, consumer_id="worker")
    spare = await start_pod(settings, url=nats_url, handler=script, consumer_id="spare", start_worker=False)
    client = await MailboxClient.connect(nats_url, prefix)
    try:
        run = await client.submit("t", {"do": "steps", "n": 10})
        got: list[Event] = []

        async def follow() -> None:
            async for e in client.follow(run.run_id):
                got.append(e)

        task = asyncio.create_task(follow())
        await asyncio.wait_for(script.blocked.wait(), 5)
        await asyncio.sleep(0.3)  # a long poll is waiting somewhere now
        await worker.api.stop()
        await asyncio.sleep(0.2)
        script.release.set()
        await asyncio.wait_for(task, 10)
        assert got == await worker.events.history(run.run_id)
        assert got[-1].kind == "finished"
    finally:
        await client.close()
        await asyncio.gather(worker.stop(drain_timeout_ms=1000), spare.stop(drain_timeout_ms=1000))


async def test_follow_and_wait_survive_a_nats_server_restart(nats_server, script):
    async with mailbox(nats_server.url, script, url=nats_server.url) as (pods, client):
        run = await client.submit("t", {"do": "steps", "n": 10})
        got: list[Event] = []

        async def follow() -> None:
            async for e in client.follow(run.run_id, wait_ms=2000):
                got.append(e)

        task = asyncio.create_task(follow())
        waiter = asyncio.create_task(client.wait(run.run_id, poll=1.0))
        await asyncio.wait_for(script.blocked.wait(), 5)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(nats_server.restart)
        await asyncio.sleep(0.5)
        script.release.set()
        await asyncio.wait_for(task, 30)
        final = await asyncio.wait_for(waiter, 30)
        assert final.status == RunStatus.DONE
        stored = await pods[0].events.history(run.run_id)
        assert got == stored
        assert [e.data for e in got if e.kind == "step"] == list(range(10))


async def test_follow_from_a_sequence_and_of_an_unknown_run(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        run = await client.submit("t", "x")
        await client.wait(run.run_id, timeout=10)
        every = [e async for e in client.follow(run.run_id)]
        assert [e.kind for e in every] == ["queued", "started", "finished"]
        assert [e async for e in client.follow(run.run_id, after=every[0].seq)] == every[1:]
        with pytest.raises(NotFound):
            async for _ in client.follow("no-such-run"):
                pass


async def test_wait_times_out(nats_url, script):
    async with mailbox(nats_url, script) as (_, client):
        run = await client.submit("t", {"do": "block"})
        with pytest.raises(TimeoutError):
            await client.wait(run.run_id, timeout=0.5, poll=0.2)
        script.release.set()
        assert (await client.wait(run.run_id, timeout=10)).status == RunStatus.DONE
        with pytest.raises(NotFound):
            await client.wait("no-such-run", timeout=5)


async def test_a_finished_run_leaves_nothing_for_the_cyclic_collector(nats_url, script):
    """A run's execution, handler context and live-command subscription are freed as soon as
    it ends (reference counting), not left in cycles: when every run left one behind, the
    cyclic collector took a fifth of a busy pod's CPU and paused it for up to 90 ms."""
    async with mailbox(nats_url, script) as (_, client):
        await client.wait((await client.submit("warm-up", 0)).run_id, timeout=10)
        gc.collect()
        gc.disable()
        try:
            replies = [await client.submit(f"t{i % 4}", i) for i in range(40)]
            for reply in replies:
                assert (await client.wait(reply.run_id, timeout=10)).status == RunStatus.DONE
            await asyncio.sleep(0.2)  # the last settles and chained claims finish
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = Counter(type(o).__name__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert not {name: left[name] for name in ("Execution", "RunContext", "_Hooks", "Subscription") if left[name]}
