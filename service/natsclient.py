"""The nats-py client, with its hottest per-message paths made cheaper (same behaviour,
checked against nats-py's own code by tests/test_natsclient.py):

- header parsing: nats-py parses every header line with a per-character Python generator; a
  thread snapshot returns one message per key, each with ~8 headers, and that parsing was
  most of the service's CPU (profiled: 42 s of 62 s in a claim-heavy run);
- request/reply: nats-py draws each request's token from the system RNG and wraps the wait
  in `asyncio.wait_for`; a counter and a timer handle do the same job for less;
- inline subscriptions: nats-py hands every message through a subscription queue and a
  callback task; replies that only resolve a future or count an ack (request replies, the
  store's batch reads, event acks) are handled straight from the read loop instead
  (`subscribe_inline`);
- publish: headers are encoded in one join once their names are known to be valid tokens
  (nats-py checks every name with a regex on every publish);
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
from nats.aio.client import _HEADER_KEY_RE, Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
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

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        handler = self._inline.get(sid)
        sub = self._subs.get(sid)
        if handler is None or sub is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        sub._received += 1
        try:
            handler(self._build_message(sid, subject, reply, data, await self._process_headers(headers)))
        except Exception as exc:  # as nats-py does for a failing callback
            await self._error_cb(exc)

    async def _request_new_style(
        self, subject: str, payload: bytes, timeout: float = 1, headers: dict[str, Any] | None = None
    ) -> Msg:
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
            await self.publish(subject, payload, reply=self._resp_sub_prefix.decode() + token, headers=headers)
            timer = loop.call_later(timeout, _expire, future)
            try:
                return await future
            finally:
                timer.cancel()
        finally:
            self._resp_map.pop(token, None)

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, Any] | None
    ) -> None:
        hdr = self._encode_headers(headers) if headers else None
        if hdr is None and headers is not None:  # unusual names or values: nats-py's own path
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        if not subject:
            raise errors.BadSubjectError
        if hdr is None:
            cmd = f"PUB {subject} {reply} {payload_size}\r\n".encode() + payload + _CRLF
        else:
            cmd = f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + payload_size}\r\n".encode() + hdr + payload + _CRLF
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(cmd)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    def _encode_headers(self, headers: dict[str, Any]) -> bytes | None:
        """nats-py's header block, or None when a name is new and invalid, or a value is not
        a plain string (left to nats-py, which skips, rejects or rewrites them)."""
        names = self._header_names
        for k, v in headers.items():
            if k not in names:
                if k != k.strip() or not _HEADER_KEY_RE.fullmatch(k):
                    return None
                if len(names) < _KNOWN_HEADER_NAMES:
                    names.add(k)
            if type(v) is not str or "\r" in v or "\n" in v:
                return None
        return ("NATS/1.0\r\n" + "".join([f"{k}: {v.strip()}\r\n" for k, v in headers.items()]) + "\r\n").encode()


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


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(errors.TimeoutError())


async def subscribe_inline(nc: Client, subject: str, handler: Callable[[Msg], None]) -> Subscription:
    """Subscribe with a plain function for each message, for handlers that only record the
    message or resolve a future and never block: on our client it is called straight from
    the read loop, on any other as a plain callback."""

    async def queued(msg: Msg) -> None:  # nats-py's path (ours takes it only before registration)
        handler(msg)

    sub = await nc.subscribe(subject, cb=queued, pending_msgs_limit=-1)
    if isinstance(nc, MailboxNatsClient):
        nc._inline[sub._id] = handler
    return sub


async def connect(servers: str | list[str], **options: Any) -> MailboxNatsClient:
    """`nats.connect`, returning our client."""
    nc = MailboxNatsClient()
    await nc.connect(servers, **options)
    return nc
