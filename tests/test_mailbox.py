"""Control-plane edge cases: refusals change nothing, races on dedupe keys, live commands
after a run ended."""

from __future__ import annotations

import asyncio

import pytest

from service.app import start_pod
from service.handlers import RunContext
from service.model import AlreadyExistsError, RunStatus, ValidationError
from service.protocol import SubmitRequest

from .conftest import unique_prefix
from .pods import fast_settings, submit, wait_for, wait_runs
from .test_worker import _run_status


@pytest.fixture
def prefix() -> str:
    return unique_prefix("mb")


@pytest.fixture
async def control(nats_url, prefix):
    """A pod without a worker or an API: what it takes stays queued, for the test to inspect."""
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler="echo", start_worker=False, start_api=False)
    try:
        yield pod
    finally:
        await pod.stop()


async def test_a_refused_interrupting_submit_interrupts_nothing(nats_url, prefix):
    gate = asyncio.Event()

    async def blocks(run: RunContext):
        await gate.wait()
        return run.input

    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=blocks, start_api=False)
    try:
        await submit(pod, "t1", "x", dispatch_id="taken")
        active = await submit(pod, "t2", "busy")
        await wait_for(lambda: _run_status(pod, active, RunStatus.RUNNING))
        with pytest.raises(AlreadyExistsError):
            await pod.mailbox.submit(SubmitRequest(thread_id="t2", input="y", strategy="interrupt", dispatch_id="taken"))
        assert await pod.store.current_dispatch_epoch("t2") == 0
        assert (await pod.store.load_run(active)).status == RunStatus.RUNNING
    finally:
        gate.set()
        await pod.stop()


async def test_concurrent_submits_with_one_dedupe_key_make_one_run(control):
    replies = await asyncio.gather(
        *(control.mailbox.submit(SubmitRequest(thread_id="t", input=i, dedupe_key="once")) for i in range(8))
    )
    assert len({r.run_id for r in replies}) == 1
    assert sum(not r.duplicate for r in replies) == 1
    runs = await control.store.scan_runs([RunStatus.CREATED])
    assert [r.run_id for r in runs] == [replies[0].run_id]  # no orphan run for recovery to revive


async def test_live_input_to_a_finished_run_is_not_delivered(nats_url, prefix):
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler="echo", start_api=False)
    try:
        run_id = await submit(pod, "t", "hi")
        await wait_runs(pod, [run_id])
        reply = await pod.mailbox.send(thread_id="t", data="late")
        assert not reply.delivered
    finally:
        await pod.stop()


async def test_a_submit_names_its_first_dispatch_after_its_run_and_writes_no_alias_for_it(control):
    reply = await control.mailbox.submit(SubmitRequest(thread_id="t", input=1))
    assert reply.dispatch_id == reply.run_id + "#1"
    store = control.store
    assert [e.subject for e in await store._scan(f"{store._kv}id.>")] == []  # one key fewer per submit
    store._alias_cache.clear()
    assert (await store.load_dispatch(reply.dispatch_id)).run_id == reply.run_id  # found through the run
    # a dispatch id the caller names keeps its own alias
    named = await control.mailbox.submit(SubmitRequest(thread_id="t", input=2, dispatch_id="mine"))
    assert named.dispatch_id == "mine" and len(await store._scan(f"{store._kv}id.>")) == 1


async def test_a_submit_naming_a_dispatch_id_reserved_for_another_run_is_refused_and_writes_nothing(control):
    first = await control.mailbox.submit(SubmitRequest(thread_id="t", input=1))
    for req in (
        SubmitRequest(thread_id="t", input=2, dispatch_id=first.dispatch_id),  # a new run, another's id
        SubmitRequest(thread_id="u", input=2, dispatch_id="x#1", run_id="y"),
        SubmitRequest(thread_id="u", input=2, dispatch_id="#1", strategy="interrupt"),
    ):
        with pytest.raises(ValidationError) as refused:
            await control.mailbox.submit(req)
        assert refused.value.field == "dispatch_id"
    assert [d.dispatch_id for d in await control.store.list_dispatches("t")] == [first.dispatch_id]
    assert await control.store.list_dispatches("u") == [] and await control.store.load_run("y") is None
    assert await control.store.current_dispatch_epoch("u") == 0
    # naming the id a submit would give its own run's first dispatch is fine
    own = await control.mailbox.submit(SubmitRequest(thread_id="u", input=3, run_id="z", dispatch_id="z#1"))
    assert (own.run_id, own.dispatch_id) == ("z", "z#1")
