"""`NatsDispatchStore`: the contract on one JetStream KV bucket (DESIGN.md §2.1).

Layout: `t.H(thread).{epoch | d.H(dispatch)}` (a thread's queue state), `r.H(thread).H(run)`
(run records), and the aliases `id.H(dispatch)` and `run.H(run)` (values: the thread id). A
thread is read in one round trip (a direct batch get with `multi_last` over its subtree); the
highest sequence in it is the thread's revision. Every change is published with
`Nats-Expected-Last-Subject-Sequence` = that revision over the whole subtree, so it lands only
if nothing in the thread changed since the read; multi-key changes that must be
all-or-nothing (interrupt) go out as one atomic batch with the same guard. A run record is
changed by compare-and-set on its own key.

The state and revision our own commit produced are kept (LRU) and reused for the thread's
next change: if anyone else wrote meanwhile, the guard rejects the write and we re-read. A
decision that writes nothing is never taken on that cache: it is re-decided on a fresh read.

A publish whose reply is lost may still have landed: the key is re-read and compared with
what we wrote before anything is retried, and nothing is compensated blindly.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from ..bounded import Bounded
from ..natsclient import connect as connect_client, subscribe_inline
from ..streams import differences
from ..model import DispatchStatus, RunDispatch, RunRecord, RunStatus, StoreError, StoreUnavailableError, run_of_first_dispatch
from . import ops
from . import keys
from .base import DEFAULT_MAX_RECORD_BYTES, AliasKind, Survey, ThreadStore, encode_record
from .ops import (
    Change,
    DeleteDispatch,
    DeleteEpoch,
    ForgetRun,
    Outcome,
    PutDispatch,
    PutEpoch,
    RunChange,
    ThreadState,
    Write,
)

T = TypeVar("T")
log = logging.getLogger("mailbox.store")

WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
"""A guard that failed: 10071 on a single server; a clustered leader may answer 10164 while
another guarded write on the same subject is still in flight. Both mean: re-read, decide again."""
MAX_BATCH = 1000
SCAN_PAGE = 500
"""Keys per page of a scan. A page is held at once, and the sweep that follows busy traffic
reads ~90,000 runs' keys: with pages of 1,000 held as messages and then as entries, that
left the serve process 2-3 MB higher after such a sweep (the soak's last tenths); held as
entries only (converted as they arrive), ~1.7 MB at 1,000 and under 1 MB at 500. Smaller
pages cost round trips: a full sweep of 100,000 records takes 2.3-2.8 s at 1,000, 3.6-3.9 s
at 500 and 5.6 s at 250 (docs/performance.md)."""
MARKER_TTL_S = 900
"""Purge markers expire after 15 min, so deleted keys do not leave markers forever."""

FULL_SWEEP_EVERY_S = 600
"""How often `sweep_view` reads the whole bucket again instead of what changed: it makes the
terminal counts exact again (purges are not subtracted in between)."""
# LRU sizes of what this store remembers of its own commits (bounded memory in a long run):
THREAD_CACHE = 4096  # threads' state and revision after our last change
RUN_CACHE = 4096  # runs' record and revision after our last change (create → start → finish)
ALIAS_CACHE = 8192  # run id (or another dispatch id) → thread: immutable facts, ~one per run

_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    asyncio.TimeoutError,
)


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _StoredMsg(msgspec.Struct):
    subject: str
    seq: int
    data: str | None = None
    hdrs: str | None = None
    time: str = ""


class _MsgGetReply(msgspec.Struct):
    message: _StoredMsg | None = None
    error: _ApiError | None = None


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_pub_ack = msgspec.json.Decoder(_PubAck)
_msg_get = msgspec.json.Decoder(_MsgGetReply)
_dispatch_decoder = msgspec.json.Decoder(RunDispatch)
_run_decoder = msgspec.json.Decoder(RunRecord)


class _DispatchHead(msgspec.Struct):
    """The two fields of a stored dispatch the sweep's incremental read decides on."""

    dispatch_id: str
    status: DispatchStatus = DispatchStatus.QUEUED


class _RunHead(msgspec.Struct):
    """The field of a stored run the sweep's incremental read decides on."""

    status: RunStatus = RunStatus.CREATED


_dispatch_head = msgspec.json.Decoder(_DispatchHead)
_run_head = msgspec.json.Decoder(_RunHead)


class _Conflict(Exception):
    """The guarded write was rejected: the subtree (or key) moved on (to `current`, when the
    server said: a re-read must see at least that much)."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        m = re.search(r"wrong last sequence: (\d+)", description)
        self.current = int(m.group(1)) if m else 0


class _Entry(msgspec.Struct):
    subject: str
    seq: int
    data: bytes
    deleted: bool
    stamp: str = ""  # server time of the message (RFC 3339)

    def written_ms(self) -> int:
        """The server's write time in Unix ms (0 if unknown)."""
        if not self.stamp:
            return 0
        try:
            whole, _, frac = self.stamp.rstrip("Z").partition(".")
            seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
            return int(seconds * 1000) + int((frac + "000")[:3])
        except ValueError:
            return 0


class NatsDispatchStore(ThreadStore):
    """The dispatch store on NATS JetStream KV. Create with `await NatsDispatchStore.connect(...)`."""

    def __init__(
        self,
        nc: NATS,
        *,
        prefix: str,
        owns_connection: bool,
        max_record_bytes: int,
        request_timeout: float,
        unavailable_after: float,
    ) -> None:
        self.nc = nc
        self.prefix = prefix
        self.replicas = 1
        self.bucket = keys.bucket_name(prefix)
        self.stream = keys.stream_of_bucket(self.bucket)
        self.max_record_bytes = min(max_record_bytes, nc.max_payload - 8 * 1024)
        self._owns = owns_connection
        self._timeout = request_timeout
        self._unavailable_after = unavailable_after
        self._kv = f"$KV.{self.bucket}."
        self._direct = f"$JS.API.DIRECT.GET.{self.stream}"
        self._inbox = ""
        self._reply_sub: Any = None
        self._pending: dict[str, tuple[_Batch, asyncio.Future[int]]] = {}
        self._next_token = 0
        self._alias_cache: Bounded[tuple[AliasKind, str], str] = Bounded(ALIAS_CACHE)
        self._threads: Bounded[str, tuple[ThreadState, int]] = Bounded(THREAD_CACHE)  # our last commits
        self._runs: Bounded[str, tuple[RunRecord, int]] = Bounded(RUN_CACHE)
        self._sweep_index: _SweepIndex | None = None
        self._sweep_lock = asyncio.Lock()
        self._locks: dict[str, _ThreadLock] = {}
        self._high_water = 0  # highest stream sequence we committed: reads must not be older
        self.stats = StoreStats()

    @classmethod
    async def connect(
        cls,
        url_or_client: str | NATS,
        *,
        prefix: str = "mailbox",
        replicas: int = 1,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        request_timeout: float = 5.0,
        unavailable_after: float = 15.0,
        **connect_options: Any,
    ) -> NatsDispatchStore:
        """Connect (or reuse a connected client), create or verify the bucket, and return the store."""
        owns = isinstance(url_or_client, str)
        nc = await connect_client(url_or_client, **connect_options) if owns else url_or_client
        store = cls(
            nc,
            prefix=prefix,
            owns_connection=owns,
            max_record_bytes=max_record_bytes,
            request_timeout=request_timeout,
            unavailable_after=unavailable_after,
        )
        store.replicas = replicas
        try:
            await store._ensure_bucket(replicas)
            store._inbox = nc.new_inbox()
            store._reply_sub = await subscribe_inline(nc, store._inbox + ".*", store._on_reply)
        except BaseException:
            if owns:
                await nc.close()
            raise
        return store

    async def close(self) -> None:
        if self._reply_sub is not None:
            try:
                await self._reply_sub.unsubscribe()
            except nats.errors.Error:
                pass
            self._reply_sub = None
        if self._owns and not self.nc.is_closed:
            try:
                await self.nc.close()
            except Exception as exc:  # nats-py can fail to flush while reconnecting; we are leaving anyway
                log.debug("event=close_error error=%r", exc)

    # ------------------------------------------------------------------ bucket

    def _bucket_config(self, replicas: int) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[f"$KV.{self.bucket}.>"],
            retention="limits",
            max_msgs_per_subject=1,
            discard="new",
            storage="file",
            num_replicas=replicas,
            deny_delete=True,
            allow_rollup_hdrs=True,
            allow_direct=True,
            allow_msg_ttl=True,
            allow_atomic=True,
            duplicate_window=120.0,
        )

    async def _ensure_bucket(self, replicas: int) -> None:
        js = self.nc.jetstream(timeout=self._timeout)
        wanted = self._bucket_config(replicas)
        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(wanted)
            return
        have = info.config
        problems = differences(have, wanted, ("max_msgs_per_subject", "allow_direct", "allow_msg_ttl", "allow_rollup_hdrs"))
        if problems:
            raise StoreError(f"bucket stream {self.stream} has an incompatible config: {', '.join(problems)}")
        if not have.allow_atomic:  # older deployments: atomic batches can be switched on in place
            have.allow_atomic = True
            await js.update_stream(have)

    # ------------------------------------------------------------------ primitives

    async def _thread_op(
        self,
        thread_id: str,
        decide: Callable[[ThreadState], Outcome[T]],
        *,
        full: bool = False,
        trust_own_commit: bool = False,
    ) -> T:
        # Changes to one thread from this process queue up here instead of racing each other
        # through the guard (128 concurrent submits to one thread otherwise mostly conflict);
        # other processes still race, and the guard settles those.
        lock = self._locks.get(thread_id)
        if lock is None:
            lock = self._locks[thread_id] = _ThreadLock()
        lock.users += 1
        try:
            async with lock:
                return await self._thread_op_locked(thread_id, decide, full, trust_own_commit)
        finally:
            lock.users -= 1
            if not lock.users:
                del self._locks[thread_id]

    async def _thread_op_locked(
        self, thread_id: str, decide: Callable[[ThreadState], Outcome[T]], full: bool, trust_own_commit: bool
    ) -> T:
        deadline = time.monotonic() + self._unavailable_after
        attempt = 0
        cached = None if full else self._threads.get(thread_id)
        if cached is not None:
            state, rev, verified = _copy_state(cached[0]), cached[1], False
        else:
            state, rev = await self._snapshot(thread_id)
            verified = True
        live_only = cached is not None  # the cache holds live dispatches only; a snapshot all
        while True:
            try:
                outcome: Outcome[T] | None = decide(state)
            except StoreError:
                if verified:
                    raise
                # a refusal is never decided on the cache, which holds live dispatches only
                # (ack of an acked dispatch is a version conflict, not "not found"): read all
                state, rev = await self._snapshot(thread_id)
                verified, live_only = True, False
                continue
            if not verified and not outcome.change and not trust_own_commit:
                # a decision that writes nothing is never taken on the cache alone (unless the
                # caller says our own last commit suffices): a cheap probe of the thread's
                # revision confirms it, else the thread is read
                verified = True
                if await self._revision(thread_id) != rev:
                    state, rev = await self._snapshot(thread_id)
                    live_only = False
                continue
            assert outcome is not None
            if outcome.change:
                try:
                    rev = await self._commit(thread_id, rev, outcome.change)
                except _Conflict as conflict:
                    self.stats.conflicts += 1
                    attempt += 1
                    if time.monotonic() > deadline:
                        self._threads.pop(thread_id, None)
                        raise StoreUnavailableError(
                            f"thread '{thread_id}' kept changing; gave up after {attempt} attempts", id=thread_id
                        ) from None
                    if verified:  # a real race, not a stale cache: spread out the writers
                        await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** min(attempt, 6))))
                    state, rev = await self._snapshot(thread_id, at_least=conflict.current)
                    verified, live_only = True, False
                    continue
                except BaseException:
                    self._threads.pop(thread_id, None)
                    raise
                self._remember_thread(ops.apply(state, outcome.change), rev, outcome.change if live_only else None)
            if outcome.error is not None:
                raise outcome.error
            return outcome.result

    async def _revision(self, thread_id: str) -> int:
        """The thread's revision (the last sequence in its subtree), in one small read."""
        request: dict[str, Any] = {"last_by_subj": f"{self._kv}{keys.thread_prefix(thread_id)}.>"}
        if self._high_water:
            request["min_last_seq"] = self._high_water
        payload = msgspec.json.encode(request)
        deadline = time.monotonic() + self._unavailable_after
        self.stats.probes += 1
        while True:
            try:
                msg = await self.nc.request(self._direct, payload, timeout=self._timeout)
            except _TRANSIENT as exc:
                if time.monotonic() > deadline:
                    raise StoreUnavailableError(f"revision of thread '{thread_id}' unreadable: {exc!r}") from exc
                await asyncio.sleep(0.05)
                continue
            status = _status(msg)
            if status == 404:
                return 0
            if status is None:
                return _entry(msg).seq
            if time.monotonic() > deadline:
                raise StoreUnavailableError(f"revision of thread '{thread_id}' unreadable (status {status})")
            await asyncio.sleep(0.05)

    def _remember_thread(self, state: ThreadState, rev: int, only: ops.Change | None = None) -> None:
        """Cache the thread's live dispatches: what claims, enqueues and interrupts decide on.
        A thread's terminal history stays in the bucket (until GC), not in memory. `only`:
        `state` is a live-only state after this change (and its own copy), so only the
        dispatches it wrote can have ended: a hot thread's chain does not filter its whole
        queue on every step."""
        if only is None:
            live = {i: d for i, d in state.dispatches.items() if not d.is_terminal}
            state = ThreadState(thread_id=state.thread_id, epoch=state.epoch, dispatches=live)
        else:
            for write in only.writes:
                if isinstance(write, ops.PutDispatch) and write.record.is_terminal:
                    state.dispatches.pop(write.record.dispatch_id, None)
        if state.index is None:  # built once per read; commits decided on the cache keep it
            state.index = ops.QueueIndex.of(state.dispatches)
        self._threads.put(state.thread_id, (state, rev))

    async def _read_thread(self, thread_id: str) -> ThreadState:
        return (await self._snapshot(thread_id))[0]

    async def _run_op(
        self, thread_id: str, run_id: str, decide: Callable[[RunRecord | None], RunChange[T]], creating: bool = False
    ) -> T:
        key = keys.run_key(thread_id, run_id)
        deadline = time.monotonic() + self._unavailable_after
        cached = self._runs.get(run_id)
        if cached is None and creating:
            cached = (None, 0)  # a new run: try "must not exist" first; a conflict reads it
        run, seq = cached if cached is not None else await self._get_run(key)
        while True:
            try:
                decision = decide(run)
            except StoreError:
                if cached is None:
                    raise
                cached = None  # a refusal is never decided on the cache
                run, seq = await self._get_run(key)
                continue
            if decision.record is None and not decision.delete:
                if cached is not None:
                    cached = None
                    run, seq = await self._get_run(key)
                    continue
                return decision.result
            headers = {"Nats-Expected-Last-Subject-Sequence": str(seq)}
            try:
                if decision.delete:
                    await self._publish(key, b"", {**_PURGE, **headers})
                    self._runs.pop(run_id, None)
                    self._alias_cache.pop(("run", run_id), None)
                    await self._publish(keys.run_alias_key(run_id), b"", _PURGE)
                else:
                    assert decision.record is not None
                    new_seq = await self._publish(key, encode_record(decision.record, self.max_record_bytes), headers)
                    self._runs.put(run_id, (decision.record, new_seq))
                return decision.result
            except _Conflict as conflict:
                self.stats.conflicts += 1
                if time.monotonic() > deadline:
                    raise StoreUnavailableError(f"run '{run_id}' kept changing", id=run_id) from None
                if cached is None:  # a real race: spread out the writers
                    await asyncio.sleep(random.uniform(0, 0.005))
                cached = None
                run, seq = await self._get_run(key, at_least=conflict.current)

    async def _get_run(self, key: str, at_least: int = 0) -> tuple[RunRecord | None, int]:
        entry = await self._get_last(key, at_least)
        if entry is None:
            return None, 0
        return (None if entry.deleted else _run_decoder.decode(entry.data)), entry.seq

    async def _read_run(self, thread_id: str, run_id: str) -> RunRecord | None:
        run, seq = await self._get_run(keys.run_key(thread_id, run_id))
        if run is not None:
            self._runs.put(run_id, (run, seq))
        return run

    async def _thread_runs(self, thread_id: str) -> list[RunRecord]:
        prefix = f"{self._kv}{keys.runs_prefix(thread_id)}.>"
        entries = await self._read_subtree(prefix)
        return [_run_decoder.decode(e.data) for e in entries if not e.deleted]

    async def _iter_runs(self, written_before: int | None = None) -> AsyncIterator[RunRecord]:
        async for page in self._scan_pages(f"{self._kv}r.>", written_before=written_before):
            for e in page:
                if not e.deleted:
                    yield _run_decoder.decode(e.data)

    async def _bind(self, kind: AliasKind, id: str, thread_id: str) -> tuple[str, bool]:
        key = _alias_key(kind, id)
        data = thread_id.encode()
        expected = 0
        for _ in range(5):
            try:
                await self._publish(key, data, {"Nats-Expected-Last-Subject-Sequence": str(expected)})
                self._remember_alias(kind, id, thread_id)
                return thread_id, expected == 0
            except _Conflict as conflict:
                current = await self._get_last(key, conflict.current)
                if current is not None and not current.deleted:
                    bound = current.data.decode()
                    self._remember_alias(kind, id, bound)
                    return bound, False
                expected = current.seq if current is not None else 0  # a purge marker: take its place
        raise StoreUnavailableError(f"could not bind {kind} '{id}'", id=id)

    async def _thread_of(self, kind: AliasKind, id: str) -> str | None:
        cached = self._alias_cache.get((kind, id))
        if cached is not None:
            return cached
        entry = await self._get_last(_alias_key(kind, id))
        if entry is None or entry.deleted:
            return None
        thread_id = entry.data.decode()
        self._remember_alias(kind, id, thread_id)
        return thread_id

    def _remember_alias(self, kind: AliasKind, id: str, thread_id: str) -> None:
        # an id's thread never changes, so this cache can only be incomplete, never wrong
        # (a purged and re-created id is the exception; reads then find no record, see load)
        self._alias_cache.put((kind, id), thread_id)

    async def try_lead(self, name: str, holder: str, ttl_ms: int, now: int) -> bool:
        """A leader key with a server-side TTL: it vanishes when its holder stops renewing."""
        key = f"lead.{keys.H(name)}"
        entry = await self._get_last(key)
        if entry is not None and not entry.deleted and entry.data.decode() != holder:
            return False
        expected = entry.seq if entry is not None else 0
        ttl_s = max(1, -(-ttl_ms // 1000))
        try:
            await self._publish(
                key, holder.encode(), {"Nats-Expected-Last-Subject-Sequence": str(expected), "Nats-TTL": f"{ttl_s}s"}
            )
        except _Conflict:
            return False
        return True

    async def _purge_orphan_aliases(self, older_than: int) -> int:
        """Aliases written before `older_than` whose record does not exist (a crash between
        the alias and the record, or a refused enqueue): purged, each guarded by its own
        sequence so an alias re-bound meanwhile is kept. Only old aliases are checked, one by
        one: they are few, as a purged record takes its alias with it."""
        purged = 0
        for prefix, kind in (("id.", "dispatch"), ("run.", "run")):
            old: list[_Entry] = []
            async for page in self._scan_pages(f"{self._kv}{prefix}>", written_before=older_than):
                old += [e for e in page if not e.deleted]
            for e in old:
                id = keys.unH(e.subject[len(self._kv) + len(prefix) :])
                if await self._alias_in_use(kind, id, e.data.decode()):  # type: ignore[arg-type]
                    continue
                try:
                    await self._publish(
                        e.subject[len(self._kv) :], b"", {**_PURGE, "Nats-Expected-Last-Subject-Sequence": str(e.seq)}
                    )
                except _Conflict:
                    continue
                self._alias_cache.pop((kind, id), None)  # type: ignore[arg-type]
                purged += 1
        return purged

    def _is_dispatch_key(self, subject: str) -> bool:
        """Whether a subject of the thread subtree (`t.>`) holds a dispatch (not an epoch)."""
        return _split_thread_key(subject[len(self._kv) :])[1].startswith("d.")

    async def _iter_dispatches(self, written_before: int | None = None) -> AsyncIterator[RunDispatch]:
        async for page in self._scan_pages(f"{self._kv}t.>", written_before=written_before):
            for e in page:
                if not e.deleted and self._is_dispatch_key(e.subject):
                    yield _dispatch_decoder.decode(e.data)

    async def sweep_view(self, now: int, expired_limit: int) -> tuple[list[RunRecord], Survey]:
        """The sweep's view, kept up to date by stream sequence: each sweep reads only what was
        written since the previous one, so its cost follows the traffic, not the history
        waiting for GC. A full pass rebuilds it on the first sweep and every
        `FULL_SWEEP_EVERY_S` (that is when the terminal counts are exact again)."""
        async with self._sweep_lock:  # the maintenance loop and `stats` share the view
            return await self._sweep_view(now, expired_limit)

    async def _sweep_view(self, now: int, expired_limit: int) -> tuple[list[RunRecord], Survey]:
        index = self._sweep_index
        if index is None or time.monotonic() - index.built_at > FULL_SWEEP_EVERY_S:
            index = self._sweep_index = _SweepIndex(built_at=time.monotonic())
        new_runs: list[str] = []  # open runs first seen in this sweep
        async for page in self._scan_pages(f"{self._kv}r.>", after=index.run_seq):
            for e in page:
                index.run_seq = max(index.run_seq, e.seq)
                if e.deleted or _run_head.decode(e.data).status == RunStatus.DONE:
                    index.runs.pop(e.subject, None)
                    continue
                if e.subject not in index.runs:
                    new_runs.append(e.subject)
                index.runs[e.subject] = e.data
        # decoded for this sweep only: between sweeps the view holds the records' bytes
        runs = {subject: _run_decoder.decode(data) for subject, data in index.runs.items()}
        # a terminal dispatch is kept only while an open run refers to it: the history read
        # since the last sweep is dropped page by page, never held
        wanted = {r.dispatch_id for r in runs.values() if r.dispatch_id}
        async for page in self._scan_pages(f"{self._kv}t.>", after=index.dispatch_seq):
            for e in page:
                index.dispatch_seq = max(index.dispatch_seq, e.seq)
                if not self._is_dispatch_key(e.subject):
                    continue
                if e.deleted:
                    index.dispatches.pop(e.subject, None)
                    continue
                head = _dispatch_head.decode(e.data)
                known = index.dispatches.get(e.subject)
                if head.status.is_terminal and (known is None or not _dispatch_head.decode(known).status.is_terminal):
                    index.terminal[head.status] = index.terminal.get(head.status, 0) + 1
                if head.status.is_terminal and head.dispatch_id not in wanted:
                    index.dispatches.pop(e.subject, None)
                else:
                    index.dispatches[e.subject] = e.data
        dispatches = {key: _dispatch_decoder.decode(data) for key, data in index.dispatches.items()}
        # a run that appeared after the runs were read may have a dispatch that already ended
        # (and was dropped above): fetch those few, the ones without a live dispatch
        present = {d.dispatch_id for d in dispatches.values()}
        for subject in new_runs:
            dispatch_id = runs[subject].dispatch_id if subject in runs else None
            if not dispatch_id or dispatch_id in present:
                continue
            d = await self.load_dispatch(dispatch_id)
            if d is not None and d.is_terminal:
                key = f"{self._kv}{keys.dispatch_key(d.thread_id, d.dispatch_id)}"
                dispatches[key] = d
                index.dispatches[key] = msgspec.json.encode(d)
        open_runs = list(runs.values())
        survey = Survey(counts={s: index.terminal.get(s, 0) for s in DispatchStatus})
        for key, d in dispatches.items():
            if not d.is_terminal:
                survey.add(d, now, wanted, expired_limit)
            elif d.dispatch_id in wanted:
                survey.wanted[d.dispatch_id] = d  # counted when it ended
            else:
                del index.dispatches[key]  # kept only while an open run refers to it
        return open_runs, survey

    # ------------------------------------------------------------------ snapshot and commit

    async def _snapshot(self, thread_id: str, at_least: int = 0) -> tuple[ThreadState, int]:
        """The thread as of its latest revision, and that revision. `at_least`: a revision the
        server reported (after a conflict): a replica behind it must not answer."""
        prefix = f"{self._kv}{keys.thread_prefix(thread_id)}."
        entries = await self._read_subtree(prefix + ">", at_least)
        self.stats.snapshots += 1
        state = ThreadState(thread_id=thread_id, dispatches={})
        rev = 0
        for e in entries:
            rev = max(rev, e.seq)  # tombstones count: they are part of the thread's history
            if not e.deleted:
                _absorb(state, e.subject[len(prefix) :], e.data)
        self._remember_thread(state, rev)
        return state, rev

    async def _read_subtree(self, subject_filter: str, at_least: int = 0) -> list[_Entry]:
        """The last message of every key under a filter, in one round trip when possible."""
        request: dict[str, Any] = {"multi_last": [subject_filter], "batch": 1024}
        if max(self._high_water, at_least):
            request["min_last_seq"] = max(self._high_water, at_least)
        status, entries = await self._batch_get(request)
        if status == 413:  # more keys than one multi_last answers: scan the subtree in order
            return await self._scan(subject_filter)
        return entries

    async def _commit(self, thread_id: str, rev: int, change: Change) -> int:
        """Publish `change` guarded by the thread revision `rev`; returns the new revision, or
        raises _Conflict if the thread moved."""
        subtree = f"{self._kv}{keys.thread_prefix(thread_id)}.>"
        writes = [self._encode_write(thread_id, w) for w in change.writes]
        if change.atomic and len(writes) > 1:
            for start in range(0, len(writes), MAX_BATCH):
                rev = await self._publish_batch(writes[start : start + MAX_BATCH], rev, subtree)
            return rev
        for w, (key, data, headers) in zip(change.writes, writes):
            if isinstance(w, ForgetRun):
                await self._purge_alias(w)
                continue
            guard = {
                "Nats-Expected-Last-Subject-Sequence": str(rev),
                "Nats-Expected-Last-Subject-Sequence-Subject": subtree,
                **headers,
            }
            rev = await self._publish(key, data, guard)
            if isinstance(w, DeleteDispatch):
                await self._purge_alias(w)
        return rev

    def _encode_write(self, thread_id: str, w: Write) -> tuple[str, bytes, dict[str, str]]:
        match w:
            case PutDispatch(record=d):
                return keys.dispatch_key(thread_id, d.dispatch_id), encode_record(d, self.max_record_bytes), {}
            case PutEpoch(epoch=e):
                return keys.epoch_key(thread_id), str(e).encode(), {}
            case DeleteDispatch(dispatch_id=i):
                return keys.dispatch_key(thread_id, i), b"", _PURGE
            case DeleteEpoch():
                return keys.epoch_key(thread_id), b"", _PURGE
            case ForgetRun(run_id=i):
                return keys.run_alias_key(i), b"", _PURGE
        raise AssertionError(w)

    async def _purge_alias(self, w: DeleteDispatch | ForgetRun) -> None:
        kind: AliasKind = "dispatch" if isinstance(w, DeleteDispatch) else "run"
        id = w.dispatch_id if isinstance(w, DeleteDispatch) else w.run_id
        if kind == "dispatch" and run_of_first_dispatch(id) is not None:
            return  # a run's first dispatch has no alias of its own
        self._alias_cache.pop((kind, id), None)
        try:
            await self._publish(_alias_key(kind, id), b"", _PURGE)
        except (StoreError, _Conflict) as exc:  # an orphan alias is harmless; GC retries it
            log.warning("event=alias_purge_failed kind=%s id=%s error=%s", kind, id, exc)

    # ------------------------------------------------------------------ NATS requests

    async def _publish(self, key: str, data: bytes, headers: dict[str, str]) -> int:
        """One publish; returns its stream sequence. A lost reply is resolved by re-reading."""
        subject = self._kv + key
        deadline = time.monotonic() + self._unavailable_after
        while True:
            try:
                reply = await self._request(subject, data, headers)
            except _TRANSIENT as exc:
                landed = await self._landed(key, data, headers)
                if landed is not None:
                    return landed
                if time.monotonic() > deadline:
                    raise StoreUnavailableError(f"publish to {key} failed: {exc!r}", id=key) from exc
                await asyncio.sleep(0.05)
                continue
            ack = _pub_ack.decode(reply.data)
            if ack.error is None:
                self._high_water = max(self._high_water, ack.seq)
                self.stats.publishes += 1
                return ack.seq
            if ack.error.err_code in WRONG_LAST_SEQUENCE:
                raise _Conflict(ack.error.description)
            if ack.error.code == 503 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # no stream leader right now (cluster election)
                continue
            raise StoreUnavailableError(f"publish to {key} rejected: {ack.error.description}", id=key)

    async def _request(self, subject: str, data: bytes, headers: dict[str, str]) -> Msg:
        """The transport call behind every publish (tests wrap it to inject faults)."""
        return await self.nc.request(subject, data, timeout=self._timeout, headers=headers)

    async def _landed(self, key: str, data: bytes, headers: dict[str, str]) -> int | None:
        """After a lost reply: did our write land? Compares the key's current value with ours."""
        try:
            entry = await self._get_last(key)
        except StoreUnavailableError:
            return None
        if entry is None:
            return None
        purge = headers.get("KV-Operation") == "PURGE"
        if (purge and entry.deleted) or (not purge and not entry.deleted and entry.data == data):
            self.stats.lost_replies_recovered += 1
            log.info("event=lost_reply_resolved key=%s seq=%d", key, entry.seq)
            return entry.seq
        return None

    async def _publish_batch(self, writes: list[tuple[str, bytes, dict[str, str]]], rev: int, subtree: str) -> int:
        """One atomic batch (ADR-50), guarded on its first message; returns the commit's sequence."""
        batch_id = self.new_token()
        last = len(writes)
        for n, (key, data, headers) in enumerate(writes, start=1):
            h = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n), **headers}
            if n == 1:
                h["Nats-Expected-Last-Subject-Sequence"] = str(rev)
                h["Nats-Expected-Last-Subject-Sequence-Subject"] = subtree
            if n == last:
                h["Nats-Batch-Commit"] = "1"
                break
            if n == 1:
                await self.nc.request(self._kv + key, data, timeout=self._timeout, headers=h)
            else:
                await self.nc.publish(self._kv + key, data, headers=h)
        key, data, _ = writes[-1]
        try:
            reply = await self._request(self._kv + key, data, h)
        except _TRANSIENT as exc:
            first_key, first_data, first_headers = writes[0]
            landed = await self._landed(first_key, first_data, first_headers)
            if landed is not None and landed > rev:
                return await self._seq_of(key)
            raise StoreUnavailableError(f"atomic batch on {subtree} failed: {exc!r}") from exc
        ack = _pub_ack.decode(reply.data)
        if ack.error is not None:
            if ack.error.err_code in WRONG_LAST_SEQUENCE:
                raise _Conflict(ack.error.description)
            raise StoreUnavailableError(f"atomic batch on {subtree} rejected: {ack.error.description}")
        self._high_water = max(self._high_water, ack.seq)
        self.stats.batches += 1
        return ack.seq

    async def _seq_of(self, key: str) -> int:
        entry = await self._get_last(key)
        return entry.seq if entry is not None else 0

    async def _get_last(self, key: str, at_least: int = 0) -> _Entry | None:
        """A key's last message (tombstones included), or None if it has none. Read from any
        replica that has caught up with what this store wrote (and with `at_least`); on a
        replicated bucket an absence is confirmed by the stream leader, since a replica may
        not have another client's write yet."""
        deadline = time.monotonic() + self._unavailable_after
        self.stats.gets += 1
        request: dict[str, Any] = {"last_by_subj": self._kv + key}
        if max(self._high_water, at_least):
            request["min_last_seq"] = max(self._high_water, at_least)
        payload = msgspec.json.encode(request)
        while True:
            try:
                msg = await self.nc.request(self._direct, payload, timeout=self._timeout)
            except _TRANSIENT as exc:
                if time.monotonic() > deadline:
                    raise StoreUnavailableError(f"read of {key} failed: {exc!r}", id=key) from exc
                await asyncio.sleep(0.05)
                continue
            status = _status(msg)
            if status == 404:
                return await self._get_last_from_leader(key) if self.replicas > 1 else None
            if status is None:
                return _entry(msg)
            if time.monotonic() > deadline:
                raise StoreUnavailableError(f"read of {key} failed with status {status}", id=key)
            await asyncio.sleep(0.05)

    async def _get_last_from_leader(self, key: str) -> _Entry | None:
        """A key's last message as the stream leader has it (STREAM.MSG.GET)."""
        payload = msgspec.json.encode({"last_by_subj": self._kv + key})
        deadline = time.monotonic() + self._unavailable_after
        while True:
            try:
                msg = await self.nc.request(f"$JS.API.STREAM.MSG.GET.{self.stream}", payload, timeout=self._timeout)
                reply = _msg_get.decode(msg.data)
            except (*_TRANSIENT, msgspec.DecodeError) as exc:
                if time.monotonic() > deadline:
                    raise StoreUnavailableError(f"leader read of {key} failed: {exc!r}", id=key) from exc
                await asyncio.sleep(0.05)
                continue
            if reply.message is not None:
                m = reply.message
                headers = base64.b64decode(m.hdrs) if m.hdrs else b""
                deleted = b"KV-Operation: DEL" in headers or b"KV-Operation: PURGE" in headers
                return _Entry(subject=m.subject, seq=m.seq, data=base64.b64decode(m.data or ""), deleted=deleted,
                              stamp=m.time)
            if reply.error is not None and reply.error.code == 404:
                return None
            if time.monotonic() > deadline:
                raise StoreUnavailableError(f"leader read of {key} failed: {reply.error}", id=key)
            await asyncio.sleep(0.05)

    async def _batch_get(self, request: dict[str, Any]) -> tuple[int, _Batch]:
        """A direct batch get answered on our long-lived reply subscription.
        Returns (status, entries): 204 at end of batch, 404 no results, 413 too many."""
        payload = msgspec.json.encode(request)
        deadline = time.monotonic() + self._unavailable_after
        while True:
            self._next_token += 1
            token = str(self._next_token)
            batch = _Batch()
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._pending[token] = (batch, done)
            try:
                await self.nc.publish(self._direct, payload, reply=f"{self._inbox}.{token}")
                status = await self._await_batch(done, batch)
            except _TRANSIENT:
                status = -1
            finally:
                self._pending.pop(token, None)
            if status in (204, 404, 413):
                return status, batch
            # 503 no leader / 408 replica behind min_last_seq / transport error: retry until the deadline
            if time.monotonic() > deadline:
                raise StoreUnavailableError(f"batch read failed (status {status})")
            await asyncio.sleep(0.05)

    async def _await_batch(self, done: asyncio.Future[int], batch: _Batch) -> int:
        """The batch's final status. The timeout is for silence, not for the whole batch: a
        big page on a busy pod keeps arriving for longer than one request timeout."""
        seen = -1
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(done), self._timeout)
            except TimeoutError:
                if len(batch) == seen:
                    done.cancel()
                    raise
                seen = len(batch)

    def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        pending = self._pending.get(token)
        if pending is None:
            return
        batch, done = pending
        status = _status(msg)
        if status is None:
            batch.append(_entry(msg))  # as it arrives: a page is never held as messages too
        elif not done.done():
            if status == 204:  # end of batch: how many more match beyond what was sent
                batch.pending = int((msg.headers or {}).get("Nats-Num-Pending", "0") or 0)
            done.set_result(status)

    async def _scan(self, subject_filter: str) -> list[_Entry]:
        """Every key matching the filter (last value each), in stream order."""
        return [e async for page in self._scan_pages(subject_filter) for e in page]

    async def _scan_pages(
        self, subject_filter: str, page: int = SCAN_PAGE, written_before: int | None = None, after: int = 0
    ) -> AsyncIterator[list[_Entry]]:
        """Every key matching the filter (last value each), in stream order, one page at a
        time, so a scan of a big bucket holds one page, not the bucket. `written_before`
        (ms): stop at the first key written at or after then (stream order is write order).
        `after`: only keys last written after this stream sequence."""
        seq = after + 1
        while True:
            status, batch = await self._batch_get({"seq": seq, "next_by_subj": subject_filter, "batch": page})
            self.stats.scanned_keys += len(batch)
            more = status == 204 and bool(batch) and bool(batch.pending)
            entries: list[_Entry] = batch
            if written_before is not None:
                older = _written_before(entries, written_before)
                if older < len(entries):
                    entries, more = entries[:older], False
            if entries:
                yield entries
            # the server may send fewer than asked (a byte limit): go on while it says more match
            if not more:
                return
            seq = entries[-1].seq + 1


@dataclass
class _SweepIndex:
    """The maintenance leader's running view for `sweep_view`: the live dispatches, the
    terminal ones that an open run still refers to and the open runs (by key, each as its
    stored bytes: the view lives between sweeps, and decoded, a run with a 20-field input
    takes ~3x the memory; tests/test_nats_store.py), how many dispatches ended in each
    terminal status (as of the last full pass, plus those seen ending since), and how far
    into the stream each key space has been read."""

    built_at: float
    dispatch_seq: int = 0
    run_seq: int = 0
    dispatches: dict[str, bytes] = field(default_factory=dict)
    runs: dict[str, bytes] = field(default_factory=dict)
    terminal: dict[DispatchStatus, int] = field(default_factory=dict)


class _Batch(list[_Entry]):
    """The entries of one batch read; `pending` = matches left beyond it (from the end-of-batch)."""

    pending = 0


class _ThreadLock(asyncio.Lock):
    """A per-thread lock that knows how many tasks use it (dropped when none do)."""

    def __init__(self) -> None:
        super().__init__()
        self.users = 0


class StoreStats:
    """Counters of NATS round trips, for tests and benchmarks."""

    def __init__(self) -> None:
        self.snapshots = 0
        self.probes = 0
        self.gets = 0
        self.publishes = 0
        self.batches = 0
        self.conflicts = 0
        self.scanned_keys = 0
        self.lost_replies_recovered = 0


_PURGE = {"KV-Operation": "PURGE", "Nats-Rollup": "sub", "Nats-TTL": str(MARKER_TTL_S)}


def _alias_key(kind: AliasKind, id: str) -> str:
    return keys.dispatch_alias_key(id) if kind == "dispatch" else keys.run_alias_key(id)


def _status(msg: Msg) -> int | None:
    """The status of a JetStream control reply (404, 204 end of batch, ...), None for data."""
    status = (msg.headers or {}).get("Status")
    return int(status) if status else None


def _entry(msg: Msg) -> _Entry:
    h = msg.headers or {}
    return _Entry(
        subject=h.get("Nats-Subject", ""),
        seq=int(h.get("Nats-Sequence", "0")),
        data=msg.data,
        deleted=h.get("KV-Operation") in ("DEL", "PURGE"),
        stamp=h.get("Nats-Time-Stamp", ""),
    )


def _written_before(entries: list[_Entry], cutoff: int) -> int:
    """How many entries, from the start of a page in stream order, were written before
    `cutoff` (ms). An entry without a time stamp counts as old: reading it is harmless."""
    for i, e in enumerate(entries):
        if e.written_ms() >= cutoff:
            return i
    return len(entries)


def _split_thread_key(key: str) -> tuple[str, str]:
    """`t.<H(thread)>.<rest>` → (H(thread), rest)."""
    _, thread_token, rest = key.split(".", 2)
    return thread_token, rest


def _absorb(state: ThreadState, rest: str, data: bytes) -> None:
    """Add one stored key (relative to the thread's subtree) to a thread state."""
    if rest == "epoch":
        state.epoch = int(data)
    elif rest.startswith("d."):
        d = _dispatch_decoder.decode(data)
        state.dispatches[d.dispatch_id] = d


def _copy_state(state: ThreadState) -> ThreadState:
    # the index is shared: decisions only read it, and `ops.apply` copies it before a change
    return ThreadState(thread_id=state.thread_id, epoch=state.epoch, dispatches=dict(state.dispatches),
                       index=state.index)
