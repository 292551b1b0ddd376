"""Live commands to a running run (DESIGN.md §2.4): core NATS request/reply on
`<prefix>.live.H(thread)`. The owning pod replies only after handing the command to the
run; no responder or a timeout means "not delivered" and the caller takes the durable path.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import nats.errors

from .store import keys


class LiveCommand(msgspec.Struct, frozen=True, omit_defaults=True):
    command: Literal["cancel", "decision", "input"]
    run_id: str | None = None
    ticket: str | None = None
    data: Any = None
    reason: str | None = None


class LiveReply(msgspec.Struct, frozen=True, omit_defaults=True):
    delivered: bool
    run_id: str | None = None
    reason: str | None = None


_command = msgspec.json.Decoder(LiveCommand)
_reply = msgspec.json.Decoder(LiveReply)
_encode = msgspec.json.Encoder().encode


def decode_command(data: bytes) -> LiveCommand | None:
    try:
        return _command.decode(data)
    except msgspec.DecodeError:
        return None


def encode_reply(reply: LiveReply) -> bytes:
    return _encode(reply)


async def deliver(nc: Any, prefix: str, thread_id: str, command: LiveCommand, timeout: float = 2.0) -> LiveReply:
    """Send a command to whichever pod runs the thread now."""
    subject = keys.live_thread_subject(prefix, thread_id)
    try:
        msg = await nc.request(subject, _encode(command), timeout=timeout)
    except nats.errors.NoRespondersError:
        return LiveReply(delivered=False, reason="no run is active on this thread")
    except nats.errors.TimeoutError:
        return LiveReply(delivered=False, reason="the owning pod did not answer in time")
    try:
        return _reply.decode(msg.data)
    except msgspec.DecodeError:
        return LiveReply(delivered=False, reason="malformed reply")
