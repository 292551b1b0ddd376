"""Wake-up signals: the `<prefix>-signals` work queue and its shared durable pull consumer.

A signal says "thread T has dispatch D"; it is a hint, the store is the truth. One pending
signal per dispatch (max_msgs_per_subject 1 with discard-new-per-subject), so republishing
is harmless. Every delivered signal is settled with a receipt: ack, nak, or nak with delay.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from .store import keys
from .streams import differences

log = logging.getLogger("mailbox.signals")

DUPLICATE_WINDOW_S = 120.0


class SignalConfigError(RuntimeError):
    """The existing stream or consumer does not match the configuration; fix or delete it."""


class _Payload(msgspec.Struct):
    thread_id: str
    dispatch_id: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Payload).decode


def blocked_delay_ms(deliveries: int | None, base_ms: int, cap_ms: int) -> int:
    """Delay before a blocked signal comes back: `min(base · 2^(n-1), cap)`, n = deliveries."""
    n = max(deliveries or 1, 1)
    return min(base_ms * 2 ** min(n - 1, 16), cap_ms)


@dataclass
class Receipt:
    """Settles one delivered signal. Use exactly one of `ack`, `nak`."""

    msg: Msg

    @property
    def deliveries(self) -> int:
        return self.msg.metadata.num_delivered

    async def ack(self) -> None:
        await self.msg.ack()

    async def nak(self, delay_ms: int | None = None) -> None:
        await self.msg.nak(delay=None if not delay_ms else delay_ms / 1000)


@dataclass
class Signal:
    thread_id: str
    dispatch_id: str
    receipt: Receipt
    headers: dict[str, str]


class Signals:
    """The signal stream of one mailbox prefix: publish, and pull batches from the shared consumer."""

    def __init__(self, nc: NATS, prefix: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.stream = f"{prefix}-signals"
        self.consumer = f"{prefix}-workers"
        self.subjects = f"{prefix}.signal.>"
        self._psub = None
        self.garbage = 0
        self.published = 0
        self.fetches = 0

    def stream_config(self, replicas: int) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[self.subjects],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_msgs_per_subject=1,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            duplicate_window=DUPLICATE_WINDOW_S,
        )

    def consumer_config(self, ack_wait_ms: int, max_ack_pending: int, max_deliver: int) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.consumer,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_ms / 1000,
            max_ack_pending=max_ack_pending,
            max_deliver=max_deliver,
            filter_subject=self.subjects,
        )

    async def ensure(self, *, replicas: int, ack_wait_ms: int, max_ack_pending: int, max_deliver: int) -> None:
        """Create the stream and consumer, or verify that the existing ones match (fail loudly if not)."""
        wanted = self.stream_config(replicas)
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(wanted)
        else:
            have = info.config
            diffs = differences(
                have, wanted, ("subjects", "retention", "max_msgs_per_subject", "discard", "discard_new_per_subject")
            )
            if diffs:
                raise SignalConfigError(f"stream {self.stream} does not match: {', '.join(diffs)}")
        cwanted = self.consumer_config(ack_wait_ms, max_ack_pending, max_deliver)
        try:
            cinfo = await self.js.consumer_info(self.stream, self.consumer)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(self.stream, cwanted)
        else:
            have_c = cinfo.config
            diffs = differences(
                have_c, cwanted, ("ack_policy", "ack_wait", "max_ack_pending", "max_deliver", "filter_subject")
            )
            if diffs:
                raise SignalConfigError(
                    f"consumer {self.consumer} on {self.stream} does not match: {', '.join(diffs)}; "
                    "change the settings back or delete the consumer to recreate it"
                )

    async def publish(self, thread_id: str, dispatch_id: str, *, msg_id: str | None = None,
                      headers: dict[str, str] | None = None) -> bool:
        """Publish a wake-up. False when one is already pending for this dispatch (fine)."""
        subject = keys.signal_subject(self.prefix, thread_id, dispatch_id)
        h = dict(headers or {})
        if msg_id:
            h["Nats-Msg-Id"] = msg_id
        payload = _encode(_Payload(thread_id, dispatch_id))
        for attempt in range(4):
            try:
                self.published += 1
                ack = await self.js.publish(subject, payload, headers=h or None)
                return not ack.duplicate
            except nats.js.errors.APIError as exc:
                # one pending signal per dispatch: the server refuses a second one (code 503,
                # "maximum messages per subject exceeded"), which just means "already pending"
                if "maximum messages per subject" in (exc.description or "").lower():
                    return False
                if not isinstance(exc, nats.js.errors.ServiceUnavailableError) or attempt == 3:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
            except (nats.errors.NoRespondersError, asyncio.TimeoutError):
                # a busy or re-electing server: back off briefly (the Msg-Id, if any, dedupes)
                if attempt == 3:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
        return False

    async def _subscription(self):
        if self._psub is None:
            self._psub = await self.js.pull_subscribe_bind(self.consumer, self.stream)
        return self._psub

    async def fetch(self, batch: int, expires_ms: int) -> list[Signal]:
        """Up to `batch` signals, waiting at most `expires_ms`. Never cancel this call from
        outside: nats-py would drop messages it already took (they then wait for ack_wait)."""
        psub = await self._subscription()
        self.fetches += 1
        try:
            msgs = await psub.fetch(batch, timeout=expires_ms / 1000)
        except asyncio.TimeoutError:  # nats-py raises its own and plain TimeoutErrors: both mean "none"
            return []
        out: list[Signal] = []
        for m in msgs:
            try:
                p = _decode(m.data)
                keys.H(p.thread_id)  # both ids must be strings we can address
            except (msgspec.DecodeError, ValueError, TypeError) as exc:
                self.garbage += 1
                log.warning("event=signal_garbage subject=%s error=%s", m.subject, str(exc)[:200])
                await m.ack()  # garbage never comes back
                continue
            out.append(Signal(p.thread_id, p.dispatch_id, Receipt(m), dict(m.headers or {})))
        return out

    async def pending(self) -> tuple[int, int, int]:
        """(num_pending, num_ack_pending, num_redelivered) of the shared consumer."""
        info = await self.js.consumer_info(self.stream, self.consumer)
        return info.num_pending, info.num_ack_pending, info.num_redelivered

    async def close(self) -> None:
        if self._psub is not None:
            try:
                await self._psub.unsubscribe()
            except (nats.errors.Error, Exception):  # the connection may already be gone
                pass
            self._psub = None
