"""The store contract, implemented once over a small set of backend primitives.

A backend (memory, NATS) supplies a few primitives: a read-decide-commit on one thread's
queue state (`_thread_op`) and on one run record (`_run_op`), reads of both, binding and
resolving ids to their thread (`_bind`, `_thread_of`), and one-pass scans. Everything the
contract says is decided by the pure functions of `ops`, so both backends behave alike by
construction and the conformance suite checks the I/O.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Collection
from typing import Literal, TypeVar

import msgspec

from ..model import (
    TERMINAL_STATUSES,
    AlreadyExistsError,
    DispatchStatus,
    Interrupt,
    NotFoundError,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    StoreError,
    StoreUnavailableError,
    ValidationError,
    check_dispatch_id_for_run,
    run_of_first_dispatch,
    validate_for_enqueue,
    validate_id,
    validate_run,
)
from . import ops
from .ops import Outcome, RunChange, ThreadState

T = TypeVar("T")

AliasKind = Literal["dispatch", "run"]

CLOCK_SKEW_MS = 60_000
"""How far a pod's clock (which stamps `updated_at`) may be from the server's (which stamps
messages) before GC purges a record a pass later than it could (never sooner)."""

DEFAULT_MAX_RECORD_BYTES = 512 * 1024
"""Largest stored record (encoded JSON). A run's input counts against it."""

_encoder = msgspec.json.Encoder()


def encode_record(record: RunDispatch | RunRecord, limit: int) -> bytes:
    """The stored bytes of a record, or ValidationError when it is over the size limit."""
    data = _encoder.encode(record)
    if len(data) > limit:
        rid = record.dispatch_id if isinstance(record, RunDispatch) else record.run_id
        raise ValidationError(
            f"record is {len(data)} bytes, over the {limit}-byte limit", field="payload", id=rid
        )
    return data




def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 0:
            raise ValidationError(f"{name} must be a non-negative integer", field=name)


class ThreadStore(ABC):
    """All store methods (spec/dispatch-contract.md §5), all async, `now` in ms."""

    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    _rng: random.Random | None = None

    def new_token(self) -> str:
        """A fresh claim token (unique; not a secret: the thread guard, not the token, protects
        a claim)."""
        if self._rng is None:
            self._rng = random.Random()
        return f"{self._rng.getrandbits(128):032x}"

    # ------------------------------------------------------------------ primitives

    @abstractmethod
    async def _thread_op(
        self,
        thread_id: str,
        decide: Callable[[ThreadState], Outcome[T]],
        *,
        full: bool = False,
        trust_own_commit: bool = False,
    ) -> T:
        """Read the thread, decide, commit the change atomically with respect to every other
        change of the thread (re-deciding after a conflict), then raise `outcome.error` if set.
        `full`: the decision needs the thread's terminal dispatches too (a backend may otherwise
        decide on its live dispatches alone). `trust_own_commit`: a decision that writes
        nothing may rest on the state this store's own last commit on the thread produced."""

    @abstractmethod
    async def _read_thread(self, thread_id: str) -> ThreadState: ...

    @abstractmethod
    async def _bind(self, kind: AliasKind, id: str, thread_id: str) -> tuple[str, bool]:
        """Bind `id` to `thread_id` unless already bound; returns the thread it is bound to,
        and whether this call created the binding (a new id, never seen before)."""

    @abstractmethod
    async def _thread_of(self, kind: AliasKind, id: str) -> str | None: ...

    def _remember_alias(self, kind: AliasKind, id: str, thread_id: str) -> None:
        """`id` is known to belong to `thread_id` (a backend that caches `_thread_of` keeps it)."""

    @abstractmethod
    def _iter_dispatches(self, written_before: int | None = None) -> AsyncIterator[RunDispatch]:
        """Every dispatch of every thread, streamed page by page (never the whole bucket in
        memory at once). Only maintenance and global views use it. `written_before` (ms):
        the caller needs only records last written before then, and a backend that reads in
        write order may stop at the first later one."""

    @abstractmethod
    async def _run_op(
        self, thread_id: str, run_id: str, decide: Callable[[RunRecord | None], RunChange[T]], creating: bool = False
    ) -> T:
        """Read a run, decide, and commit by compare-and-set on the run's key (re-deciding
        after a conflict). A deleted run also releases its id. `creating` hints that the run
        is most likely new (a backend may then skip the read)."""

    @abstractmethod
    async def _read_run(self, thread_id: str, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    async def _thread_runs(self, thread_id: str) -> list[RunRecord]: ...

    @abstractmethod
    def _iter_runs(self, written_before: int | None = None) -> AsyncIterator[RunRecord]:
        """Every run record, streamed like `_iter_dispatches`."""

    async def close(self) -> None:
        """Release the backend's resources."""

    # ------------------------------------------------------------------ write path

    async def enqueue(self, dispatch: RunDispatch) -> None:
        """Persist a new Queued dispatch (durable before returning)."""
        validate_for_enqueue(dispatch)
        encode_record(dispatch, self.max_record_bytes)
        new_id = await self._bind_for(dispatch)
        # an id bound before may already name a (terminal) dispatch: decide on the full thread
        await self._thread_op(dispatch.thread_id, lambda s: ops.enqueue(s, dispatch), full=not new_id)

    async def _bind_for(self, dispatch: RunDispatch) -> bool:
        """Bind the dispatch's and its run's ids; True if the dispatch id is new."""
        check_dispatch_id_for_run(dispatch.dispatch_id, dispatch.run_id)
        first = run_of_first_dispatch(dispatch.dispatch_id) is not None
        created = False
        if not first:  # a run's first dispatch is found through the run's alias
            bound, created = await self._bind("dispatch", dispatch.dispatch_id, dispatch.thread_id)
            if bound != dispatch.thread_id:
                raise AlreadyExistsError(f"dispatch '{dispatch.dispatch_id}' already exists", id=dispatch.dispatch_id)
        bound, run_created = await self._bind("run", dispatch.run_id, dispatch.thread_id)
        if bound != dispatch.thread_id:
            raise ValidationError(
                f"run_id '{dispatch.run_id}' belongs to thread '{bound}', not '{dispatch.thread_id}'",
                field="run_id",
                id=dispatch.run_id,
            )
        return run_created if first else created

    async def _dispatch_thread(self, dispatch_id: str) -> str | None:
        """The thread a dispatch id belongs to, or None if the id is unknown."""
        run_id = run_of_first_dispatch(dispatch_id)
        if run_id is not None:
            thread_id = await self._thread_of("run", run_id)
            if thread_id is not None:
                return thread_id
            # no such run: an id stored with an alias of its own before "#1" was reserved
        return await self._thread_of("dispatch", dispatch_id)

    async def claim(
        self,
        thread_id: str,
        consumer_id: str,
        lease_ms: int,
        now: int,
        limit: int = 1,
        *,
        start: str | None = None,
        after_own_commit: bool = False,
    ) -> list[RunDispatch]:
        """Claim up to `limit` eligible dispatches of the thread, unless one is already claimed.
        With `start` (an instance id), the claim also records the attempt's start, in one write.
        `after_own_commit`: the caller's last change to the thread (through this store) is all
        it needs to have seen; "nothing to claim" is then answered without re-reading, because
        work enqueued since wakes a pod by its own signal (the worker's chain after an ack)."""
        validate_id(thread_id, "thread_id")
        validate_id(consumer_id, "consumer_id")
        _check_non_negative(lease_ms=lease_ms, now=now, limit=limit)
        token = self.new_token()
        claimed = await self._thread_op(
            thread_id,
            lambda s: ops.claim(s, consumer_id, token, lease_ms, now, limit, start),
            trust_own_commit=after_own_commit,
        )
        # read from their thread (and a run is bound to its thread before its dispatch is
        # written): the claimer's lease, settle and run writes need not look either id up,
        # though most runs are claimed by a pod other than the one that took their submit
        for d in claimed:
            if run_of_first_dispatch(d.dispatch_id) is None:
                self._remember_alias("dispatch", d.dispatch_id, thread_id)
            self._remember_alias("run", d.run_id, thread_id)
        return claimed

    async def claim_dispatch(self, dispatch_id: str, consumer_id: str, lease_ms: int, now: int) -> RunDispatch | None:
        """Claim one known Queued dispatch, ignoring `available_at`."""
        validate_id(consumer_id, "consumer_id")
        _check_non_negative(lease_ms=lease_ms, now=now)
        token = self.new_token()
        return await self._on_dispatch(
            dispatch_id, None, lambda s: ops.claim_dispatch(s, dispatch_id, consumer_id, token, lease_ms, now)
        )

    async def ack(self, dispatch_id: str, claim_token: str, now: int) -> None:
        await self._on_owned(dispatch_id, lambda s: ops.ack(s, dispatch_id, claim_token, now))

    async def record_dispatch_start(
        self, dispatch_id: str, claim_token: str, dispatch_instance_id: str, now: int
    ) -> None:
        await self._on_owned(
            dispatch_id, lambda s: ops.record_dispatch_start(s, dispatch_id, claim_token, dispatch_instance_id, now)
        )

    async def record_run_result(
        self, dispatch_id: str, claim_token: str, result: RunDispatchResult, now: int
    ) -> None:
        await self._on_owned(dispatch_id, lambda s: ops.record_run_result(s, dispatch_id, claim_token, result, now))

    async def complete(self, dispatch_id: str, claim_token: str, result: RunDispatchResult, now: int) -> None:
        """`record_run_result` then `ack`, as one write."""
        await self._on_owned(dispatch_id, lambda s: ops.complete(s, dispatch_id, claim_token, result, now))

    async def nack(self, dispatch_id: str, claim_token: str, retry_at: int, error: str, now: int) -> None:
        _check_non_negative(retry_at=retry_at, now=now)
        await self._on_owned(dispatch_id, lambda s: ops.nack(s, dispatch_id, claim_token, retry_at, error, now))

    async def dead_letter(self, dispatch_id: str, claim_token: str, error: str, now: int) -> None:
        await self._on_owned(dispatch_id, lambda s: ops.dead_letter(s, dispatch_id, claim_token, error, now))

    async def cancel(self, dispatch_id: str, now: int) -> RunDispatch | None:
        """Cancel a Queued dispatch; None when unknown or not Queued."""
        return await self._on_dispatch(dispatch_id, None, lambda s: ops.cancel(s, dispatch_id, now))

    async def extend_lease(self, dispatch_id: str, claim_token: str, extension_ms: int, now: int) -> bool:
        """Heartbeat: `lease_until = now + extension_ms`; False when the claim is lost."""
        _check_non_negative(extension_ms=extension_ms, now=now)
        return await self._on_dispatch(
            dispatch_id, False, lambda s: ops.extend_lease(s, dispatch_id, claim_token, extension_ms, now)
        )

    async def interrupt(self, thread_id: str, now: int) -> Interrupt:
        """Bump the thread's epoch and supersede its queued dispatches, in one atomic step."""
        validate_id(thread_id, "thread_id")
        return await self._thread_op(thread_id, lambda s: ops.interrupt(s, now))

    async def supersede_claimed(
        self, dispatch_id: str, claim_token: str, now: int, reason: str
    ) -> RunDispatch | None:
        return await self._on_dispatch(
            dispatch_id, None, lambda s: ops.supersede_claimed(s, dispatch_id, claim_token, now, reason)
        )

    async def _on_dispatch(self, dispatch_id: str, missing: T, decide: Callable[[ThreadState], Outcome[T]]) -> T:
        thread_id = await self._dispatch_thread(dispatch_id)
        if thread_id is None:
            return missing
        return await self._thread_op(thread_id, decide)

    async def _on_owned(self, dispatch_id: str, decide: Callable[[ThreadState], Outcome[None]]) -> None:
        thread_id = await self._dispatch_thread(dispatch_id)
        if thread_id is None:
            raise NotFoundError(f"dispatch '{dispatch_id}' not found", id=dispatch_id)
        await self._thread_op(thread_id, decide)

    # ------------------------------------------------------------------ read path

    async def current_dispatch_epoch(self, thread_id: str) -> int:
        return (await self._read_thread(thread_id)).epoch

    async def load_dispatch(self, dispatch_id: str) -> RunDispatch | None:
        thread_id = await self._dispatch_thread(dispatch_id)
        if thread_id is None:
            return None
        return (await self._read_thread(thread_id)).dispatches.get(dispatch_id)

    async def list_dispatches(
        self,
        thread_id: str,
        status_filter: list[DispatchStatus] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[RunDispatch]:
        """The thread's dispatches in claim order, optionally filtered by status, paginated."""
        if status_filter is not None and not status_filter:
            return []
        state = await self._read_thread(thread_id)
        wanted = set(status_filter) if status_filter is not None else None
        rows = sorted(
            (d for d in state.dispatches.values() if wanted is None or d.status in wanted), key=RunDispatch.sort_key
        )
        return _page(rows, limit, offset)

    async def read_thread(self, thread_id: str) -> ThreadState:
        """Everything stored under a thread, read in one go."""
        return await self._read_thread(thread_id)

    # ------------------------------------------------------------------ global views

    async def survey(
        self, now: int | None = None, want: Collection[str] = (), expired_limit: int | None = None
    ) -> Survey:
        """One streamed pass over every dispatch, keeping only what maintenance needs: the
        counts, the queued dispatches, claims expired at `now` (up to `expired_limit`) and the
        dispatches named in `want`. Memory stays bounded by the live work, not the history."""
        survey = Survey(counts={s: 0 for s in DispatchStatus})
        wanted = set(want)
        async for d in self._iter_dispatches():
            survey.add(d, now, wanted, expired_limit)
        return survey

    async def sweep_view(self, now: int, expired_limit: int) -> tuple[list[RunRecord], Survey]:
        """What a maintenance sweep reads: the runs still open, and a survey that wants their
        dispatches. A backend may keep this view up to date incrementally between sweeps."""
        open_runs = await self.scan_runs([RunStatus.CREATED, RunStatus.RUNNING, RunStatus.WAITING])
        survey = await self.survey(now, want={r.dispatch_id for r in open_runs if r.dispatch_id}, expired_limit=expired_limit)
        return open_runs, survey

    async def count_dispatches_by_status(self, status: DispatchStatus) -> int:
        return (await self.survey()).counts[status]

    async def count_all_by_status(self) -> dict[DispatchStatus, int]:
        """Every status's count from one pass (metrics, stats)."""
        return (await self.survey()).counts

    async def list_terminal_dispatches(
        self, limit: int | None = None, offset: int = 0, statuses: Collection[DispatchStatus] | None = None
    ) -> list[RunDispatch]:
        """Terminal dispatches (of `statuses`, if given) on every thread, oldest first."""
        wanted = TERMINAL_STATUSES if statuses is None else set(statuses) & TERMINAL_STATUSES
        rows = sorted(
            [d async for d in self._iter_dispatches() if d.status in wanted],
            key=lambda d: (d.updated_at, d.created_at, d.dispatch_id),
        )
        return _page(rows, limit, offset)

    async def queued_thread_ids(self) -> list[str]:
        return sorted({d.thread_id for d in (await self.survey()).queued})

    async def list_queued(self, available_before: int | None = None) -> list[RunDispatch]:
        """Queued dispatches on every thread (available at `available_before`, if given)."""
        return [
            d for d in (await self.survey()).queued if available_before is None or d.available_at <= available_before
        ]

    @abstractmethod
    async def try_lead(self, name: str, holder: str, ttl_ms: int, now: int) -> bool:
        """Take or keep the lease `name` for `holder` (one pod at a time runs maintenance)."""

    async def reclaim_expired_leases(
        self, now: int, limit: int, candidates: list[RunDispatch] | None = None
    ) -> list[RunDispatch]:
        """Requeue (or dead-letter) claimed dispatches whose `lease_until < now`; stale ones are
        superseded and not returned. Each candidate is re-decided on a fresh read, so
        concurrent sweeps reclaim each dispatch once (and stale `candidates`, from an earlier
        `survey`, are harmless)."""
        _check_non_negative(now=now, limit=limit)
        if candidates is None:
            candidates = (await self.survey(now, expired_limit=limit)).expired
        reclaimed: list[RunDispatch] = []
        for d in candidates[:limit]:
            result = await self._thread_op(
                d.thread_id, lambda s, i=d.dispatch_id: ops.reclaim_expired(s, i, now)
            )
            if result is not None:
                reclaimed.append(result)
        return reclaimed

    async def purge_terminal(self, older_than: int, written_before: int | None = None) -> int:
        """Delete terminal dispatches with `updated_at < older_than`, then finished runs that
        no dispatch refers to any more, and the epoch of a thread left without dispatches;
        returns the number of dispatches deleted. Streams the bucket; holds only candidates.
        `written_before` (the store's clock, ms): records written since then are too new to
        purge, so a backend that reads in write order stops there and never reads the
        history GC cannot purge yet. Give it only when `older_than` comes from a clock close
        to the store's (the worker adds `CLOCK_SKEW_MS`)."""
        threads = {
            d.thread_id
            async for d in self._iter_dispatches(written_before)
            if d.is_terminal and d.updated_at < older_than
        }
        purged = 0
        for thread_id in sorted(threads):
            recorded = {r.run_id for r in await self._thread_runs(thread_id)}
            purged += await self._thread_op(
                thread_id, lambda s: ops.purge_terminal(s, older_than, recorded), full=True
            )
        finished: dict[str, list[str]] = {}
        async for r in self._iter_runs(written_before):
            if r.is_done and r.updated_at < older_than:
                finished.setdefault(r.thread_id, []).append(r.run_id)
        for thread_id, run_ids in finished.items():
            referenced = {d.run_id for d in (await self._read_thread(thread_id)).dispatches.values()}
            for run_id in run_ids:
                await self._run_op(thread_id, run_id, lambda x: ops.purge_run(x, older_than, referenced))
        await self._purge_orphan_aliases(older_than)
        return purged

    async def _purge_orphan_aliases(self, older_than: int) -> int:
        """Drop aliases (id → thread) written before `older_than` whose record is gone or never
        came; returns how many. A backend without separate alias keys has nothing to do."""
        return 0

    async def _alias_in_use(self, kind: AliasKind, id: str, thread_id: str) -> bool:
        """Whether a record still holds the id: the dispatch itself, or for a run id its run
        record or any dispatch of it (a dispatch reserves its run id until it is purged)."""
        state = await self._read_thread(thread_id)
        if kind == "dispatch":
            return id in state.dispatches
        return any(d.run_id == id for d in state.dispatches.values()) or (
            await self._read_run(thread_id, id) is not None
        )

    # ------------------------------------------------------------------ runs

    async def create_run(self, run: RunRecord, dispatch: RunDispatch | None = None) -> None:
        """Write a new run record, then its first dispatch (if given). A crash in between
        leaves a `created` run without its dispatch, which recovery re-enqueues."""
        validate_run(run)
        encode_record(run, self.max_record_bytes)
        if dispatch is not None:
            if dispatch.run_id != run.run_id or dispatch.thread_id != run.thread_id:
                raise ValidationError("the dispatch must belong to the run and its thread", id=dispatch.dispatch_id)
            validate_for_enqueue(dispatch)
            encode_record(dispatch, self.max_record_bytes)
            check_dispatch_id_for_run(dispatch.dispatch_id, run.run_id)
        bind_run = self._bind("run", run.run_id, run.thread_id)
        new_dispatch_id = True
        if dispatch is not None and run_of_first_dispatch(dispatch.dispatch_id) is None:
            # both ids are bound at once (two independent keys: no order between them matters)
            (bound_dispatch, new_dispatch_id), (bound, _) = await asyncio.gather(
                self._bind("dispatch", dispatch.dispatch_id, dispatch.thread_id), bind_run
            )
            if bound_dispatch != dispatch.thread_id:
                raise AlreadyExistsError(f"dispatch '{dispatch.dispatch_id}' already exists", id=dispatch.dispatch_id)
        else:  # no dispatch, or the run's first one, whose id is as new as the run's
            bound, new_dispatch_id = await bind_run
        if bound != run.thread_id:
            raise AlreadyExistsError(f"run '{run.run_id}' already exists on another thread", id=run.run_id)
        await self._run_op(run.thread_id, run.run_id, lambda existing: ops.create_run(existing, run), creating=True)
        if dispatch is None:
            return
        try:
            await self._thread_op(dispatch.thread_id, lambda s: ops.enqueue(s, dispatch), full=not new_dispatch_id)
        except StoreUnavailableError:
            raise  # the dispatch may have landed: leave the run; recovery enqueues it if not
        except AlreadyExistsError as exc:
            if exc.id == dispatch.dispatch_id:
                existing = await self.load_dispatch(dispatch.dispatch_id)
                if existing is not None and existing.run_id == run.run_id:
                    return  # our dispatch is there already (recovery enqueued it meanwhile)
            await self._run_op(
                run.thread_id, run.run_id, lambda existing: RunChange(None, delete=existing == run)
            )
            raise
        except StoreError:
            # the dispatch was refused (a dedupe key taken meanwhile, say): a run left behind
            # would be re-enqueued by recovery, so take it back while it is still ours alone
            await self._run_op(
                run.thread_id, run.run_id, lambda existing: RunChange(None, delete=existing == run)
            )
            raise

    async def load_run(self, run_id: str) -> RunRecord | None:
        thread_id = await self._thread_of("run", run_id)
        if thread_id is None:
            return None
        return await self._read_run(thread_id, run_id)

    async def update_run(self, run_id: str, change: Callable[[RunRecord], RunRecord | None]) -> RunRecord:
        """Apply `change` (a pure function; it may run again after a conflict) to a run."""
        thread_id = await self._thread_of("run", run_id)
        if thread_id is None:
            raise NotFoundError(f"run '{run_id}' not found", id=run_id)

        def decide(existing: RunRecord | None) -> RunChange[RunRecord]:
            decision = ops.update_run(existing, run_id, change)
            if decision.record is not None:
                encode_record(decision.record, self.max_record_bytes)
            return decision

        return await self._run_op(thread_id, run_id, decide)

    async def list_runs(
        self,
        thread_id: str,
        status_filter: list[RunStatus] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[RunRecord]:
        """The thread's runs, oldest first."""
        rows = sorted(
            (r for r in await self._thread_runs(thread_id) if status_filter is None or r.status in status_filter),
            key=lambda r: (r.created_at, r.run_id),
        )
        return _page(rows, limit, offset)

    async def scan_runs(self, statuses: list[RunStatus]) -> list[RunRecord]:
        """Runs in these statuses on every thread (recovery, reconciliation)."""
        wanted = set(statuses)
        return [r async for r in self._iter_runs() if r.status in wanted]


class Survey(msgspec.Struct):
    """What one pass over every dispatch found (see `ThreadStore.survey`)."""

    counts: dict[DispatchStatus, int]
    queued: list[RunDispatch] = msgspec.field(default_factory=list)
    expired: list[RunDispatch] = msgspec.field(default_factory=list)
    wanted: dict[str, RunDispatch] = msgspec.field(default_factory=dict)

    def add(self, d: RunDispatch, now: int | None, wanted: Collection[str], expired_limit: int | None) -> None:
        """Count `d`, and keep it if it is queued, an expired claim at `now`, or wanted."""
        self.counts[d.status] += 1
        if d.dispatch_id in wanted:
            self.wanted[d.dispatch_id] = d
        if d.status == DispatchStatus.QUEUED:
            self.queued.append(d)
        elif (
            now is not None
            and d.status == DispatchStatus.CLAIMED
            and d.lease_until is not None
            and d.lease_until < now
            and (expired_limit is None or len(self.expired) < expired_limit)
        ):
            self.expired.append(d)


def _page(rows: list[T], limit: int | None, offset: int) -> list[T]:
    if offset < 0 or (limit is not None and limit < 0):
        raise ValidationError("limit and offset must not be negative", field="limit")
    end = None if limit is None else offset + limit
    return rows[offset:end]
