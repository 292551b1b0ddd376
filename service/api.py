"""The service API (DESIGN.md §2.5): a NATS micro service named `mailbox`.

Endpoints `<prefix>.api.<name>` (request/reply, JSON bodies = the Structs of
`service.protocol`), discoverable with `$SRV.PING|INFO|STATS`; several pods of one prefix
share the load through the micro queue group.

- Requests are decoded strictly (unknown fields, wrong types, missing fields and
  out-of-range numbers are rejected); an empty body counts as `{}`.
- Errors are replies `{"error": {"code", "message", "field"?}}` with the micro headers
  `Nats-Service-Error` / `Nats-Service-Error-Code`, and count as errors in `$SRV.STATS`:
  400 bad input, 404 unknown id, 409 conflict, 500 internal error (logged), 503 store or
  stream unavailable. Bad input is rejected before anything is written.
- Requests are served concurrently (a slow request never holds up the others), at most
  `max_inflight` at a time per pod; beyond that the endpoint stops reading until a slot is free.

`MailboxApi` is the transport-free part (`await api.call(name, body) -> reply bytes`);
`ApiService` puts it on NATS; `start_api(pod)` does both for a pod.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.micro.request import Request
from nats.micro.service import Endpoint, Service, ServiceConfig
from opentelemetry import context as otel_context

from . import __version__
from .config import Settings
from .events import EventStream, EventsUnavailable
from .mailbox import ConflictError, Mailbox
from .model import (
    MAX_ID_BYTES,
    AlreadyExistsError,
    DispatchStatus,
    NotFoundError,
    RunDispatch,
    RunStatus,
    StoreError,
    StoreUnavailableError,
    ValidationError,
    VersionConflictError,
    validate_id,
)
from .protocol import (
    DISPATCH_STATUSES,
    RUN_STATUSES,
    CancelReply,
    CancelRequest,
    DeadLettersReply,
    DeadLettersRequest,
    DecideReply,
    DecideRequest,
    ErrorBody,
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
    SubmitReply,
    SubmitRequest,
)
from .store import DispatchStore
from .tracing import carrier_from, context_from

log = logging.getLogger("mailbox.api")

SERVICE_NAME = "mailbox"
ENVELOPE_BYTES = 16 * 1024
"""Room for ids, metadata and JSON syntax around a payload of the maximum size: a request
body may be at most `max_payload + ENVELOPE_BYTES` bytes; the payload inside it (submit
`input`, decide `decision`, send `input`) at most `max_payload`."""
MAX_WAIT_MS = 60_000


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    request: type[msgspec.Struct]
    reply: str
    """Name of the reply message (a Struct name, or `RunView|RunDispatch`)."""
    description: str


ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("submit", SubmitRequest, "SubmitReply", "Create a run and its dispatch on a thread (strategies enqueue, interrupt, reject, steer)."),
    EndpointSpec("get", GetRequest, "RunView|RunDispatch", "A run with its dispatches, or a dispatch record, by id."),
    EndpointSpec("list", ListRequest, "ListReply", "A thread's runs or dispatches, filtered by status, paginated."),
    EndpointSpec("cancel", CancelRequest, "CancelReply", "Cancel by dispatch, run or thread id: queued work is cancelled, active runs get a live cancel."),
    EndpointSpec("interrupt", InterruptRequest, "InterruptReply", "Bump the thread's epoch, supersede its queued work, cancel its active run."),
    EndpointSpec("decide", DecideRequest, "DecideReply", "Deliver a decision to a waiting run (live, else a durable resume)."),
    EndpointSpec("send", SendRequest, "SendReply", "Deliver input to the active run (live only)."),
    EndpointSpec("dead_letters", DeadLettersRequest, "DeadLettersReply", "List dead-lettered dispatches."),
    EndpointSpec("replay", ReplayRequest, "ReplayReply", "Re-queue a dead-lettered dispatch as a new dispatch of the same run."),
    EndpointSpec("stats", StatsRequest, "StatsReply", "Depth by status, active runs, pods."),
    EndpointSpec("events", EventsRequest, "EventsReply", "A run's events after a stream sequence (optionally long-polling for the next)."),
)
ENDPOINT_NAMES = tuple(e.name for e in ENDPOINTS)


def api_subject(prefix: str, endpoint: str) -> str:
    """The subject of an endpoint: `<prefix>.api.<endpoint>`."""
    return f"{prefix}.api.{endpoint}"


class ApiError(Exception):
    """An error reply: HTTP-like `code`, a message for humans, the request field at fault."""

    def __init__(self, code: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> bytes:
        return _encode(ErrorReply(ErrorBody(code=self.code, message=self.message, field=self.field)))


_encode = msgspec.json.Encoder().encode

_UNAVAILABLE = (
    StoreUnavailableError,
    EventsUnavailable,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    asyncio.TimeoutError,
)

_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]*)`")


def _field_of(path: str) -> str | None:
    """`$.status[0]` → `status`; `$.metadata[...]` → `metadata`; `$` → None."""
    head = re.split(r"[.\[]", path, maxsplit=1)[0]
    return head or None


def decode_error(exc: msgspec.DecodeError) -> ApiError:
    """A 400 for a body msgspec rejected, naming the field when it can."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return ApiError(400, f"malformed JSON: {text}")
    field = None
    named = _NAMED.search(text)
    at = _AT.search(text)
    if at:
        field = _field_of(at.group(1))
        text = text[: at.start()]
    if named and field is None:
        field = named.group(1)
    if field is not None and at:
        if "matching regex" in text or text.endswith("of length >= 1"):  # the Id pattern: not blank
            text = f"{field} must not be blank"
        elif "of length <=" in text:
            text = f"{field} must be at most {MAX_ID_BYTES} bytes"
        else:
            text = f"{field}: {text}"
    return ApiError(400, text, field)


def to_api_error(exc: BaseException) -> ApiError:
    """Map an exception from decoding or the control plane to its error reply."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, msgspec.DecodeError):  # ValidationError included
        return decode_error(exc)
    if isinstance(exc, ValidationError):
        return ApiError(400, exc.message, exc.field)
    if isinstance(exc, NotFoundError):
        return ApiError(404, exc.message, None)
    if isinstance(exc, ConflictError):
        return ApiError(409, exc.message, exc.field)
    if isinstance(exc, (AlreadyExistsError, VersionConflictError)):
        return ApiError(409, exc.message, None)
    if isinstance(exc, _UNAVAILABLE):
        return ApiError(503, f"unavailable, try again: {exc!r}" if not isinstance(exc, StoreError) else exc.message)
    if isinstance(exc, StoreError):
        return ApiError(500, exc.message)
    return ApiError(500, f"internal error ({type(exc).__name__})")


class _Ping(msgspec.Struct):
    id: str = ""
    metadata: dict[str, str] = {}


def _check_ids(req: msgspec.Struct, *fields: str) -> None:
    for f in fields:
        value = getattr(req, f)
        if value is not None:
            validate_id(value, f)


def _page_reply(rows: list[Any], limit: int, offset: int) -> tuple[list[Any], int | None]:
    if len(rows) > limit:
        return rows[:limit], offset + limit
    return rows, None


class MailboxApi:
    """The endpoints, transport-free: `await call(name, body)` returns the reply bytes or
    raises ApiError (never anything else)."""

    def __init__(
        self,
        *,
        mailbox: Mailbox,
        store: DispatchStore,
        events: EventStream,
        nc: NATS | None = None,
        prefix: str,
        max_payload: int = 256 * 1024,
    ) -> None:
        self.mailbox = mailbox
        self.store = store
        self.events = events
        self.nc = nc
        self.prefix = prefix
        self.max_payload = max_payload
        self.max_request_bytes = max_payload + ENVELOPE_BYTES
        self.stopping = asyncio.Event()
        """Set on shutdown: long polls answer at once."""
        self._decoders = {e.name: msgspec.json.Decoder(e.request) for e in ENDPOINTS}
        self._handlers: dict[str, Callable[[Any], Awaitable[msgspec.Struct]]] = {
            e.name: getattr(self, f"_{e.name}") for e in ENDPOINTS
        }

    async def call(self, name: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        """Serve one request: decode strictly, run, encode the reply. Raises ApiError only.
        The caller's trace context (traceparent header) is the current context meanwhile."""
        token = otel_context.attach(context_from(carrier_from(headers)))
        try:
            return await self._call(name, body)
        finally:
            otel_context.detach(token)

    async def _call(self, name: str, body: bytes) -> bytes:
        try:
            if name not in self._handlers:
                raise ApiError(404, f"unknown endpoint {name!r}")
            if len(body) > self.max_request_bytes:
                raise ApiError(
                    400, f"request is {len(body)} bytes, over the {self.max_request_bytes}-byte limit", "payload"
                )
            request = self._decoders[name].decode(body if body.strip() else b"{}")
            reply = await self._handlers[name](request)
            return _encode(reply)
        except (asyncio.CancelledError, ApiError):
            raise
        except Exception as exc:
            error = to_api_error(exc)
            if error.code == 500:
                log.exception("event=api_internal_error endpoint=%s", name)
            raise error from exc

    def _check_payload(self, value: Any, field: str) -> None:
        size = len(_encode(value))
        if size > self.max_payload:
            raise ValidationError(f"{field} is {size} bytes, over the {self.max_payload}-byte limit", field=field)

    async def _thread_known(self, thread_id: str) -> None:
        """NotFound for a thread with no dispatch and no run (a command on it would be a no-op
        at best, and must not write anything)."""
        state = await self.store.read_thread(thread_id)
        if not state.dispatches and not await self.store.list_runs(thread_id, limit=1):
            raise NotFoundError(f"thread '{thread_id}' has no runs", id=thread_id)

    # ------------------------------------------------------------------ endpoints

    async def _submit(self, req: SubmitRequest) -> SubmitReply:
        return await self.mailbox.submit(req)

    async def _get(self, req: GetRequest) -> RunView | RunDispatch:
        if (req.run_id is None) == (req.dispatch_id is None):
            raise ValidationError("give exactly one of run_id, dispatch_id", field="run_id")
        _check_ids(req, "run_id", "dispatch_id", "thread_id")
        if req.run_id is not None:
            run = await self.store.load_run(req.run_id)
            if run is None or (req.thread_id is not None and run.thread_id != req.thread_id):
                raise NotFoundError(f"run '{req.run_id}' not found", id=req.run_id)
            state = await self.store.read_thread(run.thread_id)
            return RunView.of(run, [d for d in state.dispatches.values() if d.run_id == req.run_id])
        assert req.dispatch_id is not None
        if req.thread_id is not None:
            d = (await self.store.read_thread(req.thread_id)).dispatches.get(req.dispatch_id)
        else:
            d = await self.store.load_dispatch(req.dispatch_id)
        if d is None:
            raise NotFoundError(f"dispatch '{req.dispatch_id}' not found", id=req.dispatch_id)
        return d

    async def _list(self, req: ListRequest) -> ListReply:
        _check_ids(req, "thread_id")
        allowed = DISPATCH_STATUSES if req.dispatches else RUN_STATUSES
        if req.status is not None:
            wrong = [s for s in req.status if s not in allowed]
            if wrong:
                kind = "dispatch" if req.dispatches else "run"
                raise ValidationError(
                    f"{', '.join(wrong)} is not a {kind} status (use one of {', '.join(sorted(allowed))})", field="status"
                )
        if req.dispatches:
            status = [DispatchStatus(s) for s in req.status] if req.status is not None else None
            rows = await self.store.list_dispatches(req.thread_id, status, req.limit + 1, req.offset)
            page, next_offset = _page_reply(rows, req.limit, req.offset)
            return ListReply(dispatches=page, next_offset=next_offset)
        run_status = [RunStatus(s) for s in req.status] if req.status is not None else None
        runs = await self.store.list_runs(req.thread_id, run_status, req.limit + 1, req.offset)
        page, next_offset = _page_reply(runs, req.limit, req.offset)
        return ListReply(runs=page, next_offset=next_offset)

    async def _cancel(self, req: CancelRequest) -> CancelReply:
        given = [f for f in ("dispatch_id", "run_id", "thread_id") if getattr(req, f) is not None]
        if len(given) != 1:
            raise ValidationError("give exactly one of dispatch_id, run_id, thread_id", field=given[1] if given else "run_id")
        _check_ids(req, *given)
        if req.thread_id is not None:
            await self._thread_known(req.thread_id)
        return await self.mailbox.cancel(dispatch_id=req.dispatch_id, run_id=req.run_id, thread_id=req.thread_id)

    async def _interrupt(self, req: InterruptRequest) -> InterruptReply:
        _check_ids(req, "thread_id")
        await self._thread_known(req.thread_id)
        return await self.mailbox.interrupt(req.thread_id)

    async def _decide(self, req: DecideRequest) -> DecideReply:
        _check_ids(req, "run_id", "ticket")
        self._check_payload(req.decision, "decision")
        return await self.mailbox.decide(req.run_id, req.ticket, req.decision)

    async def _send(self, req: SendRequest) -> SendReply:
        if req.thread_id is None and req.run_id is None:
            raise ValidationError("give thread_id or run_id", field="thread_id")
        _check_ids(req, "thread_id", "run_id")
        self._check_payload(req.input, "input")
        if req.run_id is not None and req.thread_id is not None:
            run = await self.store.load_run(req.run_id)
            if run is None:
                raise NotFoundError(f"run '{req.run_id}' not found", id=req.run_id)
            if run.thread_id != req.thread_id:
                raise ValidationError(f"run '{req.run_id}' is not on thread '{req.thread_id}'", field="thread_id")
        return await self.mailbox.send(thread_id=req.thread_id, run_id=req.run_id, data=req.input)

    async def _dead_letters(self, req: DeadLettersRequest) -> DeadLettersReply:
        _check_ids(req, "thread_id")
        if req.thread_id is not None:
            rows = await self.store.list_dispatches(req.thread_id, [DispatchStatus.DEAD_LETTER], req.limit + 1, req.offset)
        else:
            rows = await self.store.list_terminal_dispatches(
                req.limit + 1, req.offset, statuses=[DispatchStatus.DEAD_LETTER]
            )
        page, next_offset = _page_reply(rows, req.limit, req.offset)
        return DeadLettersReply(dispatches=page, next_offset=next_offset)

    async def _replay(self, req: ReplayRequest) -> ReplayReply:
        _check_ids(req, "dispatch_id")
        return await self.mailbox.replay(req.dispatch_id)

    async def _stats(self, req: StatsRequest) -> StatsReply:
        # the sweep's view: what was written since this pod last looked, not the whole bucket
        _, survey = await self.store.sweep_view(now=0, expired_limit=0)
        counts = survey.counts
        depth = {str(s): counts.get(s, 0) for s in DispatchStatus}
        return StatsReply(depth=depth, active_runs=depth[DispatchStatus.CLAIMED], pods=await self.count_pods())

    async def _events(self, req: EventsRequest) -> EventsReply:
        _check_ids(req, "run_id")
        events, last = await self.events.read(req.run_id, req.after, limit=req.limit)
        if not events:
            if await self.store.load_run(req.run_id) is None:
                raise NotFoundError(f"run '{req.run_id}' not found", id=req.run_id)
            wait = min(req.wait_ms, MAX_WAIT_MS) / 1000
            if wait > 0 and not self.stopping.is_set():
                events, last = await self.events.read(
                    req.run_id, req.after, limit=req.limit, wait=wait, stop=self.stopping
                )
        return EventsReply(events=events, last_seq=last)

    async def count_pods(self, window: float = 0.5, quiet: float = 0.1) -> int:
        """Instances of this prefix's service that answer `$SRV.PING.mailbox`: replies are
        collected until none came for `quiet` seconds (at most `window`)."""
        if self.nc is None:
            return 0
        seen: set[str] = set()
        last_reply = asyncio.Event()

        async def on_reply(msg: Any) -> None:
            try:
                ping = msgspec.json.decode(msg.data, type=_Ping)
            except msgspec.DecodeError:
                return
            if ping.metadata.get("prefix") == self.prefix:
                seen.add(ping.id)
                last_reply.set()

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish(f"$SRV.PING.{SERVICE_NAME}", b"", reply=inbox)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + window
            while (remaining := deadline - loop.time()) > 0:
                last_reply.clear()
                try:
                    await asyncio.wait_for(last_reply.wait(), min(quiet, remaining) if seen else remaining)
                except TimeoutError:
                    break  # quiet for long enough after the first replies, or the window is over
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        return len(seen)


class ApiService(Service):
    """The micro service: one endpoint per `ENDPOINTS` entry under `<prefix>.api`, served
    concurrently. `stop()` stops taking requests, answers long polls, waits for the
    requests in flight (up to `grace` seconds), then cancels what is left."""

    def __init__(self, nc: NATS, api: MailboxApi, *, metadata: dict[str, str] | None = None,
                 max_inflight: int = 256, grace: float = 5.0) -> None:
        super().__init__(
            nc,
            ServiceConfig(
                name=SERVICE_NAME,
                version=__version__,
                description=f"Durable per-thread run mailbox; endpoints {api.prefix}.api.*",
                metadata={"prefix": api.prefix, "api": f"{api.prefix}.api", **(metadata or {})},
            ),
        )
        self.api = api
        self.grace = grace
        self._slots = asyncio.Semaphore(max_inflight)
        self._inflight: set[asyncio.Task[None]] = set()
        self._by_name: dict[str, Endpoint] = {}

    async def start(self) -> None:
        """Subscribe to the $SRV verbs and to every endpoint."""
        await super().start()
        if self._by_name:
            return
        group = self.add_group(name=f"{self.api.prefix}.api")
        for spec in ENDPOINTS:
            await group.add_endpoint(
                name=spec.name,
                handler=self._handler(spec.name),
                metadata={"request": spec.request.__name__, "reply": spec.reply, "description": spec.description},
            )
            self._by_name[spec.name] = self._endpoints[-1]
        await self._client.flush()

    def _handler(self, name: str) -> Callable[[Request], Awaitable[None]]:
        async def handle(request: Request) -> None:
            await self._slots.acquire()
            task = asyncio.create_task(self._serve(name, request), name=f"api-{name}")
            self._inflight.add(task)
            task.add_done_callback(self._done)

        return handle

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _serve(self, name: str, request: Request) -> None:
        started = time.perf_counter_ns()
        error: ApiError | None = None
        try:
            try:
                reply = await self.api.call(name, request.data, request.headers)
            except ApiError as exc:
                error = exc
            if not request._msg.reply:
                return  # a publish without a reply subject: nobody to answer
            if error is None:
                await request.respond(reply)
            else:
                await request.respond_error(str(error.code), _header_text(error.message), data=error.body())
        except asyncio.CancelledError:
            raise
        except Exception:  # the reply could not be sent (connection gone): nothing else to do
            log.warning("event=api_reply_failed endpoint=%s", name, exc_info=True)
        finally:
            self._account(name, time.perf_counter_ns() - started, error)

    def _account(self, name: str, elapsed_ns: int, error: ApiError | None) -> None:
        """Keep `$SRV.STATS` right although requests are served off the endpoint's callback:
        processing time, and errors answered as replies rather than raised."""
        endpoint = self._by_name.get(name)
        if endpoint is None:
            return
        try:
            endpoint._processing_time += elapsed_ns
            endpoint._average_processing_time = int(endpoint._processing_time / max(endpoint._num_requests, 1))
            if error is not None:
                endpoint._num_errors += 1
                endpoint._last_error = f"{error.code}:{error.message}"[:500]
        except AttributeError:  # nats.micro internals changed: stats degrade, the service works
            pass

    async def stop(self) -> None:
        """Graceful: stop taking requests (requests already delivered to this pod are still
        served: the subscriptions are drained, not dropped), answer long polls at once, wait
        for the requests in flight up to `grace` seconds, then cancel what is left."""
        if self._stopped.is_set():
            return
        self.api.stopping.set()
        subscriptions = [e._subscription for e in self._endpoints] + list(self._subscriptions.values())
        for e in self._endpoints:
            e._subscription = None
        for sub in subscriptions:
            if sub is None:
                continue
            try:
                await sub.drain()
            except Exception as exc:  # connection already closed: nothing to drain
                log.debug("event=api_drain_error error=%r", exc)
        self._endpoints = []
        self._subscriptions = {}
        self._stopped.set()
        if self._inflight:
            _, pending = await asyncio.wait(list(self._inflight), timeout=self.grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    def abort(self) -> None:
        """Abrupt (a crashing pod): cancel requests in flight without answering."""
        self.api.stopping.set()
        for task in list(self._inflight):
            task.cancel()


def _header_text(message: str) -> str:
    """A header-safe one-line version of a message."""
    line = " ".join(message.split())
    return line[:300] or "error"


async def start_api(pod: Any, *, max_inflight: int = 256) -> ApiService:
    """Put a pod's control plane on NATS as the `mailbox` micro service; returns it started."""
    settings: Settings = pod.settings
    api = MailboxApi(
        mailbox=pod.mailbox,
        store=pod.store,
        events=pod.events,
        nc=pod.nc,
        prefix=settings.prefix,
        max_payload=settings.max_payload,
    )
    consumer = getattr(getattr(pod, "worker", None), "consumer_id", None)
    service = ApiService(pod.nc, api, metadata={"pod": consumer} if consumer else None, max_inflight=max_inflight)
    await service.start()
    return service
