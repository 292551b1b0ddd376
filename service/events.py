"""Run events on the `<prefix>-events` stream, and re-attachable following (DESIGN.md §2.3).

Subjects `<prefix>.events.H(thread).H(run)`. Any pod publishes, any client follows a run
from any pod, and re-attaches after a disconnect from the last stream sequence it saw:
nothing lost, nothing repeated.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from .model import RunDispatch
from .store import keys

log = logging.getLogger("mailbox.events")

LIFECYCLE = (
    "queued",
    "started",
    "suspended",
    "resumed",
    "finished",
    "rescheduled",
    "dead_lettered",
    "cancelled",
    "superseded",
)
FINAL = frozenset({"finished", "dead_lettered", "cancelled", "superseded"})
"""After one of these the run has ended (a `waiting` run ends its attempt with `suspended`)."""


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    """One event of a run. `seq` is the events-stream sequence (set when read back)."""

    kind: str
    run_id: str
    dispatch_id: str
    thread_id: str
    attempt: int
    ts_ms: int
    data: Any = None
    seq: int = 0


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Event).decode


class EventStream:
    def __init__(self, nc: NATS, prefix: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.stream = f"{prefix}-events"

    async def ensure(self, *, replicas: int, max_age_ms: int) -> None:
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.events.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=max_age_ms / 1000,
        )
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            return
        if info.config.max_age != config.max_age:
            info.config.max_age = config.max_age
            await self.js.update_stream(info.config)

    async def publish(self, event: Event, headers: dict[str, str] | None = None) -> int:
        """Publish durably; returns the stream sequence."""
        subject = keys.events_subject(self.prefix, event.thread_id, event.run_id)
        ack = await self.js.publish(subject, _encode(event), headers=headers)
        return ack.seq

    async def emit(self, kind: str, d: RunDispatch, data: Any, ts_ms: int) -> None:
        """Best effort: an event about dispatch `d`; a failure is logged, never raised
        (events must not block the queue)."""
        event = Event(
            kind=kind,
            run_id=d.run_id,
            dispatch_id=d.dispatch_id,
            thread_id=d.thread_id,
            attempt=d.attempt_count + 1,
            ts_ms=ts_ms,
            data=data,
        )
        try:
            await self.publish(event)
        except Exception as exc:
            log.warning("event=event_publish_failed kind=%s run=%s error=%r", kind, d.run_id, exc)
