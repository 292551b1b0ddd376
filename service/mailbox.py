"""The control plane: submit (with strategies), cancel, interrupt, decide, send, replay.

The API endpoints are thin wrappers around `Mailbox`; tests and embedding services can use
it directly. Every write goes through the store; live commands reach whichever pod runs a
thread, and fall back to the durable path when nobody answers.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from . import live
from .events import EventStream
from .model import (
    RUN_SUPERSEDED,
    AlreadyExistsError,
    DispatchStatus,
    NotFoundError,
    RunDispatch,
    RunRecord,
    RunStatus,
    Termination,
    TerminationKind,
    ValidationError,
    check_dispatch_id_for_run,
    first_dispatch_id,
    validate_id,
    validate_run,
)
from .protocol import (
    CancelReply,
    DecideReply,
    InterruptReply,
    ReplayReply,
    SendReply,
    SubmitReply,
    SubmitRequest,
)
from .metrics import Metrics
from .signals import Signals
from .tracing import PassThroughTracer, context_from, current_carrier
from .worker import Attempt
from .store import DispatchStore
from .store.base import encode_record

log = logging.getLogger("mailbox.control")


class ConflictError(Exception):
    """The request is valid but conflicts with the thread's or run's state (HTTP-like 409)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class IdGenerator:
    """Time-ordered unique ids in the UUIDv7 layout (48-bit ms timestamp, then a counter
    seeded randomly each millisecond), monotonic within one generator: ids minted in order
    sort in order, so ties on created_at still break FIFO."""

    def __init__(self) -> None:
        self._last_ms = 0
        self._counter = 0
        self._rng = random.Random()  # seeded from os.urandom; ids need uniqueness, not secrecy

    def __call__(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms <= self._last_ms:
            ms = self._last_ms
            self._counter += 1
        else:
            self._last_ms = ms
            self._counter = self._rng.getrandbits(41)  # room to count up within the ms
        tail = self._rng.getrandbits(32)
        rand_a = (self._counter >> 30) & 0xFFF
        rand_b = ((self._counter & ((1 << 30) - 1)) << 32) | tail
        value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
        return str(uuid.UUID(int=value))


class Mailbox:
    def __init__(
        self,
        *,
        store: DispatchStore,
        prefix: str,
        signals: Signals | None = None,
        events: EventStream | None = None,
        nc: Any = None,
        worker: Any = None,
        max_payload: int = 256 * 1024,
        default_max_attempts: int = 5,
        clock: Callable[[], int] | None = None,
        tracer: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.signals = signals
        self.events = events
        self.nc = nc
        self.worker = worker
        self.max_payload = max_payload
        self.default_max_attempts = default_max_attempts
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.new_id = IdGenerator()
        self.tracer = tracer or PassThroughTracer()
        self.metrics = metrics or Metrics()

    # ------------------------------------------------------------------ submit

    async def submit(self, req: SubmitRequest, trace_headers: dict[str, str] | None = None) -> SubmitReply:
        """Create a run and its first dispatch on a thread, by the request's strategy.
        `trace_headers` (traceparent/tracestate of the caller) become the submit span's parent."""
        with self.tracer.start_as_current_span(
            "mailbox.submit",
            context=context_from(trace_headers) if trace_headers else None,
            attributes={"mailbox.thread_id": req.thread_id, "mailbox.strategy": req.strategy},
        ):
            try:
                reply = await self._submit(req)
            except Exception:
                self.metrics.submits.labels(req.strategy, "error").inc()
                raise
            self.metrics.submits.labels(req.strategy, "duplicate" if reply.duplicate else "ok").inc()
            return reply

    async def _submit(self, req: SubmitRequest) -> SubmitReply:
        self._validate_submit(req)
        now = self.clock()
        if req.run_id is not None:
            existing = await self.store.load_run(req.run_id)
            if existing is not None:
                return await self._duplicate(existing, req.thread_id)
        # a plain submit needs no read of the thread: the store enforces dedupe keys itself
        needs_read = req.dedupe_key is not None or req.strategy in ("reject", "steer")
        thread = await self.store.read_thread(req.thread_id) if needs_read else None
        if thread is not None and req.dedupe_key is not None:
            for d in thread.dispatches.values():
                if d.dedupe_key == req.dedupe_key and not d.is_terminal:
                    return _duplicate_of(d)
        busy = [
            d
            for d in (thread.dispatches.values() if thread is not None else ())
            if d.status in (DispatchStatus.QUEUED, DispatchStatus.CLAIMED)
        ]
        if req.strategy == "reject" and busy:
            raise ConflictError(f"thread '{req.thread_id}' has {len(busy)} queued or active dispatch(es)", field="strategy")
        if req.strategy == "steer":
            reply = await self._live(req.thread_id, live.LiveCommand(command="input", data=req.input))
            if reply.delivered and reply.run_id:
                active = next((d for d in busy if d.status == DispatchStatus.CLAIMED and d.run_id == reply.run_id), None)
                return SubmitReply(
                    run_id=reply.run_id,
                    dispatch_id=active.dispatch_id if active else "",
                    thread_id=req.thread_id,
                    status="running",
                    steered=True,
                )
        run_id = req.run_id or self.new_id()
        dispatch_id = req.dispatch_id or first_dispatch_id(run_id) or self.new_id()
        max_attempts = req.max_attempts or self.default_max_attempts
        run = RunRecord(
            run_id=run_id,
            thread_id=req.thread_id,
            input=req.input,
            metadata=req.metadata,
            priority=req.priority,
            max_attempts=max_attempts,
            dispatch_id=dispatch_id,
            trace=current_carrier(),
            created_at=now,
            updated_at=now,
        )
        dispatch = RunDispatch.queued(
            dispatch_id,
            req.thread_id,
            run_id,
            now,
            priority=req.priority,
            dedupe_key=req.dedupe_key,
            available_at=now + (req.delay_ms or 0),
            max_attempts=max_attempts,
        )
        # everything that can refuse this submit is checked before an interrupt changes anything
        validate_run(run)
        encode_record(run, self.store.max_record_bytes)
        if req.dispatch_id is not None and await self.store.load_dispatch(req.dispatch_id) is not None:
            raise AlreadyExistsError(f"dispatch '{req.dispatch_id}' already exists", id=req.dispatch_id)
        if req.strategy == "interrupt":
            await self.interrupt(req.thread_id)
        try:
            await self.store.create_run(run, dispatch)
        except AlreadyExistsError as exc:
            if req.dedupe_key is None or exc.id is None or exc.id == dispatch_id:
                raise
            holder = await self.store.load_dispatch(exc.id)  # a concurrent submit with our dedupe key won
            if holder is None:
                raise
            return _duplicate_of(holder)
        await self._event("queued", dispatch, {"priority": req.priority, "strategy": req.strategy})
        status = await self._wake(dispatch)
        return SubmitReply(run_id=run_id, dispatch_id=dispatch_id, thread_id=req.thread_id, status=status)

    def _validate_submit(self, req: SubmitRequest) -> None:
        validate_id(req.thread_id, "thread_id")
        for name in ("run_id", "dispatch_id", "dedupe_key"):
            value = getattr(req, name)
            if value is not None:
                validate_id(value, name)
        if req.dispatch_id is not None:
            check_dispatch_id_for_run(req.dispatch_id, req.run_id)
        if not 0 <= req.priority <= 255:
            raise ValidationError("priority must be within 0..255", field="priority")
        if req.delay_ms is not None and not 0 <= req.delay_ms <= 365 * 86_400_000:
            raise ValidationError("delay_ms must be within 0..31536000000", field="delay_ms")
        if req.max_attempts is not None and not 1 <= req.max_attempts <= 1000:
            raise ValidationError("max_attempts must be within 1..1000", field="max_attempts")
        size = len(msgspec.json.encode(req.input))
        if size > self.max_payload:
            raise ValidationError(f"input is {size} bytes, over the {self.max_payload}-byte limit", field="input")

    async def _duplicate(self, run: RunRecord, thread_id: str) -> SubmitReply:
        if run.thread_id != thread_id:
            raise ConflictError(f"run '{run.run_id}' belongs to another thread", field="run_id")
        d = await self.store.load_dispatch(run.dispatch_id) if run.dispatch_id else None
        return SubmitReply(
            run_id=run.run_id,
            dispatch_id=run.dispatch_id or "",
            thread_id=run.thread_id,
            status="running" if d is not None and d.status == DispatchStatus.CLAIMED else "queued",
            duplicate=True,
        )

    async def _wake(self, dispatch: RunDispatch) -> str:
        """Start the dispatch here if this pod has room, else wake a pod with a signal."""
        if self.worker is not None and dispatch.available_at <= self.clock():
            attempt = await self.worker.try_dispatch_next(dispatch.thread_id)
            execution = self.worker.local_execution(dispatch.thread_id)
            if execution is not None and execution.dispatch.dispatch_id == dispatch.dispatch_id:
                return "running"
            if attempt is Attempt.BUSY:
                # this pod holds the thread and claims its next dispatch when it is done (or
                # signals it, if it cannot); were it to die first, the dispatch would wait for
                # the sweep that reclaims the thread, as a signal would too
                return "queued"
        if self.signals is not None:
            try:
                await self.signals.publish(dispatch.thread_id, dispatch.dispatch_id, headers=current_carrier())
            except Exception as exc:  # durable already; the sweeper republishes
                log.warning("event=signal_publish_failed dispatch=%s error=%r desc=%s", dispatch.dispatch_id, exc, getattr(exc, "description", ""))
        return "queued"

    # ------------------------------------------------------------------ cancel / interrupt

    async def cancel(self, *, dispatch_id: str | None = None, run_id: str | None = None,
                     thread_id: str | None = None) -> CancelReply:
        """Cancel by dispatch, run or thread id: queued work is cancelled, active runs get a live cancel."""
        if sum(x is not None for x in (dispatch_id, run_id, thread_id)) != 1:
            raise ValidationError("give exactly one of dispatch_id, run_id, thread_id", field="dispatch_id")
        now = self.clock()
        if dispatch_id is not None:
            d = await self._load_dispatch(dispatch_id)
            targets = [d]
        elif run_id is not None:
            run = await self._load_run(run_id)
            state = await self.store.read_thread(run.thread_id)
            targets = [d for d in state.dispatches.values() if d.run_id == run_id]
        else:
            assert thread_id is not None
            validate_id(thread_id, "thread_id")
            state = await self.store.read_thread(thread_id)
            targets = list(state.dispatches.values())
        cancelled: list[str] = []
        signalled: list[str] = []
        for d in targets:
            if d.status == DispatchStatus.QUEUED:
                c = await self.store.cancel(d.dispatch_id, now)
                if c is not None:
                    cancelled.append(d.dispatch_id)
                    await self._mark_run_cancelled(c, "cancelled", "queued dispatch cancelled")
            elif d.status == DispatchStatus.CLAIMED:
                reply = await self._live(d.thread_id, live.LiveCommand(command="cancel", run_id=d.run_id))
                if reply.delivered:
                    signalled.append(d.run_id)
        return CancelReply(cancelled=cancelled, signalled=signalled)

    async def interrupt(self, thread_id: str) -> InterruptReply:
        """Bump the thread's epoch, supersede its queued work, cancel its active run."""
        validate_id(thread_id, "thread_id")
        result = await self.store.interrupt(thread_id, self.clock())
        for d in result.superseded:
            await self._mark_run_cancelled(d, "superseded", RUN_SUPERSEDED)
        active = result.active_dispatch
        delivered = False
        if active is not None:
            reply = await self._live(thread_id, live.LiveCommand(command="cancel", run_id=active.run_id, reason="interrupt"))
            delivered = reply.delivered
        return InterruptReply(
            new_dispatch_epoch=result.new_dispatch_epoch,
            superseded=[d.dispatch_id for d in result.superseded],
            active_run_id=active.run_id if active else None,
            active_cancelled=delivered,
        )

    async def _mark_run_cancelled(self, d: RunDispatch, kind: str, reason: str) -> None:
        now = self.clock()

        def change(r: RunRecord) -> RunRecord | None:
            if r.is_done or r.dispatch_id != d.dispatch_id:
                return None  # finished already, or a newer dispatch carries the run
            return msgspec.structs.replace(
                r,
                status=RunStatus.DONE,
                termination=Termination(TerminationKind.CANCELLED, reason),
                error=reason if kind == "superseded" else None,
                waiting=None,
                updated_at=now,
                finished_at=now,
            )

        try:
            before = await self.store.load_run(d.run_id)
            after = await self.store.update_run(d.run_id, change)
        except NotFoundError:
            return
        if after != before:
            await self._event(kind, d, {"reason": reason})

    # ------------------------------------------------------------------ decide / send

    async def decide(self, run_id: str, ticket: str, decision: Any) -> DecideReply:
        """Deliver a decision: live to the pod running the run, else durably (a new dispatch
        of the same run that resumes it on any pod)."""
        validate_id(ticket, "ticket")
        run = await self._load_run(run_id)
        if run.is_done:
            raise ConflictError(f"run '{run_id}' is done", field="run_id")
        reply = await self._live(
            run.thread_id, live.LiveCommand(command="decision", run_id=run_id, ticket=ticket, data=decision)
        )
        if reply.delivered:
            return DecideReply(delivered="live")
        run = await self._load_run(run_id)  # it may have moved on meanwhile
        if run.status != RunStatus.WAITING or run.waiting is None or run.waiting.ticket != ticket:
            waiting_on = run.waiting.ticket if run.waiting else None
            raise ConflictError(
                f"run '{run_id}' is {run.status} and not waiting on ticket '{ticket}'"
                + (f" (it waits on '{waiting_on}')" if waiting_on else ""),
                field="ticket",
            )
        now = self.clock()
        dispatch_id = self.new_id()
        await self.store.update_run(
            run_id,
            lambda r: msgspec.structs.replace(
                r, decisions={**r.decisions, ticket: decision}, dispatch_id=dispatch_id, updated_at=now
            ),
        )
        d = RunDispatch.queued(
            dispatch_id, run.thread_id, run_id, now, priority=run.priority, max_attempts=run.max_attempts
        )
        await self.store.enqueue(d)
        await self._event("queued", d, {"resume": ticket})
        await self._wake(d)
        return DecideReply(delivered="durable", dispatch_id=dispatch_id)

    async def send(self, *, thread_id: str | None = None, run_id: str | None = None, data: Any = None) -> SendReply:
        """Hand input to the active run (live only); reports whether it was delivered."""
        if run_id is not None:
            thread_id = (await self._load_run(run_id)).thread_id
        if thread_id is None:
            raise ValidationError("give thread_id or run_id", field="thread_id")
        validate_id(thread_id, "thread_id")
        reply = await self._live(thread_id, live.LiveCommand(command="input", run_id=run_id, data=data))
        return SendReply(delivered=reply.delivered, run_id=reply.run_id, reason=reply.reason)

    async def _live(self, thread_id: str, command: live.LiveCommand) -> live.LiveReply:
        if self.nc is None:
            return live.LiveReply(delivered=False, reason="no live channel")
        reply = await live.deliver(self.nc, self.prefix, thread_id, command)
        self.metrics.live_deliveries.labels("delivered" if reply.delivered else "not_delivered").inc()
        return reply

    # ------------------------------------------------------------------ dead letters

    async def replay(self, dispatch_id: str) -> ReplayReply:
        """Re-queue a dead-lettered dispatch as a new dispatch of the same run."""
        d = await self._load_dispatch(dispatch_id)
        if d.status != DispatchStatus.DEAD_LETTER:
            raise ConflictError(f"dispatch '{dispatch_id}' is {d.status}, not dead_letter", field="dispatch_id")
        now = self.clock()
        new_dispatch_id = self.new_id()

        def reopen(r: RunRecord) -> RunRecord | None:
            if r.dispatch_id != dispatch_id:
                raise ConflictError(f"run '{r.run_id}' has moved on to dispatch '{r.dispatch_id}'", field="dispatch_id")
            return msgspec.structs.replace(
                r,
                status=RunStatus.CREATED,
                dispatch_id=new_dispatch_id,
                output=None,
                error=None,
                termination=None,
                finished_at=None,
                updated_at=now,
            )

        run = await self.store.update_run(d.run_id, reopen)
        new = RunDispatch.queued(new_dispatch_id, d.thread_id, d.run_id, now, priority=d.priority,
                                 max_attempts=run.max_attempts)
        await self.store.enqueue(new)
        await self._event("queued", new, {"replay_of": dispatch_id})
        await self._wake(new)
        return ReplayReply(run_id=d.run_id, dispatch_id=new_dispatch_id, thread_id=d.thread_id)

    # ------------------------------------------------------------------ helpers

    async def _load_dispatch(self, dispatch_id: str) -> RunDispatch:
        validate_id(dispatch_id, "dispatch_id")
        d = await self.store.load_dispatch(dispatch_id)
        if d is None:
            raise NotFoundError(f"dispatch '{dispatch_id}' not found", id=dispatch_id)
        return d

    async def _load_run(self, run_id: str) -> RunRecord:
        validate_id(run_id, "run_id")
        run = await self.store.load_run(run_id)
        if run is None:
            raise NotFoundError(f"run '{run_id}' not found", id=run_id)
        return run

    async def _event(self, kind: str, d: RunDispatch, data: Any = None) -> None:
        if self.events is not None:
            await self.events.emit(kind, d, data, self.clock())


def _duplicate_of(d: RunDispatch) -> SubmitReply:
    """The reply to a submit whose dedupe key is held by the live dispatch `d`."""
    return SubmitReply(
        run_id=d.run_id,
        dispatch_id=d.dispatch_id,
        thread_id=d.thread_id,
        status="running" if d.status == DispatchStatus.CLAIMED else "queued",
        duplicate=True,
    )
