"""Run events on the `<prefix>-events` stream, and re-attachable following (DESIGN.md §2.3).

Subjects `<prefix>.events.H(thread).H(run)`. Any pod publishes, any client follows a run
from any pod, and re-attaches after a disconnect from the last stream sequence it saw:
nothing lost, nothing repeated.

Reading is done with direct batch gets (`$JS.API.DIRECT.GET.<stream>` with `next_by_subj`
and `batch`, server >= 2.11) from the sequence after the last one seen, so the stream is the
only source of truth: whatever was missed while disconnected is read back in order, and a
sequence is never yielded twice. A core subscription on the run's subject is only a wake-up
hint (a live follower reacts at once instead of polling); a periodic re-read covers lost
hints. Replicas of an R3 stream apply messages in order, so a direct get answered by a
lagging replica returns a prefix of what exists: later reads fill in, never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from .model import RunDispatch
from .natsclient import MailboxNatsClient, subscribe_inline
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

BATCH = 256
"""Events read per direct batch get."""
BATCH_MAX_BYTES = 1024 * 1024
"""Byte budget of one batch read (the server returns at least one message)."""


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

_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    asyncio.TimeoutError,
)


class EventsUnavailable(nats.errors.Error):
    """The events stream did not answer (no responders, timeout, server-side error)."""


def run_filter(prefix: str, run_id: str) -> str:
    """The subject filter of one run's events when its thread is not known."""
    return f"{prefix}.events.*.{keys.H(run_id)}"


class _BatchReader:
    """Direct batch gets over one long-lived reply subscription (no inbox per call)."""

    def __init__(self, nc: NATS, stream: str, timeout: float) -> None:
        self.nc = nc
        self.api = f"$JS.API.DIRECT.GET.{stream}"
        self.timeout = timeout
        self._inbox = ""
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self._next = 0
        self._pending: dict[str, tuple[list[Msg], asyncio.Future[int]]] = {}

    async def _ensure(self) -> None:
        if self._sub is not None:
            return
        async with self._lock:
            if self._sub is None:
                self._inbox = self.nc.new_inbox()
                self._sub = await subscribe_inline(self.nc, self._inbox + ".*", self._on_reply)

    def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        entry = self._pending.get(token)
        if entry is None:
            return  # a late reply to a read that gave up
        msgs, done = entry
        status = (msg.headers or {}).get("Status")
        if status is None:
            msgs.append(msg)
            return
        if done.done():
            return
        if status == "204":  # end of batch
            done.set_result(int((msg.headers or {}).get("Nats-Num-Pending", "0") or 0))
        elif status == "404":  # nothing at or after the start sequence
            done.set_result(0)
        else:
            description = (msg.headers or {}).get("Description", "")
            done.set_exception(EventsUnavailable(f"direct get failed: {status} {description}".strip()))

    async def read(self, subject: str, start_seq: int, batch: int) -> tuple[list[Msg], int]:
        """Up to `batch` messages on `subject` with sequence >= start_seq, and how many more are pending."""
        if self.nc.is_closed:
            raise nats.errors.ConnectionClosedError
        await self._ensure()
        self._next += 1
        token = str(self._next)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        msgs: list[Msg] = []
        self._pending[token] = (msgs, done)
        try:
            request = {"seq": max(start_seq, 1), "next_by_subj": subject, "batch": batch, "max_bytes": BATCH_MAX_BYTES}
            await self.nc.publish(self.api, _encode(request), reply=f"{self._inbox}.{token}")
            pending = await asyncio.wait_for(done, self.timeout)
        finally:
            self._pending.pop(token, None)
        return msgs, pending

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):  # the connection may already be gone
                await self._sub.unsubscribe()
            self._sub = None


MAX_UNACKED = 10_000
"""Emitted events whose ack has not come back yet, beyond which emit waits for each ack."""


class EventStream:
    def __init__(self, nc: NATS, prefix: str, *, timeout: float = 5.0) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.stream = f"{prefix}-events"
        self._reader = _BatchReader(nc, self.stream, timeout)
        self.published = 0
        self.failed = 0
        self._acks: Any = None  # the reply subscription of emitted events' acks
        self._ack_inbox = ""
        self._unacked = 0

    async def ensure(self, *, replicas: int, max_age_ms: int) -> None:
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.events.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=max_age_ms / 1000,
            allow_direct=True,
        )
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            return
        if info.config.max_age != config.max_age or not info.config.allow_direct:
            info.config.max_age = config.max_age
            info.config.allow_direct = True
            if config.max_age and (info.config.duplicate_window or 0) > config.max_age:
                info.config.duplicate_window = config.max_age  # the server requires window <= max_age
            await self.js.update_stream(info.config)

    async def close(self) -> None:
        """Release the reply subscriptions (the connection stays open)."""
        await self._reader.close()
        if self._acks is not None:
            with contextlib.suppress(Exception):
                await self._acks.unsubscribe()
            self._acks = None

    async def publish(self, event: Event, headers: dict[str, str] | None = None) -> int:
        """Publish durably; returns the stream sequence."""
        subject = keys.events_subject(self.prefix, event.thread_id, event.run_id)
        self.published += 1
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
            if self._unacked >= MAX_UNACKED:
                await self.publish(event)  # the server is slow to ack: wait, so events cannot pile up
                return
            if self._acks is None:
                self._ack_inbox = self.nc.new_inbox()
                self._acks = await subscribe_inline(self.nc, self._ack_inbox, self._on_ack)
            # no waiting for the ack: the emitter goes on (events of one connection stay in
            # order in the stream), and a failed ack is counted and logged by _on_ack
            subject = keys.events_subject(self.prefix, event.thread_id, event.run_id)
            self.published += 1
            self._unacked += 1
            payload = _encode(event)
            if not (isinstance(self.nc, MailboxNatsClient) and self.nc.publish_built(subject, payload, self._ack_inbox)):
                await self.nc.publish(subject, payload, reply=self._ack_inbox)
        except Exception as exc:
            log.warning("event=event_publish_failed kind=%s run=%s error=%r", kind, d.run_id, exc)

    def _on_ack(self, msg: Msg) -> None:
        self._unacked = max(0, self._unacked - 1)
        if b'"error"' in msg.data or (msg.headers and msg.headers.get("Status")):
            self.failed += 1
            log.warning("event=event_publish_failed reply=%s", msg.data[:200])

    # ------------------------------------------------------------------ reading

    async def history(self, run_id: str, after: int = 0, *, limit: int | None = None) -> list[Event]:
        """The run's events with stream sequence > `after` that exist now (oldest first,
        at most `limit`), without waiting. Each Event has `seq` set."""
        return (await self.scan(run_id, after, limit=limit))[0]

    async def scan(self, run_id: str, after: int = 0, *, limit: int | None = None) -> tuple[list[Event], int]:
        """`history`, plus the last stream sequence read (>= the last event's `seq`: a message
        that is not a valid event is skipped, but counted as read)."""
        keys.H(run_id)  # an id we can address
        if after < 0:
            raise ValueError("after must not be negative")
        subject = run_filter(self.prefix, run_id)
        out: list[Event] = []
        last = after
        while limit is None or len(out) < limit:
            want = BATCH if limit is None else min(BATCH, limit - len(out))
            msgs, pending = await self._reader.read(subject, last + 1, want)
            for m in msgs:
                seq = int((m.headers or {}).get("Nats-Sequence", "0") or 0)
                if seq <= last:
                    continue  # never go backwards
                last = seq
                # the thread is known now: read the literal subject from here on
                subject = (m.headers or {}).get("Nats-Subject", subject)
                event = _decode_event(m.data, seq)
                if event is not None:
                    out.append(event)
            if not msgs or pending <= 0:
                break
        return out, last

    async def read(self, run_id: str, after: int = 0, *, limit: int | None = None, wait: float = 0.0,
                   stop: asyncio.Event | None = None) -> tuple[list[Event], int]:
        """`scan`, but when nothing exists after `after`, wait up to `wait` seconds for the
        next event (a long poll). Returns early, possibly empty, when `stop` is set."""
        events, last = await self.scan(run_id, after, limit=limit)
        if events or wait <= 0:
            return events, last
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        async with self._wakeups(run_id) as woke:
            while True:
                woke.clear()
                events, last = await self.scan(run_id, after, limit=limit)
                remaining = deadline - loop.time()
                if events or remaining <= 0 or (stop is not None and stop.is_set()):
                    return events, last
                await _wait_any(woke, stop, min(remaining, 1.0))

    async def follow(self, run_id: str, after: int = 0, *, poll_interval: float = 1.0,
                     final: bool = True) -> AsyncIterator[Event]:
        """Every event of the run with sequence > `after`, live, in stream order; ends after
        a final event (`FINAL`) unless `final=False`. Survives disconnects: reads resume
        from the last sequence yielded (no gap, no duplicate). Raises ConnectionClosedError
        when the connection is closed for good."""
        last = after
        backoff = 0.05
        async with self._wakeups(run_id) as woke:
            while True:
                woke.clear()
                try:
                    events, read_up_to = await self.scan(run_id, last, limit=BATCH)
                except _TRANSIENT + (EventsUnavailable,) as exc:
                    if self.nc.is_closed:
                        raise nats.errors.ConnectionClosedError from exc
                    log.debug("event=follow_retry run=%s after=%d error=%r", run_id, last, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                for event in events:
                    last = event.seq
                    yield event
                    if final and event.kind in FINAL:
                        return
                last = max(last, read_up_to)
                if len(events) >= BATCH:
                    continue  # more is waiting: read on without sleeping
                if self.nc.is_closed:
                    raise nats.errors.ConnectionClosedError
                await _wait_any(woke, None, poll_interval)

    @contextlib.asynccontextmanager
    async def _wakeups(self, run_id: str) -> AsyncIterator[asyncio.Event]:
        """An asyncio.Event set whenever a message lands on the run's subject (a hint only)."""
        woke = asyncio.Event()

        async def on_msg(_msg: Msg) -> None:
            woke.set()

        sub = None
        try:
            sub = await self.nc.subscribe(run_filter(self.prefix, run_id), cb=on_msg)
        except nats.errors.Error as exc:  # reads still work by polling
            log.debug("event=follow_subscribe_failed run=%s error=%r", run_id, exc)
        try:
            yield woke
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


def _decode_event(data: bytes, seq: int) -> Event | None:
    try:
        return msgspec.structs.replace(_decode(data), seq=seq)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("event=event_garbage seq=%d error=%s", seq, str(exc)[:200])
        return None


async def _wait_any(woke: asyncio.Event, stop: asyncio.Event | None, timeout: float) -> None:
    """Wait until `woke` or `stop` is set, or `timeout` seconds passed."""
    waiters = [asyncio.ensure_future(woke.wait())]
    if stop is not None:
        waiters.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
