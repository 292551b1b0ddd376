"""Our client's fast paths behave exactly like nats-py's own code (service/natsclient.py):
the same bytes on the wire for a publish, the same messages out of any split of the same
protocol stream, the same headers parsed; and requests still work end to end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats import errors
from nats.aio.client import Client
from nats.protocol.parser import Parser

from service.natsclient import MailboxNatsClient, OffsetParser, _result_of, connect, subscribe_inline

HEADER_NAMES = st.sampled_from(
    ["Nats-Expected-Last-Subject-Sequence", "KV-Operation", "traceparent", "Nats-TTL", "X-A", " padded ", "bad name",
     "bad:name", "", "Ünï"]
)
HEADER_VALUES = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
    st.sampled_from(["1", " 2 ", "a\r\nPUB x 1", "v\n", "PURGE"]),
)


class Recorder:
    """What a parser hands to the client: every message, ping, pong, info and error."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, payload: bytes, hdr: bytes | None) -> None:
        self.events.append(("msg", sid, bytes(subject), bytes(reply), payload, hdr))

    def _deliver_inline(self, sid: int, subject: bytes, reply: bytes, payload: bytes, hdr: bytes | None) -> bool:
        """Our parser offers each message here first: odd sids stand for inline subscriptions."""
        if sid % 2 == 0:
            return False
        self.events.append(("msg", sid, bytes(subject), bytes(reply), payload, hdr))
        return True

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.events.append(("err", err))


def protocol_frame(kind: str, n: int, payload: bytes, header: bytes) -> bytes:
    match kind:
        case "msg":
            return b"MSG s.%d %d %d\r\n%b\r\n" % (n, n, len(payload), payload)
        case "msg_reply":
            return b"MSG s.%d %d _INBOX.r%d %d\r\n%b\r\n" % (n, n, n, len(payload), payload)
        case "hmsg":
            hdr = b"NATS/1.0\r\n" + header + b"\r\n"
            return b"HMSG s.%d %d _INBOX.x %d %d\r\n%b%b\r\n" % (n, n, len(hdr), len(hdr) + len(payload), hdr, payload)
        case "ping":
            return b"PING\r\n"
        case "pong":
            return b"PONG\r\n"
        case "ok":
            return b"+OK\r\n"
        case "err":
            return b"-ERR 'Stale Connection'\r\n"
    return b'INFO {"server_id":"x","max_payload":1048576}\r\n'


FRAMES = st.lists(
    st.tuples(
        st.sampled_from(["msg", "msg_reply", "hmsg", "ping", "pong", "ok", "err", "info"]),
        st.integers(1, 999),
        st.binary(max_size=40),
        st.sampled_from([b"", b"A: 1\r\n", b"Nats-Sequence: 12\r\nNats-Subject: $KV.b.k\r\n"]),
    ),
    min_size=1,
    max_size=20,
)


async def feed(parser_class: type[Parser], stream: bytes, cuts: list[int]) -> list[tuple[Any, ...]]:
    recorder = Recorder()
    parser = parser_class(recorder)
    last = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        await parser.parse(stream[last:cut])
        last = cut
    assert not parser.buf, "a complete stream leaves nothing behind"
    return recorder.events


@settings(max_examples=300, deadline=None)
@given(frames=FRAMES, cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_parser_reads_any_split_of_a_stream_like_nats_py(frames: list[Any], cuts: list[int]) -> None:
    stream = b"".join(protocol_frame(*f) for f in frames)
    cuts = [c for c in cuts if c <= len(stream)]
    ours = asyncio.run(feed(OffsetParser, stream, cuts))
    theirs = asyncio.run(feed(Parser, stream, cuts))
    assert ours == theirs
    assert len(ours) == len(frames) - sum(f[0] == "ok" for f in frames)


def test_a_coroutine_that_never_suspends_runs_to_its_result_inline() -> None:
    async def plain() -> int:
        return 7

    async def suspends() -> None:
        await asyncio.sleep(0)

    assert _result_of(plain()) == 7
    with pytest.raises(RuntimeError):
        _result_of(suspends())


def test_parser_rejects_garbage_like_nats_py() -> None:
    for parser_class in (OffsetParser, Parser):
        with pytest.raises(errors.ProtocolError):
            asyncio.run(feed(parser_class, b"MSG a 1 2\r\nhi\r\nBOGUS line\r\n", []))


def test_parser_stops_at_a_reset_during_a_message() -> None:
    """A reconnect resets the parser while a message is being handled: the rest of the old
    buffer must not be delivered on the new connection."""

    class Resetting(Recorder):
        parser: OffsetParser

        async def _process_msg(self, *args: Any) -> None:
            await super()._process_msg(*args)
            self.parser.reset()

        def _deliver_inline(self, *args: Any) -> bool:
            if super()._deliver_inline(*args):
                self.parser.reset()
                return True
            return False

    recorder = Resetting()
    recorder.parser = OffsetParser(recorder)
    asyncio.run(recorder.parser.parse(b"MSG a 1 1\r\nx\r\nMSG b 2 1\r\ny\r\n"))
    assert [e[2] for e in recorder.events] == [b"a"]
    assert not recorder.parser.buf


def nats_py_publish(headers: dict[str, Any] | None, reply: str) -> bytes | type[Exception]:
    """The bytes nats-py queues for one publish (or the error it raises)."""
    client = Client()
    client._pending = []
    client._pending_data_size = 0
    try:
        asyncio.run(client._send_publish("a.b", reply, b"data", 4, headers))
    except Exception as exc:  # noqa: BLE001 - the error type is what is compared
        return type(exc)
    return b"".join(client._pending)


@settings(max_examples=300, deadline=None)
@given(headers=st.one_of(st.none(), st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=4)),
       reply=st.sampled_from(["", "_INBOX.abc.1"]))
def test_publish_puts_the_same_bytes_on_the_wire_as_nats_py(headers: dict[str, Any] | None, reply: str) -> None:
    ours = MailboxNatsClient()._publish_command("a.b", reply, b"data", 4, headers)
    if ours is not None:  # None: headers ours leaves to nats-py's own publish
        assert ours == nats_py_publish(headers, reply)


@settings(max_examples=300, deadline=None)
@given(headers=st.dictionaries(
           st.sampled_from(["Nats-Expected-Last-Subject-Sequence", "KV-Operation", "traceparent", "Nats-TTL", "X-A"]),
           st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\r\n"),
                   max_size=12),
           max_size=4),
       reply=st.sampled_from(["", "_INBOX.abc.1"]))
def test_a_publish_with_plain_headers_is_encoded_by_us_byte_for_byte(headers: dict[str, str], reply: str) -> None:
    ours = MailboxNatsClient()._publish_command("a.b", reply, b"data", 4, headers)
    assert ours is not None and ours == nats_py_publish(headers, reply)


def test_headers_that_are_not_plain_text_are_left_to_nats_py() -> None:
    assert MailboxNatsClient()._publish_command("a.b", "", b"data", 4, {"A": 1}) is None
    assert MailboxNatsClient()._publish_command("a.b", "", b"data", 4, {"A": "x\r\ny"}) is None


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.tuples(st.binary(max_size=10), st.sampled_from([b":", b": ", b""]), st.binary(max_size=10)),
                      max_size=6))
def test_header_lines_parse_like_nats_py(lines: list[tuple[bytes, bytes, bytes]]) -> None:
    raw = b"".join(n.replace(b"\r\n", b"") + s + v.replace(b"\r\n", b"") + b"\r\n" for n, s, v in lines) + b"\r\n"
    expected = Client._parse_header_lines(raw)
    assert PARSER._parse_header_lines(raw) == expected  # names met before come from its cache
    assert PARSER._parse_header_lines(raw) == expected


PARSER = MailboxNatsClient()  # one client across the examples, so that its name cache fills


async def test_requests_resolve_through_the_fast_reply_path(nats_url: str) -> None:
    """Many concurrent requests each get their own reply; a late reply after a timeout is dropped."""
    nc = await connect(nats_url)
    try:
        async def echo(msg: Any) -> None:
            if msg.data == b"slow":
                await asyncio.sleep(0.3)
            await msg.respond(msg.data + (msg.headers or {}).get("X-N", "").encode())

        await nc.subscribe("echo.fast", cb=echo)
        replies = await asyncio.gather(
            *(nc.request("echo.fast", f"m{i}".encode(), timeout=5, headers={"X-N": str(i)}) for i in range(200))
        )
        assert [r.data for r in replies] == [f"m{i}{i}".encode() for i in range(200)]
        with pytest.raises(errors.TimeoutError):
            await nc.request("echo.fast", b"slow", timeout=0.05)
        await asyncio.sleep(0.4)  # the late reply arrives and finds no waiter
        assert (await nc.request("echo.fast", b"after", timeout=5)).data == b"after"
        assert not nc._resp_map
    finally:
        await nc.close()


@pytest.mark.parametrize("client_class", [MailboxNatsClient, Client])
async def test_inline_subscriptions_see_every_message_in_order(nats_url: str, client_class: type[Client]) -> None:
    """On our client the handler runs in the read loop; on nats-py's, as a plain callback.
    A handler that raises is reported to the error callback and the subscription goes on."""
    errors_seen: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        errors_seen.append(exc)

    nc = client_class()
    await nc.connect(nats_url, error_cb=error_cb)
    try:
        got: list[bytes] = []

        def handler(msg: Any) -> None:
            if msg.data == b"boom":
                raise ValueError("boom")
            got.append(msg.data + (msg.headers or {}).get("H", "").encode())

        sub = await subscribe_inline(nc, "inline.x", handler)
        for i in range(500):
            await nc.publish("inline.x", b"boom" if i == 7 else str(i).encode(), headers={"H": "h"} if i % 2 else None)
        await nc.flush()
        for _ in range(100):
            if len(got) == 499 and errors_seen:  # the error callback runs as a task of its own
                break
            await asyncio.sleep(0.02)
        assert got == [f"{i}{'h' if i % 2 else ''}".encode() for i in range(500) if i != 7]
        assert [str(e) for e in errors_seen] == ["boom"]
        await sub.unsubscribe()
        await nc.publish("inline.x", b"late")
        await nc.flush()
        await asyncio.sleep(0.05)
        assert len(got) == 499
        if isinstance(nc, MailboxNatsClient):
            assert not nc._inline.get(sub._id)
    finally:
        await nc.close()


async def test_requests_time_out_each_at_its_own_deadline(nats_url: str) -> None:
    """One timer serves all requests in flight: a shorter timeout that comes later still
    fires first, and answered requests leave nothing behind."""
    nc = await connect(nats_url)
    try:
        async def ignore(msg: Any) -> None:
            pass

        await nc.subscribe("silent", cb=ignore)  # interest (no "no responders"), never a reply
        loop = asyncio.get_running_loop()
        start = loop.time()
        failed_at: dict[float, float] = {}

        async def ask(timeout: float) -> None:
            with pytest.raises(errors.TimeoutError):
                await nc.request("silent", b"", timeout=timeout)
            failed_at[timeout] = loop.time() - start

        await asyncio.gather(ask(0.6), ask(0.2), ask(0.4))
        assert sorted(failed_at, key=failed_at.__getitem__) == [0.2, 0.4, 0.6]
        assert all(t <= failed_at[t] < t + 0.15 for t in failed_at)
        assert not nc._deadlines and not nc._resp_map
    finally:
        await nc.close()
