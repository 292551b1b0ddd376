"""The `mailbox` micro service on real NATS: discovery ($SRV.PING/INFO/STATS), strict
decoding and structured errors, error mapping, concurrency, and the events stream reads
(`EventStream.history/read/follow`) it is built on."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import nats
import pytest

from service import __version__
from service.api import ENDPOINT_NAMES, ENVELOPE_BYTES, MailboxApi
from service.app import Pod, start_pod
from service.config import Settings
from service.events import FINAL, Event, EventStream
from service.handlers import RunContext
from service.model import DispatchStatus, RunStatus, StoreUnavailableError
from service.protocol import SubmitRequest
from service.store import keys

from . import pods
from .conftest import unique_prefix

pytestmark = pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning:nats.micro")

def fast_settings(prefix: str, **overrides: Any) -> Settings:
    # the worker tests' settings, with quicker retries and drain
    return pods.fast_settings(prefix, **{"retry_base_ms": 50, "retry_cap_ms": 200, "drain_timeout_ms": 2000, **overrides})


async def echo(run: RunContext) -> Any:
    await run.emit("delta", run.input)
    return run.input


@asynccontextmanager
async def running_pods(nats_url: str, handler: Any = echo, n: int = 1, **overrides: Any) -> AsyncIterator[list[Pod]]:
    """`n` pods of one fresh prefix (each with the API), stopped at the end."""
    settings = fast_settings(unique_prefix("api"), **overrides)
    pods = [await start_pod(settings, url=nats_url, handler=handler, consumer_id=f"pod{i}") for i in range(n)]
    try:
        yield pods
    finally:
        await asyncio.gather(*(p.stop(drain_timeout_ms=1000) for p in pods), return_exceptions=True)


async def call(nc: Any, prefix: str, endpoint: str, body: bytes | dict[str, Any]) -> tuple[dict[str, str], Any]:
    """A raw request: (headers, decoded JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(f"{prefix}.api.{endpoint}", data, timeout=10)
    return dict(msg.headers or {}), json.loads(msg.data)


async def assert_nothing_written(pod: Pod) -> None:
    """No dispatch, no run, and no key at all in the bucket of this prefix apart from the
    maintenance leader's lease."""
    assert set((await pod.store.count_all_by_status()).values()) == {0}
    assert await pod.store.scan_runs(list(RunStatus)) == []
    js = pod.nc.jetstream()
    bucket = keys.bucket_name(pod.settings.prefix)
    info = await js.stream_info(keys.stream_of_bucket(bucket), subjects_filter=f"$KV.{bucket}.>")
    written = [s for s in info.state.subjects or {} if not s.startswith(f"$KV.{bucket}.lead.")]
    assert not written, written


# ---------------------------------------------------------------------- discovery


async def test_srv_ping_and_info_list_the_service_its_version_and_every_endpoint(nats_url):
    async with running_pods(nats_url) as [pod]:
        prefix = pod.settings.prefix
        sid = pod.api.id
        ping = json.loads((await pod.nc.request(f"$SRV.PING.mailbox.{sid}", b"", timeout=5)).data)
        assert ping["name"] == "mailbox" and ping["version"] == __version__ == "0.1.0"
        assert ping["metadata"]["prefix"] == prefix

        info = json.loads((await pod.nc.request(f"$SRV.INFO.mailbox.{sid}", b"", timeout=5)).data)
        assert info["type"] == "io.nats.micro.v1.info_response"
        assert info["name"] == "mailbox" and info["version"] == __version__
        assert info["metadata"] == {"prefix": prefix, "api": f"{prefix}.api", "pod": "pod0"}
        endpoints = {e["name"]: e for e in info["endpoints"]}
        assert tuple(endpoints) == ENDPOINT_NAMES == (
            "submit", "get", "list", "cancel", "interrupt", "decide", "send", "dead_letters", "replay", "stats", "events",
        )
        for name, e in endpoints.items():
            assert e["subject"] == f"{prefix}.api.{name}"
            assert e["queue_group"] == "q"
            assert e["metadata"]["request"].endswith("Request") and e["metadata"]["reply"]

        # discoverable by kind too: among all `mailbox` services on this server, ours answers
        inbox = pod.nc.new_inbox()
        seen: list[dict[str, Any]] = []

        async def collect(msg: Any) -> None:
            seen.append(json.loads(msg.data))

        sub = await pod.nc.subscribe(inbox, cb=collect)
        await pod.nc.publish("$SRV.INFO.mailbox", b"", reply=inbox)
        await asyncio.sleep(0.3)
        await sub.unsubscribe()
        assert sid in {s["id"] for s in seen}


async def test_srv_stats_counts_requests_and_errors_per_endpoint(nats_url):
    async with running_pods(nats_url) as [pod]:
        prefix = pod.settings.prefix
        for _ in range(3):
            headers, body = await call(pod.nc, prefix, "get", {"run_id": "missing"})
            assert headers["Nats-Service-Error-Code"] == "404"
        await call(pod.nc, prefix, "submit", {"thread_id": "t", "input": 1})
        await call(pod.nc, prefix, "submit", b"{not json")
        await call(pod.nc, prefix, "list", {"thread_id": "t"})

        stats = json.loads((await pod.nc.request(f"$SRV.STATS.mailbox.{pod.api.id}", b"", timeout=5)).data)
        assert stats["name"] == "mailbox" and stats["version"] == __version__
        by_name = {e["name"]: e for e in stats["endpoints"]}
        assert (by_name["get"]["num_requests"], by_name["get"]["num_errors"]) == (3, 3)
        assert by_name["get"]["last_error"].startswith("404:")
        assert (by_name["submit"]["num_requests"], by_name["submit"]["num_errors"]) == (2, 1)
        assert by_name["submit"]["last_error"].startswith("400:")
        assert (by_name["list"]["num_requests"], by_name["list"]["num_errors"]) == (1, 0)
        assert by_name["list"]["processing_time"] > 0 and by_name["list"]["average_processing_time"] > 0


# ---------------------------------------------------------------------- bad input

LONG = "x" * 257
WIDE = "é" * 200  # 200 characters, 400 UTF-8 bytes: over the 256-byte id limit


def bad_input_cases(max_payload: int) -> list[tuple[str, bytes | dict[str, Any], int, str | None]]:
    big = "y" * (max_payload + 1)
    return [
        # malformed JSON, wrong shapes
        ("submit", b"{", 400, None),
        ("submit", b"\xff\xfe", 400, None),
        ("submit", b'{"thread_id": "t", "input": NaN}', 400, None),
        ("submit", b"[1, 2]", 400, None),
        ("submit", b'"just a string"', 400, None),
        # unknown, missing, wrong-typed fields
        ("submit", {"thread_id": "t", "bogus": 1}, 400, "bogus"),
        ("submit", {"input": 1}, 400, "thread_id"),
        ("submit", {}, 400, "thread_id"),
        ("submit", {"thread_id": 7}, 400, "thread_id"),
        ("submit", {"thread_id": None}, 400, "thread_id"),
        ("submit", {"thread_id": "t", "priority": "high"}, 400, "priority"),
        ("submit", {"thread_id": "t", "priority": 1.5}, 400, "priority"),
        ("submit", {"thread_id": "t", "priority": True}, 400, "priority"),
        ("submit", {"thread_id": "t", "priority": 256}, 400, "priority"),
        ("submit", {"thread_id": "t", "delay_ms": -1}, 400, "delay_ms"),
        ("submit", {"thread_id": "t", "max_attempts": 0}, 400, "max_attempts"),
        ("submit", {"thread_id": "t", "metadata": {"k": 1}}, 400, "metadata"),
        ("submit", {"thread_id": "t", "metadata": ["k"]}, 400, "metadata"),
        ("submit", {"thread_id": "t", "strategy": "sideways"}, 400, "strategy"),
        ("submit", {"thread_id": "t", "strategy": None}, 400, "strategy"),
        # blank and over-long ids
        ("submit", {"thread_id": ""}, 400, "thread_id"),
        ("submit", {"thread_id": "   \t"}, 400, "thread_id"),
        ("submit", {"thread_id": LONG}, 400, "thread_id"),
        ("submit", {"thread_id": WIDE}, 400, "thread_id"),
        ("submit", {"thread_id": "t", "run_id": " "}, 400, "run_id"),
        ("submit", {"thread_id": "t", "dispatch_id": LONG}, 400, "dispatch_id"),
        ("submit", {"thread_id": "t", "dedupe_key": ""}, 400, "dedupe_key"),
        # payloads over MAILBOX_MAX_PAYLOAD
        ("submit", {"thread_id": "t", "input": big}, 400, "input"),
        ("submit", b'{"thread_id": "t", "input": "' + b"z" * (max_payload + ENVELOPE_BYTES) + b'"}', 400, "payload"),
        ("decide", {"run_id": "r", "ticket": "k", "decision": big}, 400, "decision"),
        ("send", {"thread_id": "t", "input": big}, 400, "input"),
        ("events", b" " * (max_payload + ENVELOPE_BYTES + 1), 400, "payload"),
        # get
        ("get", {}, 400, "run_id"),
        ("get", {"run_id": "a", "dispatch_id": "b"}, 400, "run_id"),
        ("get", {"run_id": ""}, 400, "run_id"),
        ("get", {"dispatch_id": WIDE}, 400, "dispatch_id"),
        ("get", {"run_id": "nope"}, 404, None),
        ("get", {"dispatch_id": "nope"}, 404, None),
        ("get", {"run_id": "nope", "thread_id": "t"}, 404, None),
        # list
        ("list", {}, 400, "thread_id"),
        ("list", {"thread_id": "t", "status": ["queued"]}, 400, "status"),
        ("list", {"thread_id": "t", "status": ["done"], "dispatches": True}, 400, "status"),
        ("list", {"thread_id": "t", "status": ["nonsense"]}, 400, "status"),
        ("list", {"thread_id": "t", "limit": 0}, 400, "limit"),
        ("list", {"thread_id": "t", "limit": 1001}, 400, "limit"),
        ("list", {"thread_id": "t", "offset": -1}, 400, "offset"),
        # cancel
        ("cancel", {}, 400, "run_id"),
        ("cancel", {"run_id": "a", "thread_id": "t"}, 400, "thread_id"),
        ("cancel", {"run_id": "nope"}, 404, None),
        ("cancel", {"dispatch_id": "nope"}, 404, None),
        ("cancel", {"thread_id": "nope"}, 404, None),
        ("cancel", {"thread_id": " "}, 400, "thread_id"),
        # interrupt
        ("interrupt", {}, 400, "thread_id"),
        ("interrupt", {"thread_id": "nope"}, 404, None),
        ("interrupt", {"thread_id": LONG}, 400, "thread_id"),
        # decide
        ("decide", {"run_id": "r"}, 400, "ticket"),
        ("decide", {"run_id": "r", "ticket": " "}, 400, "ticket"),
        ("decide", {"run_id": "nope", "ticket": "approval"}, 404, None),
        # send
        ("send", {}, 400, "thread_id"),
        ("send", {"run_id": "nope"}, 404, None),
        ("send", {"run_id": "nope", "thread_id": "t"}, 404, None),
        ("send", {"thread_id": "t", "extra": True}, 400, "extra"),
        # dead letters, replay
        ("dead_letters", {"limit": -1}, 400, "limit"),
        ("dead_letters", {"thread_id": ""}, 400, "thread_id"),
        ("replay", {}, 400, "dispatch_id"),
        ("replay", {"dispatch_id": "nope"}, 404, None),
        # stats, events
        ("stats", {"verbose": True}, 400, "verbose"),
        ("events", {}, 400, "run_id"),
        ("events", {"run_id": "nope"}, 404, None),
        ("events", {"run_id": "r", "after": -1}, 400, "after"),
        ("events", {"run_id": "r", "wait_ms": 3_600_000}, 400, "wait_ms"),
    ]


async def test_bad_input_gets_structured_errors_with_code_and_field_and_writes_nothing(nats_url):
    max_payload = 2048
    async with running_pods(nats_url, max_payload=max_payload) as [pod]:
        prefix = pod.settings.prefix
        failures = []
        for endpoint, body, code, field in bad_input_cases(max_payload):
            headers, reply = await call(pod.nc, prefix, endpoint, body)
            error = reply.get("error") if isinstance(reply, dict) else None
            got = (
                headers.get("Nats-Service-Error-Code"),
                error and error.get("code"),
                error and error.get("field"),
            )
            if got != (str(code), code, field) or not error.get("message") or not headers.get("Nats-Service-Error"):
                failures.append((endpoint, str(body)[:80], code, field, got, error))
        assert not failures, "\n".join(map(repr, failures))
        await assert_nothing_written(pod)
        # and the service still answers
        _, stats = await call(pod.nc, prefix, "stats", b"")
        assert stats["pods"] == 1


async def test_an_empty_body_counts_as_an_empty_object(nats_url):
    async with running_pods(nats_url) as [pod]:
        headers, reply = await call(pod.nc, pod.settings.prefix, "stats", b"")
        assert "Nats-Service-Error" not in headers and reply["depth"]["queued"] == 0
        headers, reply = await call(pod.nc, pod.settings.prefix, "submit", b"  ")
        assert reply["error"] == {"code": 400, "message": "Object missing required field `thread_id`", "field": "thread_id"}


async def test_stats_reads_what_changed_since_it_last_looked_not_the_bucket(nats_url):
    async with running_pods(nats_url, sweep_interval_ms=3_600_000) as [pod]:
        prefix = pod.settings.prefix
        async def finished(run_id: str) -> None:
            for _ in range(200):
                run = await pod.store.load_run(run_id)
                d = await pod.store.load_dispatch(run.dispatch_id) if run is not None else None
                if run is not None and run.is_done and d is not None and d.status.is_terminal:
                    return
                await asyncio.sleep(0.02)

        for i in range(3):
            _, reply = await call(pod.nc, prefix, "submit", {"thread_id": f"t{i}", "input": i})
            await finished(reply["run_id"])  # quiet: nothing is written between the next two looks
        _, first = await call(pod.nc, prefix, "stats", b"")
        before = pod.store.stats.scanned_keys
        _, again = await call(pod.nc, prefix, "stats", b"")
        assert pod.store.stats.scanned_keys == before  # nothing written since: nothing read
        assert again["depth"] == first["depth"]
        _, reply = await call(pod.nc, prefix, "submit", {"thread_id": "t9", "input": 9})
        await finished(reply["run_id"])
        _, last = await call(pod.nc, prefix, "stats", b"")
        assert sum(last["depth"].values()) == sum(first["depth"].values()) + 1
        assert pod.store.stats.scanned_keys - before < 20  # the new run's keys, not the bucket


async def test_error_messages_name_the_problem(nats_url):
    async with running_pods(nats_url) as [pod]:
        p = pod.settings.prefix
        assert (await call(pod.nc, p, "submit", {"thread_id": " "}))[1]["error"]["message"] == "thread_id must not be blank"
        assert "unknown field `bogus`" in (await call(pod.nc, p, "submit", {"thread_id": "t", "bogus": 1}))[1]["error"]["message"]
        assert (await call(pod.nc, p, "submit", b"{"))[1]["error"]["message"].startswith("malformed JSON")
        assert (await call(pod.nc, p, "get", {"run_id": "r1"}))[1]["error"]["message"] == "run 'r1' not found"
        wide = (await call(pod.nc, p, "submit", {"thread_id": WIDE}))[1]["error"]
        assert wide["message"] == "thread_id must be at most 256 bytes"
        long = (await call(pod.nc, p, "submit", {"thread_id": LONG}))[1]["error"]
        assert long == {"code": 400, "message": "thread_id must be at most 256 bytes", "field": "thread_id"}
        typed = (await call(pod.nc, p, "submit", {"thread_id": "t", "priority": "high"}))[1]["error"]
        assert typed["message"] == "priority: Expected `int`, got `str`"


async def test_a_header_never_carries_a_newline_from_user_input(nats_url):
    async with running_pods(nats_url) as [pod]:
        headers, reply = await call(pod.nc, pod.settings.prefix, "get", {"run_id": "a\r\nX-Injected: 1"})
        assert headers["Nats-Service-Error-Code"] == "404"
        assert "X-Injected" not in headers and "\n" not in headers["Nats-Service-Error"]
        assert reply["error"]["message"] == "run 'a\r\nX-Injected: 1' not found"


# ---------------------------------------------------------------------- error mapping, robustness


async def test_store_unavailable_is_503_and_an_unexpected_exception_is_500_and_logged(nats_url, monkeypatch, caplog):
    async with running_pods(nats_url) as [pod]:
        prefix = pod.settings.prefix

        async def unavailable(run_id: str) -> None:
            raise StoreUnavailableError("the bucket did not answer")

        async def broken(run_id: str) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(pod.store, "load_run", unavailable)
        headers, reply = await call(pod.nc, prefix, "get", {"run_id": "r"})
        assert headers["Nats-Service-Error-Code"] == "503"
        assert reply["error"] == {"code": 503, "message": "the bucket did not answer"}

        monkeypatch.setattr(pod.store, "load_run", broken)
        with caplog.at_level(logging.ERROR, logger="mailbox.api"):
            headers, reply = await call(pod.nc, prefix, "get", {"run_id": "r"})
        assert headers["Nats-Service-Error-Code"] == "500"
        assert reply["error"]["code"] == 500 and "RuntimeError" in reply["error"]["message"]
        assert any("api_internal_error" in r.getMessage() and r.exc_info for r in caplog.records)

        monkeypatch.undo()
        headers, reply = await call(pod.nc, prefix, "get", {"run_id": "r"})
        assert headers["Nats-Service-Error-Code"] == "404"


async def test_a_request_without_reply_subject_is_ignored_safely(nats_url):
    async with running_pods(nats_url) as [pod]:
        await pod.nc.publish(f"{pod.settings.prefix}.api.get", b'{"run_id": "x"}')
        await pod.nc.publish(f"{pod.settings.prefix}.api.get", b"garbage")
        await pod.nc.flush()
        await asyncio.sleep(0.1)
        _, reply = await call(pod.nc, pod.settings.prefix, "stats", b"{}")
        assert reply["pods"] == 1


async def test_requests_are_served_concurrently_a_long_poll_holds_up_nothing(nats_url):
    async with running_pods(nats_url) as [pod]:
        p = pod.settings.prefix
        _, sub = await call(pod.nc, p, "submit", {"thread_id": "t", "input": "x"})
        await asyncio.sleep(0.3)
        _, first = await call(pod.nc, p, "events", {"run_id": sub["run_id"]})
        last = first["last_seq"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        polls = [
            asyncio.create_task(call(pod.nc, p, "events", {"run_id": sub["run_id"], "after": last, "wait_ms": 1500}))
            for _ in range(3)
        ]
        await asyncio.sleep(0.1)
        _, quick = await call(pod.nc, p, "events", {"run_id": sub["run_id"]})
        assert loop.time() - started < 1.0 and quick["events"]
        results = await asyncio.gather(*polls)
        assert all(r[1] == {"last_seq": last} for r in results)
        assert 1.4 < loop.time() - started < 3.0  # the three polls waited side by side


async def test_stopping_the_api_answers_long_polls_at_once(nats_url):
    async with running_pods(nats_url) as [pod]:
        p = pod.settings.prefix
        _, sub = await call(pod.nc, p, "submit", {"thread_id": "t", "input": "x"})
        await asyncio.sleep(0.3)
        _, first = await call(pod.nc, p, "events", {"run_id": sub["run_id"]})
        loop = asyncio.get_running_loop()
        poll = asyncio.create_task(
            call(pod.nc, p, "events", {"run_id": sub["run_id"], "after": first["last_seq"], "wait_ms": 20_000})
        )
        await asyncio.sleep(0.3)
        started = loop.time()
        await pod.api.stop()
        _, reply = await poll
        assert reply == {"last_seq": first["last_seq"]}
        assert loop.time() - started < 2.0
        with pytest.raises(nats.errors.NoRespondersError):
            await pod.nc.request(f"{p}.api.stats", b"", timeout=2)


async def test_pods_of_one_prefix_share_the_api_and_stats_counts_them(nats_url):
    async with running_pods(nats_url, n=3) as pods:
        p = pods[0].settings.prefix
        _, stats = await call(pods[0].nc, p, "stats", b"")
        assert stats["pods"] == 3
        # every request is answered once, by some pod
        replies = await asyncio.gather(*(call(pods[0].nc, p, "get", {"run_id": f"r{i}"}) for i in range(30)))
        assert all(h["Nats-Service-Error-Code"] == "404" for h, _ in replies)
        served = []
        for pod in pods:
            s = json.loads((await pod.nc.request(f"$SRV.STATS.mailbox.{pod.api.id}", b"", timeout=5)).data)
            served.append(next(e for e in s["endpoints"] if e["name"] == "get")["num_requests"])
        assert sum(served) == 30


async def test_stopping_one_pod_mid_traffic_loses_no_request(nats_url):
    """A rolling restart: requests already delivered to the stopping pod are still answered
    (its subscriptions are drained), the others go to the remaining pod."""
    async with running_pods(nats_url, n=2) as [a, b]:
        p = a.settings.prefix
        client = await nats.connect(nats_url)
        try:
            async def one(i: int) -> str:
                msg = await client.request(f"{p}.api.get", json.dumps({"run_id": f"r{i}"}).encode(), timeout=15)
                return (msg.headers or {}).get("Nats-Service-Error-Code", "")

            N = 1000
            tasks = [asyncio.create_task(one(i)) for i in range(N)]
            await asyncio.sleep(0.005)
            await a.api.stop()
            codes = await asyncio.gather(*tasks, return_exceptions=True)
            assert codes == ["404"] * N
            served_by_b = next(e for e in b.api.stats().endpoints if e.name == "get").num_requests
            assert 0 < served_by_b < N, served_by_b  # both pods took part
        finally:
            await client.close()


async def test_start_pod_without_api(nats_url):
    pod = await start_pod(fast_settings(unique_prefix("noapi")), url=nats_url, handler=echo, start_api=False)
    try:
        assert pod.api is None
        with pytest.raises(nats.errors.NoRespondersError):
            await pod.nc.request(f"{pod.settings.prefix}.api.stats", b"", timeout=2)
    finally:
        await pod.stop()


async def test_mailbox_api_can_be_called_without_nats_transport(nats_url):
    async with running_pods(nats_url) as [pod]:
        api = MailboxApi(mailbox=pod.mailbox, store=pod.store, events=pod.events, prefix=pod.settings.prefix)
        reply = msgspec.json.decode(await api.call("submit", b'{"thread_id": "t", "input": 5}'))
        assert reply["thread_id"] == "t"
        with pytest.raises(Exception) as info:
            await api.call("nonsense", b"{}")
        assert info.value.code == 404


# ---------------------------------------------------------------------- events stream


async def publish_events(stream: EventStream, run_id: str, kinds: list[str], thread_id: str = "t") -> list[int]:
    return [
        await stream.publish(Event(kind=k, run_id=run_id, dispatch_id="d", thread_id=thread_id, attempt=1, ts_ms=i))
        for i, k in enumerate(kinds)
    ]


@pytest.fixture
async def event_stream(nats_url):
    nc = await nats.connect(nats_url)
    stream = EventStream(nc, unique_prefix("ev"))
    await stream.ensure(replicas=1, max_age_ms=60_000)
    yield stream
    await stream.close()
    await nc.close()


async def test_history_reads_only_this_runs_events_after_a_sequence(event_stream):
    a = await publish_events(event_stream, "run-a", ["queued", "started"])
    await publish_events(event_stream, "run-b", ["queued"], thread_id="other")
    a += await publish_events(event_stream, "run-a", ["delta", "finished"])
    events = await event_stream.history("run-a")
    assert [e.kind for e in events] == ["queued", "started", "delta", "finished"]
    assert [e.seq for e in events] == a
    assert [e.seq for e in await event_stream.history("run-a", after=a[1])] == a[2:]
    assert await event_stream.history("run-a", after=a[-1]) == []
    assert await event_stream.history("nobody") == []
    assert [e.seq for e in await event_stream.history("run-a", limit=3)] == a[:3]


async def test_history_pages_through_more_events_than_one_batch(event_stream):
    seqs = await publish_events(event_stream, "busy", ["delta"] * 600)
    events = await event_stream.history("busy")
    assert [e.seq for e in events] == seqs
    events, last = await event_stream.scan("busy", after=seqs[100], limit=300)
    assert [e.seq for e in events] == seqs[101:401] and last == seqs[400]


async def test_garbage_on_the_subject_is_skipped_but_counted_as_read(event_stream):
    seqs = await publish_events(event_stream, "r", ["queued"])
    ack = await event_stream.js.publish(keys.events_subject(event_stream.prefix, "t", "r"), b"not an event")
    seqs += await publish_events(event_stream, "r", ["finished"])
    events, last = await event_stream.scan("r")
    assert [e.seq for e in events] == [seqs[0], seqs[1]] and last == seqs[1]
    events, last = await event_stream.scan("r", after=seqs[0], limit=1)
    assert [e.seq for e in events] == [seqs[1]] and ack.seq < seqs[1]


async def test_read_long_polls_for_the_next_event(event_stream):
    seqs = await publish_events(event_stream, "r", ["queued"])
    loop = asyncio.get_running_loop()

    async def later() -> None:
        await asyncio.sleep(0.3)
        await publish_events(event_stream, "r", ["started"])

    task = asyncio.create_task(later())
    started = loop.time()
    events, last = await event_stream.read("r", after=seqs[0], wait=5)
    assert [e.kind for e in events] == ["started"] and last == events[0].seq
    assert 0.25 < loop.time() - started < 1.5
    await task
    started = loop.time()
    assert await event_stream.read("r", after=last, wait=0.3) == ([], last)
    assert loop.time() - started >= 0.3


async def test_follow_yields_every_event_live_in_order_and_stops_after_the_final_one(event_stream):
    seqs = await publish_events(event_stream, "r", ["queued", "started"])
    got: list[Event] = []

    async def consume() -> None:
        async for e in event_stream.follow("r"):
            got.append(e)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    seqs += await publish_events(event_stream, "r", ["delta", "delta"])
    await publish_events(event_stream, "other", ["finished"])
    seqs += await publish_events(event_stream, "r", ["finished", "delta"])
    await asyncio.wait_for(task, 5)
    assert [e.seq for e in got] == seqs[:5] and got[-1].kind == "finished"
    assert "finished" in FINAL
    # from a sequence: the rest only
    rest = [e async for e in event_stream.follow("r", after=seqs[2])]
    assert [e.seq for e in rest] == seqs[3:5]


async def test_follow_survives_a_server_restart_without_gap_or_duplicate(nats_server):
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    stream = EventStream(nc, "restart", timeout=1.0)
    await stream.ensure(replicas=1, max_age_ms=60_000)
    try:
        seqs = await publish_events(stream, "r", ["queued", "started"])
        got: list[Event] = []
        first_two = asyncio.Event()

        async def consume() -> None:
            async for e in stream.follow("r", poll_interval=0.2):
                got.append(e)
                if len(got) == 2:
                    first_two.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first_two.wait(), 5)
        await asyncio.to_thread(nats_server.restart)
        for _ in range(100):  # the publisher reconnects too
            try:
                seqs += await publish_events(stream, "r", ["delta"])
                break
            except Exception:
                await asyncio.sleep(0.1)
        seqs += await publish_events(stream, "r", ["delta", "finished"])
        await asyncio.wait_for(task, 15)
        assert [e.seq for e in got] == seqs
        assert [e.kind for e in got] == ["queued", "started", "delta", "delta", "finished"]
    finally:
        await stream.close()
        await nc.close()


async def test_follow_of_a_closed_connection_raises(nats_url):
    nc = await nats.connect(nats_url)
    stream = EventStream(nc, unique_prefix("ev"))
    await stream.ensure(replicas=1, max_age_ms=60_000)
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        async for _ in stream.follow("r"):
            pass


async def test_an_existing_events_stream_gets_direct_get_enabled(nats_url):
    nc = await nats.connect(nats_url)
    try:
        prefix = unique_prefix("ev")
        js = nc.jetstream()
        await js.add_stream(name=f"{prefix}-events", subjects=[f"{prefix}.events.>"])
        stream = EventStream(nc, prefix)
        await stream.ensure(replicas=1, max_age_ms=60_000)
        info = await js.stream_info(f"{prefix}-events")
        assert info.config.allow_direct and info.config.max_age == 60
        await publish_events(stream, "r", ["queued"])
        assert [e.kind for e in await stream.history("r")] == ["queued"]
        await stream.close()
    finally:
        await nc.close()


async def test_the_worker_lifecycle_events_carry_their_stream_sequence(nats_url):
    async with running_pods(nats_url) as [pod]:
        reply = await pod.mailbox.submit(SubmitRequest(thread_id="t", input="hi"))
        events = [e async for e in pod.events.follow(reply.run_id)]
        assert [e.kind for e in events] == ["queued", "started", "delta", "finished"]
        assert all(a.seq < b.seq for a, b in zip(events, events[1:]))
        run = await pod.store.load_run(reply.run_id)
        assert run is not None and run.status == RunStatus.DONE
        assert (await pod.store.count_all_by_status())[DispatchStatus.ACKED] == 1
