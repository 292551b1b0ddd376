"""`MailboxClient`: the async Python client of the mailbox service API (DESIGN.md §2.5).

    client = await MailboxClient.connect("nats://127.0.0.1:4222", prefix="mailbox")
    reply = await client.submit("thread-1", {"question": "hi"})
    async for event in client.follow(reply.run_id):
        print(event.kind, event.data)
    run = await client.wait(reply.run_id)
    await client.close()

Every method sends one request to `<prefix>.api.<endpoint>` and returns the reply Struct
of `service.protocol`; an error reply raises a `MailboxApiError` subclass (`BadRequest`
400, `NotFound` 404, `Conflict` 409, `Unavailable` 503 — also when no service answers or
the request times out). Only the permission to publish on `<prefix>.api.>` is needed.

A request that timed out may still have taken effect. Submits are idempotent on `run_id`
and on `dedupe_key`: pass one of them when you retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS

from .events import FINAL, Event
from .model import RunDispatch, RunStatus
from .protocol import (
    CancelReply,
    CancelRequest,
    DeadLettersReply,
    DeadLettersRequest,
    DecideReply,
    DecideRequest,
    ErrorReply,
    EventsReply,
    EventsRequest,
    GetRequest,
    InterruptReply,
    InterruptRequest,
    ListReply,
    ListRequest,
    ReplayReply,
    ReplayRequest,
    RunView,
    SendReply,
    SendRequest,
    StatsReply,
    StatsRequest,
    Strategy,
    SubmitReply,
    SubmitRequest,
)
from .tracing import current_carrier

log = logging.getLogger("mailbox.client")

R = TypeVar("R")

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


class MailboxApiError(Exception):
    """An error reply of the mailbox API: `code` (HTTP-like), `message`, and the request
    `field` at fault when the service named it."""

    code: int = 500

    def __init__(self, message: str, *, code: int | None = None, field: str | None = None) -> None:
        super().__init__(message if field is None else f"{message} (field: {field})")
        self.message = message
        if code is not None:
            self.code = code
        self.field = field


class BadRequest(MailboxApiError):
    """400: the request is malformed or invalid (unknown field, wrong type, blank id, too large)."""

    code = 400


class NotFound(MailboxApiError):
    """404: no run, dispatch or thread with this id."""

    code = 404


class Conflict(MailboxApiError):
    """409: valid, but conflicts with the current state (reject strategy, run done, dedupe...)."""

    code = 409


class Unavailable(MailboxApiError):
    """503: the store is unavailable, no service answered, or the request timed out."""

    code = 503


_BY_CODE: dict[int, type[MailboxApiError]] = {400: BadRequest, 404: NotFound, 409: Conflict, 503: Unavailable}


def error_for(code: int, message: str, field: str | None = None) -> MailboxApiError:
    """The typed error for an error reply."""
    return _BY_CODE.get(code, MailboxApiError)(message, code=code, field=field)


_encode = msgspec.json.Encoder().encode
_error_decoder = msgspec.json.Decoder(ErrorReply)


async def _log_nats_error(exc: Exception) -> None:
    log.debug("event=nats_error error=%r", exc)


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class MailboxClient:
    """Async client of one mailbox (one prefix). Create with `await MailboxClient.connect(...)`;
    use as an async context manager or call `close()`."""

    def __init__(self, nc: NATS, *, prefix: str = "mailbox", timeout: float = 5.0, owns_connection: bool = False) -> None:
        self.nc = nc
        self.prefix = prefix
        self.timeout = timeout
        self._owns = owns_connection
        self._decoders: dict[Any, msgspec.json.Decoder[Any]] = {}

    @classmethod
    async def connect(
        cls,
        url_or_nc: str | NATS,
        prefix: str = "mailbox",
        *,
        timeout: float = 5.0,
        connect_attempts: int = 3,
        **connect_options: Any,
    ) -> MailboxClient:
        """Connect to NATS (a URL, or comma-separated URLs) or reuse a connected client.

        `timeout` is the default request timeout in seconds. The first connection is tried
        `connect_attempts` times per server (then nats.errors.NoServersError); once connected,
        the client reconnects forever. `connect_options` go to `nats.connect` (credentials,
        TLS, ...). A connection made here is closed by `close()`."""
        if not isinstance(url_or_nc, str):
            return cls(url_or_nc, prefix=prefix, timeout=timeout)
        options: dict[str, Any] = {
            "name": f"mailbox-client-{prefix}",
            "connect_timeout": 2,
            "reconnect_time_wait": 0.5,
            "max_reconnect_attempts": max(connect_attempts, 1),
            "error_cb": _log_nats_error,
        }
        options.update(connect_options)
        servers = [u.strip() for u in url_or_nc.split(",") if u.strip()]
        nc = await nats.connect(servers=servers, **options)
        if "max_reconnect_attempts" not in connect_options:
            nc.options["max_reconnect_attempts"] = -1  # connected once: from now on, never give up
        return cls(nc, prefix=prefix, timeout=timeout, owns_connection=True)

    async def close(self) -> None:
        """Close the connection if this client opened it."""
        if self._owns and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # already closing or reconnecting: close hard
                await self.nc.close()

    async def __aenter__(self) -> MailboxClient:
        """`async with await MailboxClient.connect(...) as client:`"""
        return self

    async def __aexit__(self, *exc: Any) -> None:
        """Close (see `close`)."""
        await self.close()

    # ------------------------------------------------------------------ transport

    def subject(self, endpoint: str) -> str:
        """`<prefix>.api.<endpoint>`."""
        return f"{self.prefix}.api.{endpoint}"

    async def request_raw(self, endpoint: str, body: bytes, timeout: float | None = None) -> bytes:
        """Send raw bytes to an endpoint; returns the reply body, or raises the typed error."""
        subject = self.subject(endpoint)
        try:
            msg = await self._request(subject, body, self.timeout if timeout is None else timeout)
        except nats.errors.NoRespondersError:
            raise Unavailable(f"no mailbox service answers on {subject}") from None
        except nats.errors.TimeoutError:
            raise Unavailable(f"no reply from {subject} in time (the request may still have taken effect)") from None
        except nats.errors.MaxPayloadError:
            raise BadRequest(f"request of {len(body)} bytes is over the server's max_payload", field="payload") from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
            raise Unavailable(f"connection closed: {exc!r}") from None
        except nats.errors.Error as exc:
            raise Unavailable(f"request failed: {exc!r}") from None
        headers = msg.headers or {}
        if ERROR_CODE_HEADER in headers:
            try:
                body_error = _error_decoder.decode(msg.data).error
                raise error_for(body_error.code, body_error.message, body_error.field)
            except msgspec.DecodeError:
                try:
                    code = int(headers[ERROR_CODE_HEADER])
                except ValueError:
                    code = 500
                raise error_for(code, headers.get(ERROR_HEADER, "error")) from None
        return msg.data

    async def _request(self, subject: str, body: bytes, timeout: float) -> Any:
        """nc.request, but a reconnect while waiting ends the wait at once (the reply to a
        request sent before a disconnect is lost; waiting for the timeout gains nothing)."""
        reconnects = self.nc.stats["reconnects"]
        headers = current_carrier() or None  # the caller's trace context travels with the request
        task = asyncio.ensure_future(self.nc.request(subject, body, timeout=timeout, headers=headers))
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=0.25)
                if done:
                    return task.result()
                if self.nc.stats["reconnects"] != reconnects and self.nc.is_connected:
                    raise Unavailable(
                        f"reconnected while waiting for {subject} (the request may still have taken effect)"
                    )
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _call(self, endpoint: str, request: msgspec.Struct, reply_type: type[R], timeout: float | None = None) -> R:
        data = await self.request_raw(endpoint, _encode(request), timeout)
        decoder = self._decoders.get(reply_type)
        if decoder is None:
            decoder = self._decoders[reply_type] = msgspec.json.Decoder(reply_type)
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise MailboxApiError(f"unexpected reply from {self.subject(endpoint)}: {exc}", code=500) from None

    # ------------------------------------------------------------------ endpoints

    async def submit(
        self,
        thread_id: str,
        input: Any = None,
        *,
        strategy: Strategy = "enqueue",
        priority: int | None = None,
        dedupe_key: str | None = None,
        delay_ms: int | None = None,
        max_attempts: int | None = None,
        run_id: str | None = None,
        dispatch_id: str | None = None,
        metadata: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> SubmitReply:
        """Create a run on `thread_id` with `input` (any JSON value).

        `strategy`: `enqueue` (queue behind the thread's work), `interrupt` (supersede queued
        work and cancel the active run; latest wins), `reject` (Conflict if the thread is
        busy), `steer` (hand the input to the active run live, else enqueue). Lower `priority`
        starts first (0..255, default 128). Resubmitting the same `run_id`, or a `dedupe_key`
        whose dispatch is still live, returns the earlier run with `duplicate=True`."""
        request = SubmitRequest(
            **_drop_none(
                thread_id=thread_id,
                input=input,
                strategy=strategy,
                priority=priority,
                dedupe_key=dedupe_key,
                delay_ms=delay_ms,
                max_attempts=max_attempts,
                run_id=run_id,
                dispatch_id=dispatch_id,
                metadata=metadata,
            )
        )
        return await self._call("submit", request, SubmitReply, timeout)

    async def get(self, run_id: str, *, thread_id: str | None = None) -> RunView:
        """The run (status, input, output or error, waiting ticket) with its dispatches."""
        return await self._call("get", GetRequest(run_id=run_id, thread_id=thread_id), RunView)

    async def get_dispatch(self, dispatch_id: str, *, thread_id: str | None = None) -> RunDispatch:
        """One dispatch record (queue status, attempts, lease, last error)."""
        return await self._call("get", GetRequest(dispatch_id=dispatch_id, thread_id=thread_id), RunDispatch)

    async def list(
        self,
        thread_id: str,
        *,
        status: list[str] | None = None,
        limit: int = 50,
        offset: int = 0,
        dispatches: bool = False,
    ) -> ListReply:
        """A thread's runs (oldest first), or its dispatches with `dispatches=True`;
        `status` filters (run or dispatch statuses); follow `next_offset` for more."""
        request = ListRequest(thread_id=thread_id, status=status, limit=limit, offset=offset, dispatches=dispatches)
        return await self._call("list", request, ListReply)

    async def cancel(
        self, *, run_id: str | None = None, dispatch_id: str | None = None, thread_id: str | None = None
    ) -> CancelReply:
        """Cancel by exactly one of run, dispatch or thread id: queued work is cancelled,
        an active run is sent a live cancel (see `signalled`)."""
        request = CancelRequest(dispatch_id=dispatch_id, run_id=run_id, thread_id=thread_id)
        return await self._call("cancel", request, CancelReply)

    async def interrupt(self, thread_id: str) -> InterruptReply:
        """Bump the thread's epoch: its queued work is superseded, its active run cancelled."""
        return await self._call("interrupt", InterruptRequest(thread_id=thread_id), InterruptReply)

    async def decide(self, run_id: str, ticket: str, decision: Any = None) -> DecideReply:
        """Deliver `decision` for `ticket` to a waiting run: live if it waits in its pod,
        else durably (the run resumes as a new dispatch on any pod)."""
        return await self._call("decide", DecideRequest(run_id=run_id, ticket=ticket, decision=decision), DecideReply)

    async def send(self, input: Any, *, thread_id: str | None = None, run_id: str | None = None) -> SendReply:
        """Hand `input` to the thread's (or the run's) active run, live; `delivered=False`
        (with a `reason`) when no such run is executing."""
        return await self._call("send", SendRequest(thread_id=thread_id, run_id=run_id, input=input), SendReply)

    async def dead_letters(self, *, thread_id: str | None = None, limit: int = 50, offset: int = 0) -> DeadLettersReply:
        """Dead-lettered dispatches (of one thread, or of all threads)."""
        request = DeadLettersRequest(thread_id=thread_id, limit=limit, offset=offset)
        return await self._call("dead_letters", request, DeadLettersReply)

    async def replay(self, dispatch_id: str) -> ReplayReply:
        """Re-queue a dead-lettered dispatch as a new dispatch of the same run."""
        return await self._call("replay", ReplayRequest(dispatch_id=dispatch_id), ReplayReply)

    async def stats(self) -> StatsReply:
        """Dispatch depth by status, active runs, and how many pods serve this mailbox."""
        return await self._call("stats", StatsRequest(), StatsReply)

    async def events(self, run_id: str, after: int = 0, *, limit: int = 256, wait_ms: int = 0) -> EventsReply:
        """The run's events with stream sequence > `after` (oldest first). With `wait_ms`,
        waits up to that long for the next event when none is there yet."""
        request = EventsRequest(run_id=run_id, after=after, limit=limit, wait_ms=wait_ms)
        return await self._call("events", request, EventsReply, timeout=self.timeout + wait_ms / 1000)

    # ------------------------------------------------------------------ following

    async def follow(
        self, run_id: str, after: int | None = None, *, until_final: bool = True, wait_ms: int = 10_000
    ) -> AsyncIterator[Event]:
        """Every event of the run after stream sequence `after` (None: from the start), live
        and in order, each with its `seq`; ends after a final event (finished, dead_lettered,
        cancelled, superseded) unless `until_final=False`.

        Re-attaches by itself: when a pod stops, the connection drops or a request times out,
        it asks again (any pod answers) from the last sequence it yielded, so nothing is lost
        and nothing repeats. To resume later, pass the last `event.seq` you saw as `after`.
        Raises NotFound for an unknown run, and Unavailable once this client's connection is
        closed for good."""
        last = after or 0
        backoff = 0.05
        while True:
            try:
                reply = await self.events(run_id, last, wait_ms=wait_ms)
            except Unavailable:
                if self.nc.is_closed:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            for event in reply.events:
                last = event.seq
                yield event
                if until_final and event.kind in FINAL:
                    return
            last = max(last, reply.last_seq)

    async def wait(self, run_id: str, timeout: float | None = None, *, poll: float = 5.0) -> RunView:
        """Wait until the run is done and return it (check `status`, `output`, `error`,
        `termination`). Raises TimeoutError after `timeout` seconds (None: no limit), NotFound
        for an unknown run. A run waiting for a decision is not done: decide it first.
        Survives reconnects and pods coming and going, like `follow`."""
        async with asyncio.timeout(timeout):
            after = 0
            while True:
                try:
                    view = await self.get(run_id)
                    if view.status == RunStatus.DONE:
                        return view
                    # sleep until something happens to the run (or `poll` passes), then look again
                    while True:
                        reply = await self.events(run_id, after, wait_ms=int(poll * 1000))
                        after = max(after, reply.last_seq)
                        if not reply.events or any(e.kind in FINAL for e in reply.events):
                            break
                except Unavailable:
                    if self.nc.is_closed:
                        raise
                    await asyncio.sleep(0.2)
