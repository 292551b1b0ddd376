"""Model-based test: random operation sequences applied to the NATS store and the memory
store side by side; every observable result must be identical after every step."""

from __future__ import annotations

import asyncio
import itertools

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from service.model import DispatchStatus, RunDispatch, RunDispatchResult, RunStatus, StoreError
from service.store import MemoryDispatchStore, NatsDispatchStore

from .conftest import unique_prefix

THREADS = ["a", "b", "c"]
CONSUMERS = ["p1", "p2"]
_ids = itertools.count()

times = st.integers(min_value=0, max_value=5_000)
threads = st.sampled_from(THREADS)


def outcome(fn):
    """Call a store coroutine factory; return its result or the error's type name."""

    async def run(store):
        try:
            return ("ok", await fn(store))
        except StoreError as exc:
            return ("error", type(exc).__name__)

    return run


def normalized(value):
    """Claim tokens are random per store: compare everything else."""
    if isinstance(value, RunDispatch):
        return msgspec.structs.replace(value, claim_token="tok" if value.claim_token else None)
    if isinstance(value, list | tuple):
        return type(value)(normalized(v) for v in value)
    if hasattr(value, "__struct_fields__"):
        return type(value)(*(normalized(getattr(value, f)) for f in value.__struct_fields__))
    return value


class StoresAgree(RuleBasedStateMachine):
    """Both stores receive the same calls; their answers and their states must agree."""

    url: str = ""

    @initialize()
    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.memory = MemoryDispatchStore()
        self.nats = self.loop.run_until_complete(NatsDispatchStore.connect(self.url, prefix=unique_prefix("m")))
        self.dispatch_ids: list[str] = []
        self.tokens: dict[str, tuple[str, str]] = {}  # dispatch -> (memory token, nats token)
        self.now = 1000

    def teardown(self) -> None:
        if hasattr(self, "nats"):
            self.loop.run_until_complete(self.nats.close())
            self.loop.close()

    def both(self, call):
        m = self.loop.run_until_complete(outcome(call)(self.memory))
        n = self.loop.run_until_complete(outcome(call)(self.nats))
        assert normalized(m) == normalized(n), (m, n)
        return m, n

    def advance(self, dt: int) -> int:
        self.now += dt
        return self.now

    @rule(thread=threads, priority=st.sampled_from([0, 128, 255]), delay=st.sampled_from([0, 0, 500]),
          dedupe=st.sampled_from([None, None, "k"]), max_attempts=st.integers(1, 3), dt=times)
    def enqueue(self, thread, priority, delay, dedupe, max_attempts, dt):
        now = self.advance(dt)
        did = f"d{next(_ids)}"
        d = RunDispatch.queued(did, thread, f"r-{did}", now, priority=priority, dedupe_key=dedupe,
                               available_at=now + delay, max_attempts=max_attempts)
        m, _ = self.both(lambda s: s.enqueue(d))
        if m[0] == "ok":
            self.dispatch_ids.append(did)

    @rule(thread=threads, consumer=st.sampled_from(CONSUMERS), dt=times)
    def claim(self, thread, consumer, dt):
        now = self.advance(dt)
        m, n = self.both(lambda s: s.claim(thread, consumer, 1000, now, 1))
        if m[0] == "ok":
            for dm, dn in zip(m[1], n[1]):
                self.tokens[dm.dispatch_id] = (dm.claim_token, dn.claim_token)

    @precondition(lambda self: self.dispatch_ids)
    @rule(data=st.data(), dt=times)
    def claim_dispatch(self, data, dt):
        now = self.advance(dt)
        did = data.draw(st.sampled_from(self.dispatch_ids))
        m, n = self.both(lambda s: s.claim_dispatch(did, "p1", 1000, now))
        if m[0] == "ok" and m[1] is not None:
            self.tokens[did] = (m[1].claim_token, n[1].claim_token)

    def token_call(self, did: str, make):
        """Run `make(store, token)` with each store's own token for the dispatch."""
        mt, nt = self.tokens.get(did, ("none", "none"))
        m = self.loop.run_until_complete(outcome(lambda s: make(s, mt))(self.memory))
        n = self.loop.run_until_complete(outcome(lambda s: make(s, nt))(self.nats))
        assert normalized(m) == normalized(n), (m, n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), op=st.sampled_from(["ack", "nack", "dead_letter", "start", "result", "extend", "supersede"]),
          dt=times)
    def token_op(self, data, op, dt):
        now = self.advance(dt)
        did = data.draw(st.sampled_from(sorted(self.tokens)))
        run_id = f"r-{did}"
        calls = {
            "ack": lambda s, t: s.ack(did, t, now),
            "nack": lambda s, t: s.nack(did, t, now + 200, "err", now),
            "dead_letter": lambda s, t: s.dead_letter(did, t, "fatal", now),
            "start": lambda s, t: s.record_dispatch_start(did, t, "inst", now),
            "result": lambda s, t: s.record_run_result(
                did, t, RunDispatchResult(run_id=run_id, dispatch_instance_id="i", status=RunStatus.DONE), now),
            "extend": lambda s, t: s.extend_lease(did, t, 2000, now),
            "supersede": lambda s, t: s.supersede_claimed(did, t, now, "why"),
        }
        self.token_call(did, calls[op])

    @precondition(lambda self: self.dispatch_ids)
    @rule(data=st.data(), dt=times)
    def cancel(self, data, dt):
        now = self.advance(dt)
        did = data.draw(st.sampled_from(self.dispatch_ids))
        self.both(lambda s: s.cancel(did, now))

    @rule(thread=threads, dt=times)
    def interrupt(self, thread, dt):
        now = self.advance(dt)
        m, n = self.both(lambda s: s.interrupt(thread, now))

    @rule(dt=times)
    def reclaim(self, dt):
        now = self.advance(dt)
        m = self.loop.run_until_complete(self.memory.reclaim_expired_leases(now, 100))
        n = self.loop.run_until_complete(self.nats.reclaim_expired_leases(now, 100))
        key = lambda d: d.dispatch_id  # noqa: E731  (order is unspecified)
        assert normalized(sorted(m, key=key)) == normalized(sorted(n, key=key))

    @rule(dt=times)
    def sweep_view(self, dt):
        """The NATS store keeps the sweep's view incrementally across steps; the reference
        computes it afresh. Live work must agree exactly; terminal counts may lag purges."""
        now = self.advance(dt)
        (_, m), (_, n) = (self.loop.run_until_complete(s.sweep_view(now, 100)) for s in (self.memory, self.nats))
        key = lambda d: d.dispatch_id  # noqa: E731  (order is unspecified)
        for part in ("queued", "expired"):
            assert normalized(sorted(getattr(m, part), key=key)) == normalized(sorted(getattr(n, part), key=key)), part
        for status in DispatchStatus:
            if status in (DispatchStatus.QUEUED, DispatchStatus.CLAIMED):
                assert m.counts[status] == n.counts[status], status
            else:
                assert n.counts[status] >= m.counts[status], status

    @rule(age=st.integers(0, 3000))
    def purge(self, age):
        self.both(lambda s: s.purge_terminal(self.now - age))

    @invariant()
    def same_state(self):
        if not hasattr(self, "nats"):
            return
        for t in THREADS:
            self.both(lambda s, t=t: s.list_dispatches(t))
            self.both(lambda s, t=t: s.current_dispatch_epoch(t))
        self.both(lambda s: s.queued_thread_ids())
        for status in (DispatchStatus.QUEUED, DispatchStatus.CLAIMED, DispatchStatus.DEAD_LETTER):
            self.both(lambda s, status=status: s.count_dispatches_by_status(status))


@pytest.mark.slow
def test_nats_store_behaves_like_the_reference(nats_url):
    StoresAgree.url = nats_url
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        StoresAgree,
        settings=settings(
            max_examples=200,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
