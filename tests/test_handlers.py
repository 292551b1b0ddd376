"""The built-in handlers and the RunContext features they use, end to end on a pod."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from service.app import start_pod
from service.handlers import RunContext, load_handler
from service.model import DispatchStatus, RunStatus

from .conftest import unique_prefix
from .pods import fast_settings, submit, wait_for, wait_runs
from .test_worker import _events, _run_status


@pytest.fixture
def prefix() -> str:
    return unique_prefix("h")


async def test_echo_streams_its_input_back(nats_url, prefix):
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler="echo")
    try:
        run_id = await submit(pod, "t", "hello brave world")
        [run] = await wait_runs(pod, [run_id])
        assert run.output == "hello brave world"
        deltas = [e.data for e in await _events(pod, run_id) if e.kind == "delta"]
        assert deltas == ["hello", "brave", "world"]
    finally:
        await pod.stop()


async def test_sleep_reports_progress(nats_url, prefix):
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler="sleep")
    try:
        run_id = await submit(pod, "t", {"seconds": 1.5})
        [run] = await wait_runs(pod, [run_id])
        assert run.output == {"slept": 1.5}
        progress = [e.data for e in await _events(pod, run_id) if e.kind == "progress"]
        assert progress == [{"slept": 1.0, "of": 1.5}, {"slept": 1.5, "of": 1.5}]
        bad = await submit(pod, "t", "soon")  # not a number: permanent
        [failed] = await wait_runs(pod, [bad])
        assert (await pod.store.load_dispatch(failed.dispatch_id)).status == DispatchStatus.DEAD_LETTER
    finally:
        await pod.stop()


async def test_nats_handler_forwards_by_request_reply(nats_url, prefix):
    pod = await start_pod(fast_settings(prefix, retry_base_ms=50), url=nats_url, handler="nats")
    seen = []

    async def responder(msg):
        request = msgspec.json.decode(msg.data)
        seen.append(request)
        if request["input"] == "boom":
            await msg.respond(b'{"error": "cannot", "permanent": true}')
        else:
            await msg.respond(msgspec.json.encode({"output": request["input"].upper()}))

    sub = await pod.nc.subscribe(f"{prefix}.remote", cb=responder)
    try:
        ok = await submit(pod, "t", "shout", metadata={"subject": f"{prefix}.remote"})
        [run] = await wait_runs(pod, [ok])
        assert run.output == "SHOUT"
        assert seen[0]["run_id"] == ok and seen[0]["metadata"]["subject"] == f"{prefix}.remote"
        boom = await submit(pod, "t2", "boom", metadata={"subject": f"{prefix}.remote"})
        [dead] = await wait_runs(pod, [boom])
        assert dead.error == "cannot"
        # no responder: transient, retried, then dead-lettered after max attempts
        nobody = await submit(pod, "t3", "x", metadata={"subject": f"{prefix}.nobody"}, max_attempts=2)
        [gone] = await wait_runs(pod, [nobody])
        assert "no responder" in gone.error and gone.attempts == 2
    finally:
        await sub.unsubscribe()
        await pod.stop()


async def test_next_input_receives_what_send_delivers(nats_url, prefix):
    async def chat(run: RunContext):
        got = [await run.next_input(timeout=10) for _ in range(2)]
        return got

    pod = await start_pod(fast_settings(prefix), url=nats_url, handler=chat)
    try:
        run_id = await submit(pod, "t", None)
        await wait_for(lambda: _run_status(pod, run_id, RunStatus.RUNNING))
        await asyncio.sleep(0.1)  # the live subscription follows the start
        r1 = await pod.mailbox.send(thread_id="t", data="first")
        r2 = await pod.mailbox.send(run_id=run_id, data={"second": True})
        assert r1.delivered and r2.delivered and r1.run_id == run_id
        [run] = await wait_runs(pod, [run_id])
        assert run.output == ["first", {"second": True}]
        nobody = await pod.mailbox.send(thread_id="idle-thread", data="x")
        assert not nobody.delivered
    finally:
        await pod.stop()


def test_load_handler():
    assert load_handler("echo").__name__ == "echo"
    assert load_handler("service.handlers:approval").__name__ == "approval"
    for bad in ("nope", "service.handlers:missing", "no.such.module:f", ":x"):
        with pytest.raises(ValueError):
            load_handler(bad)
