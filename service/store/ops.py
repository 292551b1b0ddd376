"""The store's decisions, as pure functions of one thread's state.

Every store method that changes a thread reads a `ThreadState`, calls one function here, and
commits the returned `Change` (the memory store applies it; the NATS store publishes it
guarded by the thread's revision, and retries the whole read-decide-commit on a conflict).
Both stores therefore share one implementation of the contract's rules, and these
functions are unit-tested without any I/O.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

import msgspec

from ..model import (
    CLAIMED_LEASE_EXPIRED_AFTER_INTERRUPT,
    CLAIMED_SUPERSEDED_BEFORE_DEAD_LETTER,
    CLAIMED_SUPERSEDED_BEFORE_NACK,
    CLAIMED_SUPERSEDED_BEFORE_RESULT,
    CLAIMED_SUPERSEDED_BEFORE_START,
    CLAIMED_SUPERSEDED_BY_EPOCH,
    CLAIMED_SUPERSEDED_DURING_LEASE_RENEWAL,
    QUEUED_SUPERSEDED_BY_EPOCH,
    QUEUED_SUPERSEDED_BY_INTERRUPT,
    AlreadyExistsError,
    DispatchStatus,
    Interrupt,
    NotFoundError,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    StoreError,
    ValidationError,
    VersionConflictError,
    is_stale,
    validate_for_enqueue,
    validate_run,
)

T = TypeVar("T")


class QueueIndex:
    """A thread's queued dispatches in claim order, its claimed ones and the epochs of the
    queued ones: what a claim needs, kept up to date write by write (`apply`), so that a
    claim on a long queue (a hot thread's chain) does not walk and sort the whole thread."""

    __slots__ = ("order", "claimed", "epochs")

    def __init__(self, order: list[tuple[int, int, str]], claimed: set[str], epochs: Counter[int]) -> None:
        self.order = order  # sort keys (priority, created_at, dispatch_id) of the queued ones
        self.claimed = claimed
        self.epochs = epochs

    @classmethod
    def of(cls, dispatches: Mapping[str, RunDispatch]) -> QueueIndex:
        index = cls([], set(), Counter())
        for d in dispatches.values():
            index._add(d)
        index.order.sort()
        return index

    def copy(self) -> QueueIndex:
        return QueueIndex(list(self.order), set(self.claimed), Counter(self.epochs))

    def replace(self, old: RunDispatch | None, new: RunDispatch | None) -> None:
        """`old` (if any) became `new` (None: deleted)."""
        if old is not None:
            if old.status == DispatchStatus.QUEUED:
                key = old.sort_key()
                i = bisect.bisect_left(self.order, key)
                if i < len(self.order) and self.order[i] == key:
                    del self.order[i]
                self.epochs[old.dispatch_epoch] -= 1
                if self.epochs[old.dispatch_epoch] <= 0:
                    del self.epochs[old.dispatch_epoch]
            elif old.status == DispatchStatus.CLAIMED:
                self.claimed.discard(old.dispatch_id)
        if new is not None:
            if new.status == DispatchStatus.QUEUED:
                bisect.insort(self.order, new.sort_key())
                self.epochs[new.dispatch_epoch] += 1
            elif new.status == DispatchStatus.CLAIMED:
                self.claimed.add(new.dispatch_id)

    def _add(self, d: RunDispatch) -> None:
        if d.status == DispatchStatus.QUEUED:
            self.order.append(d.sort_key())
            self.epochs[d.dispatch_epoch] += 1
        elif d.status == DispatchStatus.CLAIMED:
            self.claimed.add(d.dispatch_id)


class ThreadState(msgspec.Struct):
    """A thread's queue state: its epoch and its dispatches. (Runs are stored beside the
    thread, one key each: no queue decision reads them, so claims need not read them.)
    `index`, when a store keeps one (the NATS store's cache of its own commits), lets a
    claim read the queue in order; without it a claim walks the thread."""

    thread_id: str
    epoch: int = 0
    dispatches: dict[str, RunDispatch] = {}
    index: QueueIndex | None = None

    def claimed(self) -> list[RunDispatch]:
        held = [d for d in self.dispatches.values() if d.status == DispatchStatus.CLAIMED]
        if len(held) > 1:  # one at most, but for a store written by hand or by an older version
            held.sort(key=RunDispatch.sort_key)
        return held

    def is_empty(self) -> bool:
        return not self.dispatches


# One write of a Change. Writes are applied in order; see Change.atomic.
class PutDispatch(msgspec.Struct, frozen=True):
    record: RunDispatch


class PutEpoch(msgspec.Struct, frozen=True):
    epoch: int


class DeleteDispatch(msgspec.Struct, frozen=True):
    dispatch_id: str


class DeleteEpoch(msgspec.Struct, frozen=True):
    pass


class ForgetRun(msgspec.Struct, frozen=True):
    """Release a run id that has no record and no dispatch left (only its alias remains)."""

    run_id: str


Write = PutDispatch | PutEpoch | DeleteDispatch | DeleteEpoch | ForgetRun


class Change(msgspec.Struct):
    """Writes to one thread.

    `atomic=False` means every prefix of `writes` is itself a valid state, so a backend may
    commit them one by one (and, after a conflict, re-decide from a fresh read).
    `atomic=True` means all or nothing (interrupt: epoch bump plus supersedes).
    """

    writes: list[Write] = []
    atomic: bool = False

    def __bool__(self) -> bool:
        return bool(self.writes)


class Outcome(msgspec.Struct, Generic[T]):
    """The decision: what to write, what to return, and an error to raise *after* the
    write (a stale claim is superseded durably and the call still fails)."""

    change: Change
    result: T
    error: StoreError | None = None


def apply(state: ThreadState, change: Change) -> ThreadState:
    """The state after `change` (used by the memory store and by tests)."""
    dispatches = dict(state.dispatches)
    epoch = state.epoch
    index = state.index.copy() if state.index is not None else None
    for w in change.writes:
        match w:
            case PutDispatch(record=d):
                old = dispatches.get(d.dispatch_id)
                dispatches[d.dispatch_id] = d
                if index is not None:
                    index.replace(old, d)
            case PutEpoch(epoch=e):
                epoch = e
            case DeleteDispatch(dispatch_id=i):
                old = dispatches.pop(i, None)
                if index is not None:
                    index.replace(old, None)
            case DeleteEpoch():
                epoch = 0
            case ForgetRun():
                pass
    return ThreadState(thread_id=state.thread_id, epoch=epoch, dispatches=dispatches, index=index)


def _puts(*records: RunDispatch) -> Change:
    return Change([PutDispatch(d) for d in records])


_NOTHING = Change()


# --------------------------------------------------------------------------- enqueue


def enqueue(state: ThreadState, d: RunDispatch) -> Outcome[None]:
    validate_for_enqueue(d)
    if d.dispatch_id in state.dispatches:
        raise AlreadyExistsError(f"dispatch '{d.dispatch_id}' already exists", id=d.dispatch_id)
    if d.dedupe_key is not None:
        for other in state.dispatches.values():
            if other.dedupe_key == d.dedupe_key and not other.is_terminal:
                raise AlreadyExistsError(f"dedupe_key={d.dedupe_key}", id=other.dispatch_id)
    return Outcome(_puts(d.prepare_for_enqueue(state.epoch)), None)


# --------------------------------------------------------------------------- runs
# A run is one key, changed by compare-and-set on that key; these decide the new record.


class RunChange(msgspec.Struct, Generic[T]):
    """What to do with a run key: write `record`, delete it (`delete`), or nothing."""

    result: T
    record: RunRecord | None = None
    delete: bool = False


def create_run(existing: RunRecord | None, run: RunRecord) -> RunChange[None]:
    """Write a new run. The same record already there is our own earlier write (a retry):
    nothing to do; a different one is a conflict."""
    validate_run(run)
    if existing is None:
        return RunChange(None, record=run)
    if existing != run:
        raise AlreadyExistsError(f"run '{run.run_id}' already exists", id=run.run_id)
    return RunChange(None)


def update_run(
    existing: RunRecord | None, run_id: str, change: Callable[[RunRecord], RunRecord | None]
) -> RunChange[RunRecord]:
    if existing is None:
        raise NotFoundError(f"run '{run_id}' not found", id=run_id)
    new = change(existing)
    if new is None or new == existing:
        return RunChange(existing)
    if new.run_id != existing.run_id or new.thread_id != existing.thread_id:
        raise ValidationError("a run's id and thread never change", id=run_id)
    validate_run(new)
    return RunChange(new, record=new)


def purge_run(existing: RunRecord | None, older_than: int, referenced: set[str]) -> RunChange[bool]:
    """Delete a finished run that no dispatch refers to any more."""
    if existing is None or not existing.is_done or existing.updated_at >= older_than:
        return RunChange(False)
    if existing.run_id in referenced:
        return RunChange(False)
    return RunChange(True, delete=True)


# --------------------------------------------------------------------------- claim


def claim(
    state: ThreadState, consumer_id: str, token: str, lease_ms: int, now: int, limit: int, start: str | None = None
) -> Outcome[list[RunDispatch]]:
    """`start`, if given, also records the attempt's start (as `record_dispatch_start` with
    that instance id) in the same write: for a worker about to run what it claims."""
    index = state.index
    if index is not None and not any(epoch < state.epoch for epoch in index.epochs):
        held, stale, take = _queue_in_order(state, index, now, limit)
    else:
        held, stale, take = _queue_by_walking(state, now, limit)
    mine = sorted((d for d in held if d.claim_token == token), key=RunDispatch.sort_key)
    if mine:  # our own commit landed though its reply was lost: same answer again
        return Outcome(_NOTHING, mine)
    superseded = [d.mark_superseded_at_epoch(now, state.epoch, QUEUED_SUPERSEDED_BY_EPOCH) for d in stale]
    if limit <= 0 or held:
        return Outcome(_puts(*superseded), [])
    claimed = [d.claim(consumer_id, token, now + lease_ms, now) for d in take()]
    if start is not None:
        claimed = [d.record_dispatch_start(start, now) for d in claimed]
    change = _puts(*superseded, *claimed)
    # several claims at once must land together; supersedes before a single claim need not
    change.atomic = len(claimed) > 1
    return Outcome(change, claimed)


_Queue = tuple[list[RunDispatch], list[RunDispatch], Callable[[], list[RunDispatch]]]


def _queue_in_order(state: ThreadState, index: QueueIndex, now: int, limit: int) -> _Queue:
    """(claimed, stale queued, the first `limit` available queued) of an indexed thread with
    no stale queued dispatch: the queue is read from its head."""

    def take() -> list[RunDispatch]:
        eligible: list[RunDispatch] = []
        for _, _, dispatch_id in index.order:
            d = state.dispatches[dispatch_id]
            if d.available_at <= now:
                eligible.append(d)
                if len(eligible) == limit:
                    break
        return eligible

    return [state.dispatches[i] for i in index.claimed], [], take


def _queue_by_walking(state: ThreadState, now: int, limit: int) -> _Queue:
    """The same, in one pass over the thread (a hot thread holds thousands of queued
    dispatches: no second scan, and no sort for the service's `limit = 1`)."""
    held: list[RunDispatch] = []
    stale: list[RunDispatch] = []
    ready: list[RunDispatch] = []
    for d in state.dispatches.values():
        if d.status == DispatchStatus.QUEUED:
            if is_stale(d, state.epoch):
                stale.append(d)
            elif d.available_at <= now:
                ready.append(d)
        elif d.status == DispatchStatus.CLAIMED:
            held.append(d)

    def take() -> list[RunDispatch]:
        if limit == 1:
            return [min(ready, key=RunDispatch.sort_key)] if ready else []
        return sorted(ready, key=RunDispatch.sort_key)[:limit]

    return held, stale, take


def claim_dispatch(
    state: ThreadState, dispatch_id: str, consumer_id: str, token: str, lease_ms: int, now: int
) -> Outcome[RunDispatch | None]:
    d = state.dispatches.get(dispatch_id)
    if d is not None and d.status == DispatchStatus.CLAIMED and d.claim_token == token:
        return Outcome(_NOTHING, d)  # our own commit, reply lost
    if d is None or d.status != DispatchStatus.QUEUED:
        return Outcome(_NOTHING, None)
    if is_stale(d, state.epoch):
        return Outcome(_puts(d.mark_superseded_at_epoch(now, state.epoch, QUEUED_SUPERSEDED_BY_EPOCH)), None)
    if state.claimed():
        return Outcome(_NOTHING, None)
    claimed = d.claim(consumer_id, token, now + lease_ms, now)
    return Outcome(_puts(claimed), claimed)


# --------------------------------------------------------------------------- token-checked


def _owned(state: ThreadState, dispatch_id: str, token: str) -> RunDispatch:
    d = state.dispatches.get(dispatch_id)
    if d is None:
        raise NotFoundError(f"dispatch '{dispatch_id}' not found", id=dispatch_id)
    if d.status != DispatchStatus.CLAIMED or d.claim_token != token:
        raise VersionConflictError(
            f"dispatch '{dispatch_id}' is not claimed with this token", expected=0, actual=1, id=dispatch_id
        )
    return d


def _stale_outcome(state: ThreadState, d: RunDispatch, now: int, reason: str) -> Outcome[None]:
    return Outcome(
        _puts(d.mark_superseded_at_epoch(now, state.epoch, reason)),
        None,
        VersionConflictError(
            f"dispatch '{d.dispatch_id}' is stale (epoch {d.dispatch_epoch} < {state.epoch}); superseded",
            expected=d.dispatch_epoch,
            actual=state.epoch,
            id=d.dispatch_id,
        ),
    )


def _token_op(
    state: ThreadState,
    dispatch_id: str,
    token: str,
    now: int,
    stale_reason: str,
    transition: Callable[[RunDispatch], RunDispatch],
) -> Outcome[None]:
    d = _owned(state, dispatch_id, token)
    if is_stale(d, state.epoch):
        return _stale_outcome(state, d, now, stale_reason)
    return Outcome(_puts(transition(d)), None)


def ack(state: ThreadState, dispatch_id: str, claim_token: str, now: int) -> Outcome[None]:
    return _token_op(state, dispatch_id, claim_token, now, CLAIMED_SUPERSEDED_BY_EPOCH, lambda d: d.mark_acked(now))


def record_dispatch_start(
    state: ThreadState, dispatch_id: str, claim_token: str, dispatch_instance_id: str, now: int
) -> Outcome[None]:
    return _token_op(
        state,
        dispatch_id,
        claim_token,
        now,
        CLAIMED_SUPERSEDED_BEFORE_START,
        lambda d: d.record_dispatch_start(dispatch_instance_id, now),
    )


def record_run_result(
    state: ThreadState, dispatch_id: str, claim_token: str, result: RunDispatchResult, now: int
) -> Outcome[None]:
    return _token_op(
        state,
        dispatch_id,
        claim_token,
        now,
        CLAIMED_SUPERSEDED_BEFORE_RESULT,
        lambda d: d.record_run_result(result, now),
    )


def complete(
    state: ThreadState, dispatch_id: str, claim_token: str, result: RunDispatchResult, now: int
) -> Outcome[None]:
    """record_run_result and ack in one write (the worker's hot path)."""
    return _token_op(
        state,
        dispatch_id,
        claim_token,
        now,
        CLAIMED_SUPERSEDED_BY_EPOCH,
        lambda d: d.record_run_result(result, now).mark_acked(now),
    )


def nack(
    state: ThreadState, dispatch_id: str, claim_token: str, retry_at: int, error: str, now: int
) -> Outcome[None]:
    return _token_op(
        state,
        dispatch_id,
        claim_token,
        now,
        CLAIMED_SUPERSEDED_BEFORE_NACK,
        lambda d: d.mark_nack_result(now, retry_at, error),
    )


def dead_letter(state: ThreadState, dispatch_id: str, claim_token: str, error: str, now: int) -> Outcome[None]:
    return _token_op(
        state,
        dispatch_id,
        claim_token,
        now,
        CLAIMED_SUPERSEDED_BEFORE_DEAD_LETTER,
        lambda d: d.mark_dead_letter(now, error),
    )


def extend_lease(state: ThreadState, dispatch_id: str, claim_token: str, extension_ms: int, now: int) -> Outcome[bool]:
    d = state.dispatches.get(dispatch_id)
    if d is None or d.status != DispatchStatus.CLAIMED or d.claim_token != claim_token:
        return Outcome(_NOTHING, False)
    if is_stale(d, state.epoch):
        return Outcome(
            _puts(d.mark_superseded_at_epoch(now, state.epoch, CLAIMED_SUPERSEDED_DURING_LEASE_RENEWAL)), False
        )
    return Outcome(_puts(d.extend_lease(now + extension_ms, now)), True)


def supersede_claimed(
    state: ThreadState, dispatch_id: str, claim_token: str, now: int, reason: str
) -> Outcome[RunDispatch | None]:
    d = state.dispatches.get(dispatch_id)
    if d is None or d.status != DispatchStatus.CLAIMED:
        return Outcome(_NOTHING, None)
    if d.claim_token != claim_token:
        raise VersionConflictError(
            f"dispatch '{dispatch_id}' is not claimed with this token", expected=0, actual=1, id=dispatch_id
        )
    new = d.mark_superseded_at_epoch(now, max(d.dispatch_epoch, state.epoch), reason)
    return Outcome(_puts(new), new)


# --------------------------------------------------------------------------- untokened


def cancel(state: ThreadState, dispatch_id: str, now: int) -> Outcome[RunDispatch | None]:
    d = state.dispatches.get(dispatch_id)
    if d is None or d.status != DispatchStatus.QUEUED:
        return Outcome(_NOTHING, None)
    new = d.mark_cancelled(now)
    return Outcome(_puts(new), new)


def interrupt(state: ThreadState, now: int) -> Outcome[Interrupt]:
    old = state.epoch
    superseded = [
        d.mark_superseded(now, QUEUED_SUPERSEDED_BY_INTERRUPT)
        for d in sorted(state.dispatches.values(), key=RunDispatch.sort_key)
        if d.status == DispatchStatus.QUEUED and d.dispatch_epoch <= old
    ]
    claimed = state.claimed()
    # the epoch goes first: a backend that must split a huge interrupt into several batches
    # commits the bump in the first one, after which the rest can no longer start
    change = Change([PutEpoch(old + 1), *(PutDispatch(d) for d in superseded)], atomic=True)
    return Outcome(change, Interrupt(old + 1, claimed[0] if claimed else None, superseded))


def reclaim_expired(state: ThreadState, dispatch_id: str, now: int) -> Outcome[RunDispatch | None]:
    """Reclaim one expired lease; returns the requeued or dead-lettered record, or None."""
    d = state.dispatches.get(dispatch_id)
    if d is None or d.status != DispatchStatus.CLAIMED or d.lease_until is None or not d.lease_until < now:
        return Outcome(_NOTHING, None)
    if is_stale(d, state.epoch):
        return Outcome(_puts(d.mark_superseded_at_epoch(now, state.epoch, CLAIMED_LEASE_EXPIRED_AFTER_INTERRUPT)), None)
    new = d.mark_expired_lease(now)
    return Outcome(_puts(new), new)


def purge_terminal(state: ThreadState, older_than: int, recorded_runs: set[str]) -> Outcome[int]:
    """Delete terminal dispatches with `updated_at < older_than`, and the epoch of a thread
    left without dispatches (its epoch then restarts at 0, which is safe: no dispatch of an
    older epoch is left). Run ids used only by the purged dispatches and with no run record
    (`recorded_runs` are those that have one) are released."""
    doomed = [d.dispatch_id for d in state.dispatches.values() if d.is_terminal and d.updated_at < older_than]
    if not doomed:
        return Outcome(_NOTHING, 0)
    left = {i: d for i, d in state.dispatches.items() if i not in set(doomed)}
    referenced = {d.run_id for d in left.values()}
    writes: list[Write] = [DeleteDispatch(i) for i in doomed]
    if not left and state.epoch:
        writes.append(DeleteEpoch())
    writes += [
        ForgetRun(i)
        for i in sorted({state.dispatches[d].run_id for d in doomed})
        if i not in referenced and i not in recorded_runs
    ]
    return Outcome(Change(writes), len(doomed))
