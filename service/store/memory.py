"""`MemoryDispatchStore`: the reference implementation of the contract, in one process.

Each method runs without awaiting inside its critical section, so it is atomic with
respect to every other method on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from ..model import RunDispatch, RunRecord
from . import ops
from .base import DEFAULT_MAX_RECORD_BYTES, AliasKind, ThreadStore, encode_record
from .ops import DeleteDispatch, ForgetRun, Outcome, PutDispatch, RunChange, ThreadState

T = TypeVar("T")


class MemoryDispatchStore(ThreadStore):
    def __init__(self, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.max_record_bytes = max_record_bytes
        self._threads: dict[str, ThreadState] = {}
        self._runs: dict[str, RunRecord] = {}
        self._aliases: dict[tuple[AliasKind, str], str] = {}
        self._leaders: dict[str, tuple[str, int]] = {}

    async def _thread_op(
        self,
        thread_id: str,
        decide: Callable[[ThreadState], Outcome[T]],
        *,
        full: bool = False,
        trust_own_commit: bool = False,  # the state here is always current
    ) -> T:
        state = self._threads.get(thread_id) or ThreadState(thread_id=thread_id)
        outcome = decide(_copy(state))
        if outcome.change:
            for w in outcome.change.writes:
                if isinstance(w, PutDispatch):
                    encode_record(w.record, self.max_record_bytes)
            new = ops.apply(state, outcome.change)
            for w in outcome.change.writes:
                if isinstance(w, DeleteDispatch):
                    self._aliases.pop(("dispatch", w.dispatch_id), None)
                elif isinstance(w, ForgetRun):
                    self._aliases.pop(("run", w.run_id), None)
            if new.is_empty() and not new.epoch:
                self._threads.pop(thread_id, None)
            else:
                self._threads[thread_id] = new
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    async def _read_thread(self, thread_id: str) -> ThreadState:
        return _copy(self._threads.get(thread_id) or ThreadState(thread_id=thread_id))

    async def _run_op(
        self, thread_id: str, run_id: str, decide: Callable[[RunRecord | None], RunChange[T]], creating: bool = False
    ) -> T:
        existing = self._runs.get(run_id)
        decision = decide(existing if existing is None or existing.thread_id == thread_id else None)
        if decision.record is not None:
            encode_record(decision.record, self.max_record_bytes)
            self._runs[run_id] = decision.record
        elif decision.delete:
            self._runs.pop(run_id, None)
            self._aliases.pop(("run", run_id), None)
        return decision.result

    async def _read_run(self, thread_id: str, run_id: str) -> RunRecord | None:
        run = self._runs.get(run_id)
        return run if run is not None and run.thread_id == thread_id else None

    async def _thread_runs(self, thread_id: str) -> list[RunRecord]:
        return [r for r in self._runs.values() if r.thread_id == thread_id]

    async def _iter_runs(self, written_before: int | None = None) -> AsyncIterator[RunRecord]:
        for run in list(self._runs.values()):
            yield run

    async def _purge_orphan_aliases(self, older_than: int) -> int:
        # one process, no crash between an alias and its record: orphans come only from
        # refused enqueues, and nothing else can be mid-write now
        dispatch_ids = {i for st in self._threads.values() for i in st.dispatches}
        run_ids = set(self._runs) | {d.run_id for st in self._threads.values() for d in st.dispatches.values()}
        orphans = [
            key
            for key in self._aliases
            if key[1] not in (dispatch_ids if key[0] == "dispatch" else run_ids)
        ]
        for key in orphans:
            del self._aliases[key]
        return len(orphans)

    async def _bind(self, kind: AliasKind, id: str, thread_id: str) -> tuple[str, bool]:
        created = (kind, id) not in self._aliases
        return self._aliases.setdefault((kind, id), thread_id), created

    async def _thread_of(self, kind: AliasKind, id: str) -> str | None:
        return self._aliases.get((kind, id))

    async def try_lead(self, name: str, holder: str, ttl_ms: int, now: int) -> bool:
        current = self._leaders.get(name)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._leaders[name] = (holder, now + ttl_ms)
        return True

    async def _iter_dispatches(self, written_before: int | None = None) -> AsyncIterator[RunDispatch]:
        for d in [d for st in self._threads.values() for d in st.dispatches.values()]:
            yield d


def _copy(state: ThreadState) -> ThreadState:
    return ThreadState(thread_id=state.thread_id, epoch=state.epoch, dispatches=dict(state.dispatches))
