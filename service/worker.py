"""The worker manager: what each pod runs (DESIGN.md §2.2, spec/worker-manager.md §2–§3).

It pulls signal batches, claims per thread, runs the handler with a renewed lease, settles
the run and the dispatch, and chains to the thread's next dispatch. One pod at a time (the
maintenance leader) sweeps expired leases, republishes lost signals and collects garbage.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from opentelemetry import context as otel_context

from . import retry
from .bounded import Bounded
from .config import Settings
from .events import EventStream
from .handlers import Handler, PermanentError, RunContext, Suspended, TransientError
from .live import LiveCommand, LiveReply, decode_command, encode_reply
from .metrics import Metrics
from .natsclient import subscribe_inline
from .tracing import PassThroughTracer, carrier_from, context_from
from .model import (
    RUN_SUPERSEDED,
    DispatchStatus,
    NotFoundError,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    StoreError,
    Termination,
    TerminationKind,
    VersionConflictError,
)
from .signals import Signal, Signals, blocked_delay_ms
from .store import DispatchStore, keys
from .store.base import CLOCK_SKEW_MS, Survey
from .store.ops import ThreadState

log = logging.getLogger("mailbox.worker")

# dispatches this pod completed, remembered to settle their late signals without a store read;
# small enough to be full early in a pod's life (a steady memory footprint)
FINISHED_MEMORY = 8192


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Attempt(enum.Enum):
    """What `try_dispatch_next` did for a thread."""

    CLAIMED = "claimed"
    BUSY = "busy"  # this pod already runs (or claims) the thread and will claim its next one
    AT_CAPACITY = "at_capacity"  # no free slot on this pod
    NO_ELIGIBLE = "no_eligible"
    TRANSIENT_ERROR = "transient_error"


class CancelReason(enum.StrEnum):
    CANCELLED = "cancelled"  # a user cancelled the run
    SUPERSEDED = "superseded"  # an interrupt made the dispatch stale
    LEASE_LOST = "lease_lost"
    SHUTDOWN = "shutdown"


@dataclass
class Execution:
    """A run executing on this pod."""

    dispatch: RunDispatch
    task: asyncio.Task[None] | None = None
    context: RunContext | None = None
    cancel_reason: CancelReason | None = None
    lease_until: int = 0
    renewal_now: asyncio.Event = field(default_factory=asyncio.Event)
    renewal_due: float = 0.0  # loop time of the first renewal
    renewal: asyncio.Task[None] | None = None  # the renewal loop, from the first renewal on
    handler_done: bool = False
    instance: str | None = None  # this attempt's start id, once started


class WorkerManager:
    """Per-pod execution engine. `await start()`, then `await stop()` (graceful drain)."""

    def __init__(
        self,
        *,
        store: DispatchStore,
        handler: Handler,
        settings: Settings,
        signals: Signals | None = None,
        events: EventStream | None = None,
        nc: Any = None,
        consumer_id: str | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        metrics: Metrics | None = None,
        tracer: Any = None,
    ) -> None:
        self.store = store
        self.handler = handler
        self.settings = settings
        self.signals = signals
        self.events = events
        self.nc = nc
        self.consumer_id = consumer_id or f"pod-{uuid.uuid4().hex[:12]}"
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.tracer = tracer or PassThroughTracer()
        self._busy: dict[str, Execution | None] = {}  # thread -> None while claiming, else the execution
        self._finished_here: Bounded[str, None] = Bounded(FINISHED_MEMORY)  # dispatches this pod completed
        # threads told BUSY since our last claim on them: the caller (a signal acked, a submit
        # that sent no signal) relies on our next claim, which must look past our own last commit
        self._promised: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._renewal_timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self.signal_loop_running = False
        self.signal_stats = {"pulled": 0, "ack": 0, "nak": 0, "nak_delayed": 0, "redelivered": 0}

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, recover: bool = True) -> None:
        if recover:
            await self.recover()
        if self.signals is not None:
            self._loops.append(asyncio.create_task(self._signal_loop(), name="signal-loop"))
        self._loops.append(asyncio.create_task(self._maintenance_loop(), name="maintenance"))

    async def stop(self, drain_timeout_ms: int | None = None) -> None:
        """Stop pulling, let in-flight runs finish up to the drain timeout, then cancel them
        (their leases lapse and another pod takes them over)."""
        self._stopping = True
        timeout = (self.settings.drain_timeout_ms if drain_timeout_ms is None else drain_timeout_ms) / 1000
        signal_loop = [t for t in self._loops if t.get_name() == "signal-loop"]
        if signal_loop:  # let the current fetch end by itself: cancelling it strands messages
            await asyncio.wait(signal_loop, timeout=self.settings.fetch_expires_ms / 1000 + timeout)
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        running = [e.task for e in self._executions() if e.task is not None]
        if running:
            done, pending = await asyncio.wait(running, timeout=timeout)
            for e in self._executions():
                if e.task in pending:
                    self._cancel(e, CancelReason.SHUTDOWN)
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._renewal_timer is not None:
            self._renewal_timer.cancel()
            self._renewal_timer = None
        log.info("event=worker_stopped consumer=%s", self.consumer_id)

    def _executions(self) -> list[Execution]:
        return [e for e in self._busy.values() if e is not None]

    @property
    def running(self) -> int:
        return sum(1 for e in self._busy.values() if e is not None)

    # ------------------------------------------------------------------ claiming

    async def try_dispatch_next(self, thread_id: str, *, chained: bool = False) -> Attempt:
        """Claim the thread's next eligible dispatch and start executing it here. `chained`:
        right after this pod completed the thread's previous dispatch (a guarded write: our
        view of the thread is current as of it, and what was enqueued since has a signal)."""
        if thread_id in self._busy:
            self._promised.add(thread_id)
            return Attempt.BUSY
        if self._stopping or len(self._busy) >= self.settings.concurrency:
            return Attempt.AT_CAPACITY
        self._busy[thread_id] = None  # claiming: closes the race of two callers seeing "idle"
        # a caller told BUSY relies on this claim to take what it knows of: our own last write
        # may predate that, so the claim looks again (and again, for one told BUSY meanwhile)
        trust_own_commit = chained and thread_id not in self._promised
        try:
            with self.metrics.timed("claim"), self.tracer.start_as_current_span(
                "mailbox.claim", attributes={"mailbox.thread_id": thread_id}
            ):
                while True:
                    self._promised.discard(thread_id)
                    # the claim records the start in the same write: this pod runs what it claims now
                    claimed = await self.store.claim(
                        thread_id, self.consumer_id, self.settings.lease_ms, self.clock(), 1,
                        start=self.store.new_token(), after_own_commit=trust_own_commit,
                    )
                    if claimed or thread_id not in self._promised:
                        break
                    trust_own_commit = False
        except StoreError as exc:
            self._busy.pop(thread_id, None)
            log.warning("event=claim_failed thread=%s error=%s", thread_id, exc)
            return Attempt.TRANSIENT_ERROR
        if not claimed:
            self._busy.pop(thread_id, None)
            return Attempt.NO_ELIGIBLE
        self._launch(claimed[0])
        return Attempt.CLAIMED

    def adopt(self, dispatch: RunDispatch) -> bool:
        """Execute a dispatch this pod claimed by id (the inline submit path)."""
        if dispatch.thread_id in self._busy:
            return False
        self._busy[dispatch.thread_id] = None
        self._launch(dispatch)
        return True

    def _launch(self, dispatch: RunDispatch) -> None:
        execution = Execution(dispatch=dispatch, lease_until=dispatch.lease_until or 0)
        self._busy[dispatch.thread_id] = execution
        execution.task = asyncio.create_task(self._execute(execution), name=f"run-{dispatch.dispatch_id}")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self, execution: Execution) -> None:
        # execution → context → hooks → execution is a cycle: broken here, the run's objects
        # are freed by reference counting instead of waiting for the cyclic collector
        execution.context = None
        thread_id = execution.dispatch.thread_id
        if self._busy.get(thread_id) is execution:
            del self._busy[thread_id]
        # finish, then claim the thread's next dispatch
        self._spawn(self._chain(thread_id, completed=execution.dispatch.dispatch_id in self._finished_here))

    async def _chain(self, thread_id: str, completed: bool) -> None:
        attempt = await self.try_dispatch_next(thread_id, chained=completed)
        if attempt in (Attempt.AT_CAPACITY, Attempt.TRANSIENT_ERROR):
            # we cannot take the thread's next run (full, or draining): hand it to any pod.
            # Signals for it may have been acked on the promise that we would chain.
            self._promised.discard(thread_id)
            try:
                queued = await self.store.list_dispatches(thread_id, [DispatchStatus.QUEUED])
            except StoreError:
                return  # the sweeper republishes
            for d in queued:
                await self._signal(d)

    # ------------------------------------------------------------------ signal loop

    async def _signal_loop(self) -> None:
        assert self.signals is not None
        self.signal_loop_running = True
        try:
            while not self._stopping:
                free = self.settings.concurrency - len(self._busy)
                if free <= 0:
                    await asyncio.sleep(0.005)
                    continue
                try:
                    batch = await self.signals.fetch(min(self.settings.signal_batch, free), self.settings.fetch_expires_ms)
                except (nats.errors.Error, asyncio.TimeoutError) as exc:
                    log.warning("event=signal_pull_failed error=%r", exc)
                    await asyncio.sleep(0.25)
                    continue
                if not batch:
                    continue
                self.signal_stats["pulled"] += len(batch)
                self.metrics.signals_pulled.inc(len(batch))
                await asyncio.gather(*(self._handle_signal(s) for s in batch))
        finally:
            self.signal_loop_running = False

    async def _handle_signal(self, signal: Signal) -> None:
        """Settle one signal by the table of DESIGN.md §2.2. Never raises."""
        receipt = signal.receipt
        token = otel_context.attach(context_from(carrier_from(signal.headers)))  # the submitter's trace
        try:
            if receipt.deliveries > 1:
                self.signal_stats["redelivered"] += 1
                self.metrics.signals_redelivered.inc()
            if signal.dispatch_id in self._finished_here:
                # we completed it (a completed dispatch never runs again): a late wake-up, most
                # often for a run we chained before its own signal came; nothing to read
                await self._settle(receipt.ack())
                return
            attempt = await self.try_dispatch_next(signal.thread_id)
            if attempt in (Attempt.CLAIMED, Attempt.BUSY):
                await self._settle(receipt.ack())
            elif attempt is Attempt.TRANSIENT_ERROR:
                await self._settle(receipt.nak(), delayed=None)
            elif attempt is Attempt.AT_CAPACITY:
                await self._settle(receipt.nak(self.settings.nak_base_ms), delayed=True)
            else:
                await self._settle_unclaimed(signal)
        except Exception as exc:  # a signal must never be stranded
            log.exception("event=signal_handler_failed thread=%s dispatch=%s", signal.thread_id, signal.dispatch_id)
            try:
                await receipt.nak()
            except Exception:
                log.warning("event=signal_nak_failed error=%r", exc)
        finally:
            otel_context.detach(token)

    async def _settle_unclaimed(self, signal: Signal) -> None:
        receipt = signal.receipt
        try:
            thread = await self.store.read_thread(signal.thread_id)
        except StoreError:
            await self._settle(receipt.nak(), delayed=None)
            return
        now = self.clock()
        d = thread.dispatches.get(signal.dispatch_id)
        holders = thread.claimed()
        if d is None or d.status != DispatchStatus.QUEUED:
            await self._settle(receipt.ack())  # gone, terminal, or claimed: nothing to wake
        elif d.available_at > now:
            await self._settle(receipt.nak(d.available_at - now), delayed=True)  # wake at available_at
        elif holders and all((h.lease_until or 0) >= now for h in holders):
            # a live claim holds the thread: its owner claims the next dispatch when it
            # finishes (and hands off with a signal if it cannot), so this wake-up is done
            await self._settle(receipt.ack())
        else:
            # held by an expired claim (its pod is likely gone; the sweep reclaims it) or a
            # lost race: come back later, waiting longer each time
            delay = blocked_delay_ms(receipt.deliveries, self.settings.nak_base_ms, self.settings.nak_cap_ms)
            await self._settle(receipt.nak(delay), delayed=True)

    async def _settle(self, call: Any, delayed: bool | None = False) -> None:
        await call
        if delayed is False:
            self.signal_stats["ack"] += 1
            self.metrics.signals_acked.inc()
        else:
            self.signal_stats["nak"] += 1
            self.metrics.signals_naked.labels("true" if delayed else "false").inc()
            if delayed:
                self.signal_stats["nak_delayed"] += 1

    async def _signal(self, d: RunDispatch, msg_id: str | None = None) -> None:
        if self.signals is None:
            return
        try:
            if await self.signals.publish(d.thread_id, d.dispatch_id, msg_id=msg_id) and msg_id:
                self.metrics.signals_republished.inc()
        except Exception as exc:  # the sweeper republishes
            log.warning("event=signal_publish_failed dispatch=%s error=%r desc=%s", d.dispatch_id, exc, getattr(exc, "description", ""))

    # ------------------------------------------------------------------ execution

    async def _execute(self, execution: Execution) -> None:
        d = execution.dispatch
        token = d.claim_token or ""
        # most runs end long before their first renewal: one pod-wide timer watches for the
        # renewals that come due, rather than a timer (or a task) per run
        loop = asyncio.get_running_loop()
        execution.renewal_due = loop.time() + self.settings.lease_renewal_ms / 1000
        self._watch_renewals(loop)
        live = None
        self.metrics.active_runs.inc()
        try:
            started = self.clock()
            if d.lease_until is not None and started >= d.lease_until:
                # the claim took longer than its lease (a stalled store): renew before running,
                # or leave it, if it was reclaimed meanwhile
                if not await self._renew_lapsed(execution, started):
                    log.info("event=claim_expired_before_start dispatch=%s", d.dispatch_id)
                    return
            self.metrics.enqueue_to_start.observe(max(0, started - d.created_at) / 1000)
            self.metrics.claim_to_start.observe(max(0, started - d.updated_at) / 1000)
            if d.dispatch_instance_id is not None and d.run_status == RunStatus.RUNNING:
                instance = d.dispatch_instance_id  # the claim recorded the start (and checked the epoch)
            else:
                instance = self.store.new_token()
                try:
                    # one round trip re-checks ownership and the epoch before anything runs
                    with self.metrics.timed("record_dispatch_start"):
                        await self.store.record_dispatch_start(d.dispatch_id, token, instance, started)
                except (VersionConflictError, NotFoundError):
                    await self._after_lost_start(d)
                    return
                except StoreError as exc:
                    log.warning("event=start_failed dispatch=%s error=%s", d.dispatch_id, exc)
                    return  # the lease lapses and the sweep reclaims it
            execution.instance = instance
            # one compare-and-set both reads the run (verified, never a cached guess) and marks it running
            try:
                run = await self.store.update_run(d.run_id, lambda r: _started(r, d.dispatch_id, instance, self.clock()))
            except NotFoundError:
                await self._dead_letter(d, token, f"run '{d.run_id}' not found for dispatch '{d.dispatch_id}'", None)
                return
            if run.is_done:  # a re-delivery of a run that already finished: nothing to do
                await self._complete_dispatch(d, token, instance, RunStatus.DONE, None)
                return
            if run.dispatch_id != d.dispatch_id:
                # the run moved on to a newer dispatch (a durable decision, a replay): that one runs it
                await self._call(self.store.supersede_claimed(
                    d.dispatch_id, token, self.clock(), f"run continued by dispatch '{run.dispatch_id}'"), d)
                return
            await self._event("started" if not run.decisions else "resumed", d, {"pod": self.consumer_id})
            context = RunContext(
                thread_id=d.thread_id,
                run_id=d.run_id,
                dispatch_id=d.dispatch_id,
                attempt=d.attempt_count + 1,
                input=run.input,
                metadata=dict(run.metadata),
                decisions=run.decisions,
                hooks=_Hooks(self, execution),
                decision_wait_ms=self.settings.decision_wait_ms,
                nats=self.nc,
            )
            execution.context = context
            live = await self._open_live(execution)
            with self.tracer.start_as_current_span(
                "mailbox.execute",
                context=context_from(run.trace),
                attributes={"mailbox.thread_id": d.thread_id, "mailbox.run_id": d.run_id,
                            "mailbox.dispatch_id": d.dispatch_id, "mailbox.attempt": d.attempt_count + 1},
            ) as span:
                outcome = await self._run_handler(execution, context)
                span.set_attribute("mailbox.outcome", outcome.kind)
            execution.handler_done = True  # live commands from now on find no run to take them
            if live is not None:
                await _unsubscribe(live)
                live = None
            await self._settle_run(execution, instance, outcome)
        except Exception:
            log.exception("event=execution_failed dispatch=%s", d.dispatch_id)
        finally:
            self.metrics.active_runs.dec()
            if execution.renewal is not None:
                execution.renewal.cancel()
            if live is not None:
                await _unsubscribe(live)
            self._finish(execution)

    async def _run_handler(self, execution: Execution, context: RunContext) -> _Outcome:
        # started eagerly: a handler that finishes without waiting (or up to its first wait)
        # runs here and now, not one loop turn later
        task = asyncio.Task(self.handler(context), loop=asyncio.get_running_loop(), eager_start=True)
        inner = execution.task
        try:
            # awaited directly, not through a shield (a future and its callbacks per run): a
            # cancel of the execution goes on to the handler, which has ended when we resume;
            # ours (`_cancel`) set `context.cancelled` first
            output = await task
            if inner is not None and inner.cancelling():
                raise asyncio.CancelledError  # the handler swallowed the cancel: it still counts
            return _Outcome("ok", output)
        except asyncio.CancelledError:
            if execution.cancel_reason is None and inner is not None and inner.cancelling():
                raise  # not a cancel of ours (the loop shutting down): pass it on
            return _Outcome("cancelled", execution.cancel_reason)
        except Suspended as s:
            return _Outcome("waiting", s)
        except PermanentError as exc:
            return _Outcome("permanent", str(exc) or type(exc).__name__)
        except TransientError as exc:
            return _Outcome("transient", str(exc) or type(exc).__name__)
        except Exception as exc:  # unknown failures are retried
            return _Outcome("transient", f"{type(exc).__name__}: {exc}")

    async def _settle_run(self, execution: Execution, instance: str, outcome: _Outcome) -> None:
        d = execution.dispatch
        token = d.claim_token or ""
        now = self.clock()
        label = _OUTCOME_LABELS.get(outcome.kind, outcome.kind)
        self.metrics.runs.labels(label).inc()
        self.metrics.runtime.labels(label).observe(max(0, now - (d.updated_at or now)) / 1000)
        self.metrics.enqueue_to_complete.labels(label).observe(max(0, now - d.created_at) / 1000)
        shutdown = outcome.kind == "cancelled" and outcome.value is CancelReason.SHUTDOWN
        if now >= execution.lease_until and not shutdown:
            # the lease ran out while the handler ran (renewals failing): the sweep may have
            # reclaimed the claim, and a run write now would land after that takeover. A claim
            # still ours is renewed for another lease first; one that is gone leaves the run
            # to whoever claims it next
            if not await self._renew_lapsed(execution, now):
                log.info("event=result_dropped_lease_lapsed dispatch=%s", d.dispatch_id)
                await self._after_lost_start(d)
                return
        if outcome.kind == "ok":
            # run first, then dispatch: if the run's write fails, the claim is left to lapse
            # and the run runs again, rather than an acked dispatch with an unfinished run
            if await self._update_run(d, lambda r: _finished(r, RunStatus.DONE, now, output=outcome.value), instance=instance) is _FAILED:
                return
            await self._complete_dispatch(d, token, instance, RunStatus.DONE, outcome.value)
            await self._event("finished", d, {"status": "done", "output": outcome.value})
        elif outcome.kind == "waiting":
            s: Suspended = outcome.value
            if await self._update_run(d, lambda r: _waiting(r, s.ticket, s.prompt, now), instance=instance) is _FAILED:
                return
            await self._complete_dispatch(d, token, instance, RunStatus.WAITING, None)
        elif outcome.kind == "permanent":
            await self._dead_letter(d, token, outcome.value, instance)
        elif outcome.kind == "transient":
            await self._retry(d, token, outcome.value, instance)
        else:
            await self._after_cancel(execution, instance, outcome.value)

    async def _retry(self, d: RunDispatch, token: str, error: str, instance: str) -> None:
        now = self.clock()
        if d.attempt_count + 1 >= d.max_attempts:  # this nack dead-letters
            await self._update_run(d, lambda r: _finished(r, RunStatus.DONE, now, error=error), instance=instance)
            await self._call(self.store.nack(d.dispatch_id, token, now, error, now), d)
            await self._event("dead_lettered", d, {"error": error, "attempts": d.attempt_count + 1})
            return
        retry_at = now + retry.retry_delay_ms(d.attempt_count, self.settings.retry_base_ms, self.settings.retry_cap_ms)
        await self._update_run(
            d, lambda r: msgspec.structs.replace(r, status=RunStatus.CREATED, error=error, updated_at=now), instance=instance
        )
        if await self._call(self.store.nack(d.dispatch_id, token, retry_at, error, now), d):
            await self._event("rescheduled", d, {"reason": "retry_backoff", "retry_at": retry_at, "error": error})
            await self._signal(d)

    async def _dead_letter(self, d: RunDispatch, token: str, error: str, instance: str | None) -> None:
        now = self.clock()
        await self._update_run(d, lambda r: _finished(r, RunStatus.DONE, now, error=error), missing_ok=True, instance=instance)
        if await self._call(self.store.dead_letter(d.dispatch_id, token, error, now), d):
            await self._event("dead_lettered", d, {"error": error, "attempts": d.attempt_count + 1})

    async def _after_cancel(self, execution: Execution, instance: str, reason: CancelReason | None) -> None:
        d = execution.dispatch
        token = d.claim_token or ""
        now = self.clock()
        if reason is CancelReason.CANCELLED:
            if await self._update_run(d, lambda r: _finished(r, RunStatus.DONE, now, cancelled=True), instance=instance) is _FAILED:
                return
            await self._complete_dispatch(d, token, instance, RunStatus.DONE, None)
            await self._event("cancelled", d, {"reason": "cancelled"})
        elif reason is CancelReason.SUPERSEDED:
            await self._call(self.store.supersede_claimed(d.dispatch_id, token, now, "run interrupted"), d)
            await self._update_run(d, lambda r: _finished(r, RunStatus.DONE, now, cancelled=True, error=RUN_SUPERSEDED))
            await self._event("superseded", d, {"reason": "interrupt"})
        elif reason is CancelReason.LEASE_LOST:
            await self._after_lost_start(d)
        # SHUTDOWN: leave the claim; its lease lapses and another pod takes the run over

    async def _after_lost_start(self, d: RunDispatch) -> None:
        """Our claim is gone. If an interrupt superseded it, the run ends as superseded."""
        try:
            now_d = await self.store.load_dispatch(d.dispatch_id)
        except StoreError:
            return
        if now_d is not None and now_d.status == DispatchStatus.SUPERSEDED:
            now = self.clock()
            changed = await self._update_run(
                d, lambda r: _finished(r, RunStatus.DONE, now, cancelled=True, error=RUN_SUPERSEDED)
            )
            if changed is _CHANGED:
                await self._event("superseded", d, {"reason": "interrupt"})

    async def _complete_dispatch(
        self, d: RunDispatch, token: str, instance: str, status: RunStatus, output: Any
    ) -> None:
        now = self.clock()
        result = RunDispatchResult(run_id=d.run_id, dispatch_instance_id=instance, status=status)
        with self.metrics.timed("ack"):
            if await self._call(self.store.complete(d.dispatch_id, token, result, now), d):
                self._finished_here.put(d.dispatch_id, None)

    async def _update_run(
        self,
        d: RunDispatch,
        change: Callable[[RunRecord], RunRecord | None],
        missing_ok: bool = False,
        instance: str | None = None,
    ) -> object:
        """Change the run that `d` carries: `_CHANGED`, `_UNCHANGED` (finished already, or the run
        has moved on to another dispatch, or, with the `instance` of an execution, to a later
        attempt of this one: a stale owner never rewrites it), or `_FAILED`."""
        changed = False

        def fenced(r: RunRecord) -> RunRecord | None:
            nonlocal changed
            if r.is_done or r.dispatch_id != d.dispatch_id:
                return None
            if instance is not None and r.dispatch_instance_id not in (None, instance):
                return None
            new = change(r)
            changed = new is not None and new != r
            return new

        try:
            await self.store.update_run(d.run_id, fenced)
            return _CHANGED if changed else _UNCHANGED
        except NotFoundError:
            if not missing_ok:
                log.warning("event=run_missing run=%s dispatch=%s", d.run_id, d.dispatch_id)
            return _FAILED
        except StoreError as exc:
            log.warning("event=run_update_failed run=%s error=%s", d.run_id, exc)
            return _FAILED

    async def _call(self, coro: Any, d: RunDispatch) -> bool:
        """A store call on our claim; False (logged) if the claim is gone or the store failed."""
        try:
            await coro
            return True
        except VersionConflictError as exc:
            log.info("event=claim_lost dispatch=%s reason=%s", d.dispatch_id, exc)
        except StoreError as exc:
            log.warning("event=store_call_failed dispatch=%s error=%s", d.dispatch_id, exc)
        return False

    # ------------------------------------------------------------------ leases and live commands

    def _watch_renewals(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._renewal_timer is None:
            # often enough that a renewal starts well inside the lease
            s = self.settings
            tick = max(0.005, min(s.lease_renewal_ms, s.lease_ms - s.lease_renewal_ms) / 4 / 1000)
            self._renewal_timer = loop.call_later(tick, self._start_due_renewals, loop)

    def _start_due_renewals(self, loop: asyncio.AbstractEventLoop) -> None:
        self._renewal_timer = None
        now = loop.time()
        pending = False
        for execution in self._busy.values():
            if execution is None or execution.renewal is not None or execution.task is None or execution.task.done():
                continue
            if execution.renewal_due <= now:
                self.renew_lease_now(execution)
            else:
                pending = True
        if pending:
            self._watch_renewals(loop)

    def renew_lease_now(self, execution: Execution) -> None:
        """Renew the execution's lease now (its renewal loop starts at the first one due)."""
        if execution.renewal is not None:
            execution.renewal_now.set()
            return
        d = execution.dispatch
        execution.renewal = asyncio.create_task(self._renew_lease(execution), name=f"lease-{d.dispatch_id}")

    async def _renew_lease(self, execution: Execution) -> None:
        interval = self.settings.lease_renewal_ms / 1000
        while True:
            execution.renewal_now.clear()
            suspended = execution.context is not None and execution.context.suspended
            lease_ms = self.settings.suspended_lease_ms if suspended else self.settings.lease_ms
            now = self.clock()
            renewed = await self._extend(execution, lease_ms, now)
            if renewed is False or (renewed is None and now >= execution.lease_until):
                self._cancel(execution, CancelReason.LEASE_LOST)
                return
            try:
                await asyncio.wait_for(execution.renewal_now.wait(), interval)
            except TimeoutError:
                pass

    async def _renew_lapsed(self, execution: Execution, now: int) -> bool:
        """Renew a claim whose lease ran out by our clock: True (with a fresh lease) while it
        is still ours; False when it is gone or the store cannot say."""
        return await self._extend(execution, self.settings.lease_ms, now) is True

    async def _extend(self, execution: Execution, lease_ms: int, now: int) -> bool | None:
        """Extend the execution's lease to `now + lease_ms`: True, False when the claim is
        gone, None when the store failed (both logged and counted)."""
        d = execution.dispatch
        try:
            renewed = await self.store.extend_lease(d.dispatch_id, d.claim_token or "", lease_ms, now)
        except StoreError as exc:
            self.metrics.lease_renewals.labels("error").inc()
            log.warning("event=lease_renewal_failed dispatch=%s error=%s", d.dispatch_id, exc)
            return None
        self.metrics.lease_renewals.labels("ok" if renewed else "lost").inc()
        if renewed:
            execution.lease_until = now + lease_ms
        else:
            log.info("event=lease_lost dispatch=%s", d.dispatch_id)
        return renewed

    def _cancel(self, execution: Execution, reason: CancelReason) -> bool:
        if execution.task is None or execution.task.done() or execution.cancel_reason is not None:
            return False
        execution.cancel_reason = reason
        if execution.context is not None:
            execution.context.cancelled.set()
        execution.task.cancel()
        return True

    async def _open_live(self, execution: Execution) -> Any:
        if self.nc is None:
            return None
        prefix = getattr(self.store, "prefix", self.settings.prefix)
        subject = keys.live_thread_subject(prefix, execution.dispatch.thread_id)

        def on_command(msg: Any) -> None:
            reply = self.deliver_live(execution, decode_command(msg.data))
            if msg.reply:
                self._spawn(self.nc.publish(msg.reply, encode_reply(reply)))

        # inline: every run opens one, and most never get a command
        return await subscribe_inline(self.nc, subject, on_command)

    def deliver_live(self, execution: Execution, command: LiveCommand | None) -> LiveReply:
        """Hand a live command to a run executing here."""
        d = execution.dispatch
        if command is None:
            return LiveReply(delivered=False, reason="malformed command")
        if execution.handler_done:
            return LiveReply(delivered=False, reason="the run has finished", run_id=d.run_id)
        if command.run_id and command.run_id != d.run_id:
            return LiveReply(delivered=False, reason=f"run '{d.run_id}' is active, not '{command.run_id}'")
        if command.command == "cancel":
            reason = CancelReason.SUPERSEDED if command.reason == "interrupt" else CancelReason.CANCELLED
            self._cancel(execution, reason)
            # a run already being cancelled (its lease lost to this very interrupt, say) is
            # cancelled as asked: that counts as delivered
            return LiveReply(delivered=execution.cancel_reason is not None, run_id=d.run_id)
        ctx = execution.context
        if ctx is None:
            return LiveReply(delivered=False, reason="run not started yet", run_id=d.run_id)
        if command.command == "decision":
            ok = ctx.deliver_decision(command.ticket or "", command.data)
            return LiveReply(delivered=ok, run_id=d.run_id, reason=None if ok else "not waiting on this ticket")
        if command.command == "input":
            ctx.deliver_input(command.data)
            return LiveReply(delivered=True, run_id=d.run_id)
        return LiveReply(delivered=False, reason=f"unknown command {command.command!r}")

    def local_execution(self, thread_id: str) -> Execution | None:
        return self._busy.get(thread_id)

    # ------------------------------------------------------------------ events

    async def _event(self, kind: str, d: RunDispatch, data: Any = None) -> None:
        if self.events is not None:
            await self.events.emit(kind, d, data, self.clock())

    # ------------------------------------------------------------------ maintenance

    async def _maintenance_loop(self) -> None:
        sweep_every = self.settings.sweep_interval_ms / 1000
        gc_every = self.settings.gc_interval_ms / 1000
        next_sweep = time.monotonic() + sweep_every
        next_gc = time.monotonic() + gc_every
        while not self._stopping:
            await asyncio.sleep(max(0.0, min(next_sweep, next_gc) - time.monotonic()))
            now_mono = time.monotonic()
            try:
                leader = await self.store.try_lead("maintenance", self.consumer_id, int(2.5 * min(sweep_every, gc_every) * 1000), self.clock())
            except StoreError as exc:
                log.warning("event=leader_check_failed error=%s", exc)
                leader = False
            try:
                if now_mono >= next_sweep:
                    next_sweep = now_mono + sweep_every
                    if leader:
                        await self.sweep()
                if now_mono >= next_gc:
                    next_gc = now_mono + gc_every
                    if leader:
                        await self.gc()
            except StoreError as exc:
                log.warning("event=maintenance_failed error=%s", exc)

    async def sweep(self, lost_grace_ms: int | None = None) -> Survey:
        """One pass over the bucket: reclaim expired leases, republish signals for queued work
        nobody is waking, refresh the depth gauges, reconcile runs with their dispatches, and
        re-enqueue runs whose dispatch was never written (older than `lost_grace_ms`, by
        default a sweep interval or a lease). Returns what the pass found."""
        now = self.clock()
        open_runs, survey = await self.store.sweep_view(now, expired_limit=100)
        with self.metrics.timed("reclaim"):
            reclaimed = await self.store.reclaim_expired_leases(now, 100, candidates=survey.expired)
        self.metrics.reclaims.inc(len(reclaimed))
        for d in reclaimed:
            if d.status == DispatchStatus.QUEUED:
                await self._event("rescheduled", d, {"reason": "expired_lease_reclaimed"})
                await self._signal(d)
            else:
                await self._update_run(d, lambda r: _finished(r, RunStatus.DONE, now, error=d.last_error))
                await self._event("dead_lettered", d, {"error": d.last_error, "attempts": d.attempt_count})
        bucket = now // self.settings.republish_after_ms
        for d in survey.queued:
            # a dispatch is signalled when it is enqueued, retried or reclaimed (its updated_at)
            # and its signal comes back at available_at: only one quiet for longer than
            # republish_after may have lost it (a backlog is not re-signalled on every sweep)
            if max(d.updated_at, d.available_at) <= now - self.settings.republish_after_ms:
                await self._signal(d, msg_id=f"sweep:{d.dispatch_id}:{bucket}")
        for status, n in survey.counts.items():
            self.metrics.depth.labels(status.value).set(n)
        await self.reconcile_runs(open_runs, survey.wanted, now)
        if lost_grace_ms is None:
            lost_grace_ms = max(self.settings.sweep_interval_ms, self.settings.lease_ms)
        await self.recover_lost_dispatches(now, lost_grace_ms, open_runs=open_runs, known=survey.wanted)
        return survey

    async def reconcile_runs(self, open_runs: list[RunRecord], dispatches: dict[str, RunDispatch], now: int) -> int:
        """Finish runs whose dispatch ended without them: superseded or cancelled (an interrupt
        raced the settle, a stale claim was reclaimed), dead-lettered, or acked while the run's
        own write failed (that run runs again). `dispatches`: the open runs' dispatches by id.
        Runs changed in the last lease are left alone: their owner may be settling them now."""
        repaired = 0
        for run in open_runs:
            d = dispatches.get(run.dispatch_id or "")
            if d is None or not d.is_terminal or max(d.updated_at, run.updated_at) > now - self.settings.lease_ms:
                continue
            if d.status == DispatchStatus.ACKED:
                if run.status == RunStatus.WAITING:
                    continue  # the durable wait: a decision resumes it
                repaired += await self._rerun(run, now)
            elif d.status == DispatchStatus.DEAD_LETTER:
                if await self._update_run(d, lambda r: _finished(r, RunStatus.DONE, now, error=d.last_error)) is _CHANGED:
                    await self._event("dead_lettered", d, {"error": d.last_error, "reconciled": True})
                    repaired += 1
            else:  # superseded or cancelled
                superseded = d.status == DispatchStatus.SUPERSEDED
                error = RUN_SUPERSEDED if superseded else None
                if await self._update_run(d, lambda r: _finished(r, RunStatus.DONE, now, cancelled=True, error=error)) is _CHANGED:
                    await self._event(d.status.value, d, {"reconciled": True})
                    repaired += 1
        return repaired

    async def _rerun(self, run: RunRecord, now: int) -> int:
        """A new dispatch for a run whose outcome was lost (its dispatch acked without it)."""
        dispatch_id = self.store.new_token()
        old = run.dispatch_id

        def move(r: RunRecord) -> RunRecord | None:
            if r.is_done or r.dispatch_id != old:
                return None
            return msgspec.structs.replace(r, dispatch_id=dispatch_id, status=RunStatus.CREATED, updated_at=now)

        try:
            moved = await self.store.update_run(run.run_id, move)
            if moved.dispatch_id != dispatch_id:
                return 0
            d = RunDispatch.queued(dispatch_id, run.thread_id, run.run_id, now, priority=run.priority,
                                   max_attempts=run.max_attempts)
            await self.store.enqueue(d)
        except StoreError as exc:
            log.warning("event=rerun_failed run=%s error=%s", run.run_id, exc)
            return 0
        log.info("event=run_requeued run=%s reason=outcome_lost old_dispatch=%s", run.run_id, old)
        await self._event("queued", d, {"reason": "outcome_lost"})
        await self._signal(d)
        return 1

    async def gc(self) -> int:
        """Purge terminal dispatches older than the TTL (reading only what was written before
        the cutoff: GC does not read the history it cannot purge yet)."""
        older_than = self.clock() - self.settings.gc_ttl_ms
        return await self.store.purge_terminal(older_than, written_before=older_than + CLOCK_SKEW_MS)

    async def recover(self) -> None:
        """Startup: reclaim expired leases, re-enqueue runs that lost their dispatch, and wake
        every queued dispatch (one pending signal per dispatch, so this is cheap to repeat)."""
        # a run written a moment ago by a pod still submitting it is not lost: wait a lease
        survey = await self.sweep(lost_grace_ms=self.settings.lease_ms)
        for d in survey.queued:  # what the sweep reclaimed or re-enqueued it has signalled
            await self._signal(d)
        if self.signals is None:
            for thread_id in await self.store.queued_thread_ids():
                await self.try_dispatch_next(thread_id)

    async def recover_lost_dispatches(
        self,
        now: int,
        grace_ms: int,
        open_runs: list[RunRecord] | None = None,
        known: dict[str, RunDispatch] | None = None,
    ) -> int:
        """Runs written without their dispatch (a crash between the two writes): enqueue it.
        `open_runs` and `known` (dispatches found by id) come from a sweep's own pass."""
        count = 0
        if open_runs is None:
            open_runs = await self.store.scan_runs([RunStatus.CREATED, RunStatus.WAITING])
        for run in open_runs:
            if run.dispatch_id is None or run.updated_at > now - grace_ms:
                continue
            if run.status not in (RunStatus.CREATED, RunStatus.WAITING):
                continue
            if run.status == RunStatus.WAITING and not (run.waiting and run.waiting.ticket in run.decisions):
                continue  # still waiting for its decision: nothing to run
            if known is not None and run.dispatch_id in known:
                continue
            if await self.store.load_dispatch(run.dispatch_id) is not None:
                continue
            d = RunDispatch.queued(
                run.dispatch_id, run.thread_id, run.run_id, now, priority=run.priority, max_attempts=run.max_attempts
            )
            try:
                await self.store.enqueue(d)
            except StoreError as exc:
                log.info("event=recover_enqueue_skipped run=%s error=%s", run.run_id, exc)
                continue
            count += 1
            await self._event("queued", d, {"recovered": True})
            await self._signal(d)
        return count


_CHANGED, _UNCHANGED, _FAILED = object(), object(), object()

_OUTCOME_LABELS = {"ok": "completed", "transient": "transient_error", "permanent": "permanent_error"}


async def _unsubscribe(sub: Any) -> None:
    try:
        await sub.unsubscribe()
    except Exception:  # the connection may be gone; the server drops the interest then
        pass


@dataclass
class _Outcome:
    kind: str  # ok | waiting | permanent | transient | cancelled
    value: Any = None


class _Hooks:
    """RunContext → worker: events, suspension (switch to the suspended lease at once)."""

    def __init__(self, manager: WorkerManager, execution: Execution) -> None:
        self.manager = manager
        self.execution = execution

    async def emit(self, kind: str, data: Any) -> None:
        await self.manager._event(kind, self.execution.dispatch, data)

    async def suspended(self, ticket: str, prompt: Any) -> None:
        m, d = self.manager, self.execution.dispatch
        now = m.clock()
        await m._update_run(d, lambda r: _waiting(r, ticket, prompt, now), instance=self.execution.instance)
        m.renew_lease_now(self.execution)  # the suspended lease applies from now on
        await m._event("suspended", d, {"ticket": ticket, "prompt": prompt})

    async def resumed(self, ticket: str) -> None:
        m, d = self.manager, self.execution.dispatch
        now = m.clock()
        await m._update_run(
            d,
            lambda r: msgspec.structs.replace(r, status=RunStatus.RUNNING, waiting=None, updated_at=now),
            instance=self.execution.instance,
        )
        m.renew_lease_now(self.execution)
        await m._event("resumed", d, {"ticket": ticket})


# ---------------------------------------------------------------------- run record changes (pure)


def _started(r: RunRecord, dispatch_id: str, instance: str, now: int) -> RunRecord | None:
    if r.is_done or r.dispatch_id not in (None, dispatch_id):
        return None  # finished, or carried by another dispatch now
    return msgspec.structs.replace(
        r,
        status=RunStatus.RUNNING,
        dispatch_id=dispatch_id,
        dispatch_instance_id=instance,
        attempts=r.attempts + 1,
        waiting=None,
        updated_at=now,
    )


def _waiting(r: RunRecord, ticket: str, prompt: Any, now: int) -> RunRecord | None:
    from .model import WaitingTicket

    return msgspec.structs.replace(
        r, status=RunStatus.WAITING, waiting=WaitingTicket(ticket=ticket, prompt=prompt, since=now), updated_at=now
    )


def _finished(
    r: RunRecord, status: RunStatus, now: int, *, output: Any = None, error: str | None = None, cancelled: bool = False
) -> RunRecord | None:
    if r.is_done:
        return None
    if cancelled:
        termination = Termination(TerminationKind.CANCELLED, error)
    elif error is not None:
        termination = Termination(TerminationKind.ERROR, error)
    else:
        termination = Termination(TerminationKind.NATURAL_END)
    return msgspec.structs.replace(
        r,
        status=status,
        output=output,
        error=error,
        termination=termination,
        waiting=None,
        updated_at=now,
        finished_at=now,
    )
