"""The nats-py client, with its hottest per-message paths made cheaper (same behaviour,
checked against nats-py's own code by tests/test_natsclient.py):

- header parsing: nats-py parses every header line with a per-character Python generator; a
  thread snapshot returns one message per key, each with ~8 headers, and that parsing was
  most of the service's CPU (profiled: 42 s of 62 s in a claim-heavy run);
- request/reply: nats-py draws each request's token from the system RNG and wraps the wait
  in `asyncio.wait_for`; a counter, and one timer for all the requests in flight (armed for
  the earliest deadline), do the same job for less;
- inline subscriptions: nats-py hands every message through a subscription queue and a
  callback task; replies that only resolve a future or count an ack (request replies, the
  store's batch reads, event acks) are handled straight from the read loop instead
  (`subscribe_inline`);
- publish: one plain function checks, encodes and queues a publish for the flusher, instead
  of four nested coroutines (`publish`, `_send_publish`, `_send_command`, `_flush_pending`,
  which also makes a future per call); headers are encoded in one join once their names are
  known to be valid tokens (nats-py checks every name with a regex on every publish). Where
  nats-py's own handling is needed (not connected, unusual headers, a full pending buffer)
  its `publish` runs unchanged;
- the protocol parser: nats-py deletes each message from the front of its read buffer
  (a copy of the rest of the buffer per message, so a 64 KB read of small messages costs
  quadratic time); this one walks the buffer with an offset and compacts it once per read.

These reach into nats-py internals, hence the narrow version range in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

from nats import errors
from nats.aio.client import _HEADER_KEY_RE, NO_RESPONDERS_STATUS, Client, _validate_subject
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header
from nats.protocol import parser as nats_parser

_CRLF = b"\r\n"
_WHITESPACE = re.compile(r"\s")
_KNOWN_HEADER_NAMES = 512  # names are a small vocabulary; the bound only guards against abuse

# nats-py's control-line patterns without the `\A` anchor, so they can match at an offset
_MSG = re.compile(rb"MSG\s+([^\s]+)\s+([^\s]+)\s+(([^\s]+)[^\S\r\n]+)?(\d+)\r\n")
_HMSG = re.compile(rb"HMSG\s+([^\s]+)\s+([^\s]+)\s+(([^\s]+)[^\S\r\n]+)?([\d]+)\s+(\d+)\r\n")


_UNSEEN: Any = object()


def _header_key(name: bytes) -> str | None:
    """A received header line's name as a key, None when it is not a token (nats-py skips it)."""
    try:
        key = name.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    # printable without a space is the common case and needs no regex
    if not (key.isprintable() and " " not in key) and _WHITESPACE.search(key):
        return None
    return key


class MailboxNatsClient(Client):
    def __init__(self) -> None:
        super().__init__()
        self._ps = OffsetParser(self)
        self._request_seq = 0
        self._inline: dict[int, Callable[[Msg], None]] = {}
        self._header_names: set[str] = set()
        self._parsed_header_names: dict[bytes, str | None] = {}  # raw name → key, None if malformed
        self._error_tasks: set[asyncio.Task[None]] = set()
        self._deadlines: dict[str, float] = {}  # request token → when it times out
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_due = float("inf")

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._inline.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    def _parse_header_lines(self, raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        names = self._parsed_header_names
        for line in raw.split(_CRLF):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            key = names.get(name, _UNSEEN)
            if key is _UNSEEN:
                key = _header_key(name)
                if len(names) < _KNOWN_HEADER_NAMES:
                    names[name] = key
            if key is not None:
                out[key] = value.strip().decode("utf-8", "replace")
        return out

    async def _init_request_sub(self) -> None:
        await super()._init_request_sub()
        self._inline[self._sid] = self._resolve_reply  # the wildcard reply subscription just made

    def _resolve_reply(self, msg: Msg) -> None:
        future = self._resp_map.get(msg.subject[len(self._resp_sub_prefix) :])
        if future is not None and not future.done():
            future.set_result(msg)

    def _deliver_inline(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        """Hand a message to its inline handler, if its subscription has one (False if not:
        the parser then gives it to nats-py's `_process_msg`)."""
        handler = self._inline.get(sid)
        sub = self._subs.get(sid)
        if handler is None or sub is None:
            return False
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        sub._received += 1
        try:
            handler(self._build_message(sid, subject, reply, data, _result_of(self._process_headers(headers))))
        except Exception as exc:  # as nats-py does for a failing callback
            self._error_cb_soon(exc)
        return True

    def _error_cb_soon(self, exc: Exception) -> None:
        task = asyncio.get_running_loop().create_task(self._error_cb(exc))
        self._error_tasks.add(task)
        task.add_done_callback(self._error_tasks.discard)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        # nats-py's request and _request_new_style as one coroutine: a request is awaited
        # through one frame fewer (it is resumed through the store's whole await chain)
        if old_style:
            return await super().request(subject, payload, timeout, old_style, headers)
        if not self._skip_subject_validation:
            _validate_subject(subject)
        if self.is_draining_pubs:
            raise errors.ConnectionDrainingError
        if not self._resp_sub_prefix:
            await self._init_request_sub()
        self._request_seq += 1
        token = format(self._request_seq, "x")  # unique within this connection's reply prefix
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._resp_map[token] = future
        try:
            reply = self._resp_sub_prefix.decode() + token
            if not self._queue_publish(subject, payload, reply, headers, checked=True):
                await super().publish(subject, payload, reply=reply, headers=headers)
            self._expire_at(token, loop.time() + timeout, loop)
            msg = await future
        finally:
            self._resp_map.pop(token, None)
            self._deadlines.pop(token, None)
        if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS_STATUS:
            raise errors.NoRespondersError
        return msg

    def _expire_at(self, token: str, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the request `token` with a timeout at `deadline`. One timer serves all the
        requests in flight, armed for the earliest deadline: a timer per request cost a heap
        push with a comparison in Python per level, and its cancel (~9 per run)."""
        self._deadlines[token] = deadline
        if deadline < self._expiry_due:
            if self._expiry_timer is not None:
                self._expiry_timer.cancel()
            self._expiry_due = deadline
            self._expiry_timer = loop.call_at(deadline, self._expire_requests)

    def _expire_requests(self) -> None:
        self._expiry_timer = None
        now = asyncio.get_running_loop().time()
        due = [token for token, deadline in self._deadlines.items() if deadline <= now]
        for token in due:
            del self._deadlines[token]
            future = self._resp_map.get(token)
            if future is not None and not future.done():
                future.set_exception(errors.TimeoutError())
        self._expiry_due = float("inf")
        if self._deadlines:
            self._expiry_due = min(self._deadlines.values())
            self._expiry_timer = asyncio.get_running_loop().call_at(self._expiry_due, self._expire_requests)

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, Any] | None = None
    ) -> None:
        if not self._queue_publish(subject, payload, reply, headers):
            await super().publish(subject, payload, reply, headers)

    def publish_built(self, subject: str, payload: bytes, reply: str) -> bool:
        """Queue a publish whose subject and reply this process built itself (from encoded
        ids and its own inbox), so they are not validated again; False, with nothing queued,
        where nats-py's own path has to run (see `_queue_publish`)."""
        return self._queue_publish(subject, payload, reply, None, checked=True)

    def _queue_publish(
        self, subject: str, payload: bytes, reply: str, headers: dict[str, Any] | None, checked: bool = False
    ) -> bool:
        """nats-py's publish as one plain call: check, encode, queue, wake the flusher. False,
        with nothing queued, where nats-py's own path has to run: while not connected (it
        buffers or refuses), with headers it treats specially, or when the pending buffer would
        pass its limit (it flushes and waits). `checked`: a request's, whose subject `request`
        has validated and whose reply is our own inbox."""
        if not subject:
            raise errors.BadSubjectError
        if not self._skip_subject_validation and not checked:
            _validate_subject(subject)
            if reply:
                _validate_subject(reply)
        if self.is_closed:
            raise errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise errors.ConnectionDrainingError
        flush_queue = self._flush_queue
        if not self.is_connected or flush_queue is None or self._flusher_task is None or self._flusher_task.done():
            return False
        payload_size = len(payload)
        if payload_size > self._max_payload:
            raise errors.MaxPayloadError
        cmd = self._publish_command(subject, reply, payload, payload_size, headers)
        if cmd is None or 0 < self._max_pending_size < self._pending_data_size + len(cmd):
            return False
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        self._pending.append(cmd)
        self._pending_data_size += len(cmd)
        if flush_queue.empty():
            flush_queue.put_nowait(_NOTHING_TO_RESOLVE)
        return True

    def _publish_command(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, Any] | None
    ) -> bytes | None:
        """The PUB or HPUB bytes, or None when the headers need nats-py's handling."""
        if headers is None:
            return f"PUB {subject} {reply} {payload_size}\r\n".encode() + payload + _CRLF
        hdr = self._encode_headers(headers)
        if hdr is None:
            return None
        return f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + payload_size}\r\n".encode() + hdr + payload + _CRLF

    def _encode_headers(self, headers: dict[str, Any]) -> bytes | None:
        """nats-py's header block, or None when a name is new and invalid, or a value is not
        a plain string (left to nats-py, which skips, rejects or rewrites them)."""
        names = self._header_names
        lines = ["NATS/1.0\r\n"]
        for k, v in headers.items():
            if k not in names:
                if k != k.strip() or not _HEADER_KEY_RE.fullmatch(k):
                    return None
                if len(names) < _KNOWN_HEADER_NAMES:
                    names.add(k)
            if type(v) is not str or "\r" in v or "\n" in v:
                return None
            lines.append(f"{k}: {v.strip()}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode()


class OffsetParser(nats_parser.Parser):
    """nats-py's parser, walking the buffer with an offset instead of deleting each message
    from its front."""

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        pos = 0
        try:
            while pos < len(buf):
                if self.state == nats_parser.AWAITING_MSG_PAYLOAD:
                    end = pos + self.needed
                    if len(buf) < end + 2:
                        break
                    arg = self.msg_arg
                    if self.header_needed > 0:
                        hdr: bytes | None = bytes(buf[pos : pos + self.header_needed])
                        payload = bytes(buf[pos + self.header_needed : end])
                        self.header_needed = 0
                    else:
                        hdr = None
                        payload = bytes(buf[pos:end])
                    pos = end + 2
                    self.state = nats_parser.AWAITING_CONTROL_LINE
                    if not self.nc._deliver_inline(arg["sid"], arg["subject"], arg["reply"], payload, hdr):
                        await self.nc._process_msg(arg["sid"], arg["subject"], arg["reply"], payload, hdr)
                    if self.buf is not buf:  # reset (reconnect) while the message was handled
                        return
                    continue
                match = _HMSG.match(buf, pos) if buf.startswith(b"H", pos) else _MSG.match(buf, pos)
                if match is not None:
                    try:
                        groups = match.groups()
                        self.msg_arg["subject"] = groups[0]
                        self.msg_arg["sid"] = int(groups[1])
                        self.msg_arg["reply"] = groups[3] or b""
                        if len(groups) == 6:
                            self.header_needed = int(groups[4])
                        self.needed = int(groups[-1])
                    except Exception:
                        raise errors.ProtocolError("nats: malformed MSG") from None
                    pos = match.end()
                    self.state = nats_parser.AWAITING_MSG_PAYLOAD
                    continue
                # anything else (+OK, -ERR, PING, PONG, INFO) is rare: nats-py's handling,
                # on the buffer compacted to this point
                del buf[:pos]
                pos = 0
                if not await self._control_line(buf):
                    break
                if self.buf is not buf:
                    return
        finally:
            if self.buf is buf and pos:
                del buf[:pos]

    async def _control_line(self, buf: bytearray) -> bool:
        """Handle one non-message line at the front of `buf`; False when it is incomplete."""
        if m := nats_parser.OK_RE.match(buf):
            del buf[: m.end()]
        elif m := nats_parser.ERR_RE.match(buf):
            await self.nc._process_err(m.groups()[0].decode().lower())
            del buf[: m.end()]
        elif m := nats_parser.PING_RE.match(buf):
            del buf[: m.end()]
            await self.nc._process_ping()
        elif m := nats_parser.PONG_RE.match(buf):
            del buf[: m.end()]
            await self.nc._process_pong()
        elif m := nats_parser.INFO_RE.match(buf):
            await self.nc._process_info(json.loads(m.groups()[0].decode()))
            del buf[: m.end()]
        elif len(buf) < nats_parser.MAX_CONTROL_LINE_SIZE and _CRLF in buf:
            raise errors.ProtocolError("nats: unknown protocol")
        else:
            return False
        return True


def _result_of(coro: Any) -> Any:
    """Run a coroutine that never suspends (nats-py's `_process_headers` is async but awaits
    nothing) to its result, without a task or an await."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("expected a coroutine that does not suspend")


class _NothingToResolve:
    """What a plain publish puts in nats-py's flush queue: the flusher resolves each item
    unless it is done, and nobody waits on a plain publish's flush."""

    def done(self) -> bool:
        return True


_NOTHING_TO_RESOLVE: Any = _NothingToResolve()


async def subscribe_inline(nc: Client, subject: str, handler: Callable[[Msg], None]) -> Subscription:
    """Subscribe with a plain function for each message, for handlers that only record the
    message or resolve a future and never block: on our client it is called straight from
    the read loop (no task, no queue), on any other as a plain callback."""
    if isinstance(nc, MailboxNatsClient):
        # registered under the id nats-py is about to give the subscription, before its SUB
        # can reach the server; subscribing without a callback starts no task
        sid = nc._sid + 1
        nc._inline[sid] = handler
        try:
            sub = await nc.subscribe(subject, pending_msgs_limit=-1)
        except BaseException:
            nc._inline.pop(sid, None)
            raise
        assert sub._id == sid, "nats-py numbers subscriptions in order"
        sub._message_iterator = None  # unused here, and it and the subscription refer to each other
        return sub

    async def queued(msg: Msg) -> None:
        handler(msg)

    return await nc.subscribe(subject, cb=queued, pending_msgs_limit=-1)


async def connect(servers: str | list[str], **options: Any) -> MailboxNatsClient:
    """`nats.connect`, returning our client."""
    nc = MailboxNatsClient()
    await nc.connect(servers, **options)
    return nc
