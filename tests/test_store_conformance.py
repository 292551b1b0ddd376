"""The dispatch-store contract (spec/dispatch-contract.md), run against both stores."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from service.model import (
    CLAIMED_LEASE_EXPIRED_AFTER_INTERRUPT,
    CLAIMED_SUPERSEDED_BEFORE_DEAD_LETTER,
    CLAIMED_SUPERSEDED_BEFORE_NACK,
    CLAIMED_SUPERSEDED_BEFORE_RESULT,
    CLAIMED_SUPERSEDED_BEFORE_START,
    CLAIMED_SUPERSEDED_BY_EPOCH,
    CLAIMED_SUPERSEDED_DURING_LEASE_RENEWAL,
    LEASE_EXPIRED_MAX_ATTEMPTS,
    MAX_ID_BYTES,
    QUEUED_SUPERSEDED_BY_INTERRUPT,
    AlreadyExistsError,
    DispatchStatus,
    NotFoundError,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    StoreError,
    Termination,
    TerminationKind,
    ValidationError,
    VersionConflictError,
)

S = DispatchStatus
LEASE = 30_000


def q(dispatch_id: str, thread_id: str = "t1", created_at: int = 1000, **kw) -> RunDispatch:
    run_id = kw.pop("run_id", f"run-{dispatch_id}")
    return RunDispatch.queued(dispatch_id, thread_id, run_id, created_at, **kw)


async def claimed_one(store, dispatch_id: str, thread_id: str = "t1", now: int = 1000, **kw) -> RunDispatch:
    await store.enqueue(q(dispatch_id, thread_id, created_at=now, **kw))
    [d] = await store.claim(thread_id, "worker-a", LEASE, now, 1)
    assert d.dispatch_id == dispatch_id
    return d


def result_for(d: RunDispatch, status: RunStatus = RunStatus.DONE, **kw) -> RunDispatchResult:
    return RunDispatchResult(run_id=d.run_id, dispatch_instance_id="inst-1", status=status, **kw)


# ---------------------------------------------------------------------- enqueue


async def test_enqueue_stores_a_queued_copy_at_the_current_epoch(store):
    d = msgspec.structs.replace(q("d1"), dispatch_epoch=999)
    await store.enqueue(d)
    loaded = await store.load_dispatch("d1")
    assert loaded == msgspec.structs.replace(d, dispatch_epoch=0)
    assert loaded.status == S.QUEUED and loaded.available_at == 1000 and loaded.updated_at == 1000


async def test_enqueue_keeps_caller_fields(store):
    d = q("d1", priority=7, dedupe_key="k", available_at=5000, max_attempts=3, attempt_count=2)
    await store.enqueue(d)
    loaded = await store.load_dispatch("d1")
    assert (loaded.priority, loaded.dedupe_key, loaded.available_at, loaded.max_attempts, loaded.attempt_count) == (
        7,
        "k",
        5000,
        3,
        2,
    )


def _bad_records() -> list[tuple[str, RunDispatch, str | None]]:
    good = q("bad")
    r = msgspec.structs.replace
    return [
        ("blank dispatch_id", r(good, dispatch_id="  "), "dispatch_id"),
        ("blank thread_id", r(good, thread_id=""), "thread_id"),
        ("blank run_id", r(good, run_id="\t"), "run_id"),
        ("over-long dispatch_id", r(good, dispatch_id="x" * (MAX_ID_BYTES + 1)), "dispatch_id"),
        ("over-long thread_id", r(good, thread_id="é" * (MAX_ID_BYTES // 2 + 1)), "thread_id"),
        ("priority 256", r(good, priority=256), "priority"),
        ("priority -1", r(good, priority=-1), "priority"),
        ("max_attempts 0", r(good, max_attempts=0), "max_attempts"),
        ("attempt_count > max_attempts", r(good, attempt_count=6, max_attempts=5), "attempt_count"),
        ("not queued", r(good, status=S.ACKED, completed_at=1), "status"),
        ("claim fields", r(good, claim_token="tok", claimed_by="me", lease_until=5), None),
        ("runtime fields", r(good, run_status=RunStatus.RUNNING), None),
        ("completed_at", r(good, completed_at=5), None),
    ]


@pytest.mark.parametrize("case", _bad_records(), ids=lambda c: c[0])
async def test_enqueue_rejects_bad_records_and_writes_nothing(store, case):
    _, record, field = case
    with pytest.raises(ValidationError) as err:
        await store.enqueue(record)
    if field is not None:
        assert err.value.field == field
    thread = record.thread_id if record.thread_id.strip() and len(record.thread_id.encode()) <= MAX_ID_BYTES else "t1"
    assert await store.list_dispatches(thread) == []
    assert await store.queued_thread_ids() == []


async def test_enqueue_rejects_a_record_over_the_payload_limit(store):
    huge = msgspec.structs.replace(q("big"), last_error="x" * (store.max_record_bytes + 1))
    with pytest.raises(ValidationError) as err:
        await store.enqueue(huge)
    assert err.value.field == "payload"
    assert await store.load_dispatch("big") is None


async def test_enqueue_rejects_a_duplicate_dispatch_id(store):
    await store.enqueue(q("d1"))
    with pytest.raises(AlreadyExistsError):
        await store.enqueue(q("d1", priority=3))
    with pytest.raises(AlreadyExistsError):
        await store.enqueue(q("d1", thread_id="other"))
    assert (await store.load_dispatch("d1")).priority == 128
    assert await store.list_dispatches("other") == []


async def test_dedupe_key_is_unique_per_thread_among_live_dispatches(store):
    await store.enqueue(q("d1", dedupe_key="k"))
    with pytest.raises(AlreadyExistsError) as err:
        await store.enqueue(q("d2", dedupe_key="k"))
    assert "dedupe_key=k" in str(err.value)
    await store.enqueue(q("d3", thread_id="t2", dedupe_key="k"))  # other thread: fine
    await store.enqueue(q("d4"))  # no key: never deduplicated
    await store.enqueue(q("d5"))
    assert [d.dispatch_id for d in await store.list_dispatches("t1")] == ["d1", "d4", "d5"]
    assert await store.cancel("d1", 2000) is not None  # terminal holder frees the key
    await store.enqueue(q("d6", dedupe_key="k"))


async def test_dedupe_key_freed_by_ack(store):
    d = await claimed_one(store, "d1", dedupe_key="k")
    await store.ack("d1", d.claim_token, 2000)
    await store.enqueue(q("d2", dedupe_key="k"))


async def test_run_id_bound_to_another_thread_is_rejected(store):
    await store.enqueue(q("d1", run_id="r1"))
    with pytest.raises(ValidationError):
        await store.enqueue(q("d2", thread_id="t2", run_id="r1"))
    await store.enqueue(q("d3", run_id="r1"))  # a later dispatch of the same run: fine


# ---------------------------------------------------------------------- claim


async def test_claim_takes_priority_then_fifo(store):
    await store.enqueue(q("late-low", created_at=1003, priority=200))
    await store.enqueue(q("b", created_at=1002))
    await store.enqueue(q("a", created_at=1001))
    await store.enqueue(q("urgent", created_at=1004, priority=0))
    order = []
    for now in range(2000, 2004):
        [d] = await store.claim("t1", "w", LEASE, now, 1)
        order.append(d.dispatch_id)
        await store.ack(d.dispatch_id, d.claim_token, now)
    assert order == ["urgent", "a", "b", "late-low"]
    assert [d.dispatch_id for d in await store.list_dispatches("t1")] == ["urgent", "a", "b", "late-low"]


async def test_claim_sets_lease_fields_and_keeps_attempts(store):
    await store.enqueue(q("d1", attempt_count=1))
    [d] = await store.claim("t1", "worker-a", LEASE, 5000, 1)
    assert d.status == S.CLAIMED and d.claimed_by == "worker-a" and d.lease_until == 5000 + LEASE
    assert d.claim_token and d.attempt_count == 1 and d.updated_at == 5000
    assert await store.load_dispatch("d1") == d


async def test_claim_respects_available_at_inclusively(store):
    await store.enqueue(q("d1", available_at=5000))
    assert await store.claim("t1", "w", LEASE, 4999, 1) == []
    [d] = await store.claim("t1", "w", LEASE, 5000, 1)
    assert d.dispatch_id == "d1"


async def test_claim_blocks_while_a_dispatch_of_the_thread_is_claimed(store):
    await claimed_one(store, "d1")
    await store.enqueue(q("d2", created_at=1001))
    assert await store.claim("t1", "w2", LEASE, 2000, 1) == []
    # an expired but not yet reclaimed claim still blocks (memory reference behaviour)
    assert await store.claim("t1", "w2", LEASE, 1000 + LEASE + 1, 1) == []
    # other threads are independent
    await store.enqueue(q("x1", thread_id="t2"))
    assert [d.dispatch_id for d in await store.claim("t2", "w2", LEASE, 2000, 1)] == ["x1"]


async def test_claim_limit(store):
    for i in range(3):
        await store.enqueue(q(f"d{i}", created_at=1000 + i))
    assert await store.claim("t1", "w", LEASE, 2000, 0) == []
    batch = await store.claim("t1", "w", LEASE, 2000, 2)
    assert [d.dispatch_id for d in batch] == ["d0", "d1"]
    assert batch[0].claim_token == batch[1].claim_token
    assert await store.claim("t1", "w", LEASE, 2000, 2) == []


async def test_claim_on_an_empty_or_unknown_thread(store):
    assert await store.claim("nobody", "w", LEASE, 1000, 1) == []


async def test_each_claim_gets_its_own_token(store):
    a = await claimed_one(store, "a", thread_id="t1")
    b = await claimed_one(store, "b", thread_id="t2")
    assert a.claim_token != b.claim_token


# ---------------------------------------------------------------------- claim_dispatch


async def test_claim_dispatch_ignores_available_at(store):
    await store.enqueue(q("d1", available_at=1000 + 60_000))
    d = await store.claim_dispatch("d1", "w", LEASE, 1000)
    assert d is not None and d.status == S.CLAIMED and d.lease_until == 1000 + LEASE


async def test_claim_dispatch_returns_none_when_not_claimable(store):
    assert await store.claim_dispatch("missing", "w", LEASE, 1000) is None
    first = await claimed_one(store, "d1")
    assert await store.claim_dispatch("d1", "w", LEASE, 1000) is None  # not queued
    await store.enqueue(q("d2", created_at=1001))
    assert await store.claim_dispatch("d2", "w", LEASE, 1000) is None  # another is claimed
    await store.ack("d1", first.claim_token, 1500)
    assert (await store.claim_dispatch("d2", "w", LEASE, 1600)).dispatch_id == "d2"


# ---------------------------------------------------------------------- ack


async def test_ack(store):
    d = await claimed_one(store, "d1")
    await store.record_run_result("d1", d.claim_token, result_for(d, response="hi"), 1500)
    await store.ack("d1", d.claim_token, 2000)
    acked = await store.load_dispatch("d1")
    assert acked.status == S.ACKED and acked.completed_at == 2000 and acked.updated_at == 2000
    assert acked.claim_token is None and acked.claimed_by is None and acked.lease_until is None
    assert acked.run_status == RunStatus.DONE and acked.run_response == "hi"  # projection kept


async def test_ack_errors_leave_the_record_unchanged(store):
    with pytest.raises(NotFoundError):
        await store.ack("missing", "tok", 1000)
    d = await claimed_one(store, "d1")
    with pytest.raises(VersionConflictError) as err:
        await store.ack("d1", "wrong-token", 2000)
    assert (err.value.expected, err.value.actual) == (0, 1)
    assert await store.load_dispatch("d1") == d


async def test_ack_after_lease_expiry_but_before_reclaim_succeeds(store):
    d = await claimed_one(store, "d1")
    await store.ack("d1", d.claim_token, 1000 + LEASE * 10)
    assert (await store.load_dispatch("d1")).status == S.ACKED


async def test_ack_frees_the_thread(store):
    d = await claimed_one(store, "d1")
    await store.enqueue(q("d2", created_at=1001))
    await store.ack("d1", d.claim_token, 1500)
    assert [x.dispatch_id for x in await store.claim("t1", "w", LEASE, 1600, 1)] == ["d2"]


# ---------------------------------------------------------------------- runtime projection


async def test_record_dispatch_start_and_result(store):
    d = await claimed_one(store, "d1")
    await store.record_dispatch_start("d1", d.claim_token, "inst-1", 1100)
    started = await store.load_dispatch("d1")
    assert started.status == S.CLAIMED and started.dispatch_instance_id == "inst-1"
    assert started.run_status == RunStatus.RUNNING and started.completed_at is None and started.updated_at == 1100
    term = Termination(TerminationKind.ERROR, "boom")
    await store.record_run_result(
        "d1", d.claim_token, result_for(d, termination=term, response="r", error="e"), 1200
    )
    done = await store.load_dispatch("d1")
    assert done.status == S.CLAIMED and done.run_status == RunStatus.DONE and done.termination == term
    assert (done.run_response, done.run_error, done.completed_at) == ("r", "e", 1200)
    await store.record_dispatch_start("d1", d.claim_token, "inst-2", 1300)  # a restart clears the result
    again = await store.load_dispatch("d1")
    assert again.termination is None and again.completed_at is None and again.dispatch_instance_id == "inst-2"


async def test_record_errors(store):
    with pytest.raises(NotFoundError):
        await store.record_dispatch_start("missing", "t", "i", 1)
    await store.enqueue(q("d1"))
    with pytest.raises(VersionConflictError):
        await store.record_dispatch_start("d1", "t", "i", 1)  # not claimed
    assert (await store.load_dispatch("d1")).run_status is None
    d = (await store.claim("t1", "w", LEASE, 1000, 1))[0]
    with pytest.raises(VersionConflictError):
        await store.record_run_result("d1", "wrong", result_for(d), 1100)
    with pytest.raises(ValidationError) as err:
        bad = RunDispatchResult(run_id="other-run", dispatch_instance_id="i", status=RunStatus.DONE)
        await store.record_run_result("d1", d.claim_token, bad, 1100)
    assert "does not match" in str(err.value)
    assert await store.load_dispatch("d1") == d


# ---------------------------------------------------------------------- nack and dead letter


async def test_nack_requeues_with_backoff_then_dead_letters(store):
    d = await claimed_one(store, "d1", max_attempts=2)
    await store.record_dispatch_start("d1", d.claim_token, "i", 1001)
    await store.nack("d1", d.claim_token, 5000, "flaky", 1002)
    n1 = await store.load_dispatch("d1")
    assert n1.status == S.QUEUED and n1.attempt_count == 1 and n1.available_at == 5000
    assert n1.last_error == "flaky" and n1.claim_token is None and n1.run_status is None and n1.completed_at is None
    assert await store.claim("t1", "w", LEASE, 4999, 1) == []  # retry_at not reached
    [d2] = await store.claim("t1", "w", LEASE, 5000, 1)
    await store.record_run_result("d1", d2.claim_token, result_for(d2, error="again"), 5001)
    await store.nack("d1", d2.claim_token, 9000, "again", 5002)
    n2 = await store.load_dispatch("d1")
    assert n2.status == S.DEAD_LETTER and n2.attempt_count == 2 and n2.completed_at == 5002
    assert n2.last_error == "again" and n2.run_error == "again"  # projection kept


async def test_nack_with_max_attempts_one_dead_letters_at_once(store):
    d = await claimed_one(store, "d1", max_attempts=1)
    await store.nack("d1", d.claim_token, 2000, "x", 1500)
    assert (await store.load_dispatch("d1")).status == S.DEAD_LETTER


async def test_nack_retry_in_the_past_is_claimable_at_once_and_claim_dispatch_ignores_retry_at(store):
    d = await claimed_one(store, "d1")
    await store.nack("d1", d.claim_token, 500, "x", 1500)
    assert len(await store.claim("t1", "w", LEASE, 1500, 1)) == 1
    e = await claimed_one(store, "e1", thread_id="t2")
    await store.nack("e1", e.claim_token, 99_000, "x", 1500)
    assert (await store.claim_dispatch("e1", "w", LEASE, 1600)).status == S.CLAIMED


async def test_nack_and_dead_letter_errors(store):
    with pytest.raises(NotFoundError):
        await store.nack("missing", "t", 1, "e", 1)
    with pytest.raises(NotFoundError):
        await store.dead_letter("missing", "t", "e", 1)
    d = await claimed_one(store, "d1")
    with pytest.raises(VersionConflictError):
        await store.nack("d1", "wrong", 1, "e", 1100)
    with pytest.raises(VersionConflictError):
        await store.dead_letter("d1", "wrong", "e", 1100)
    assert await store.load_dispatch("d1") == d


async def test_dead_letter_keeps_attempts_and_projection(store):
    d = await claimed_one(store, "d1", attempt_count=1)
    await store.record_dispatch_start("d1", d.claim_token, "inst", 1100)
    await store.dead_letter("d1", d.claim_token, "fatal", 1200)
    dl = await store.load_dispatch("d1")
    assert dl.status == S.DEAD_LETTER and dl.attempt_count == 1 and dl.last_error == "fatal"
    assert dl.dispatch_instance_id == "inst" and dl.completed_at == 1200 and dl.claim_token is None


# ---------------------------------------------------------------------- cancel


async def test_cancel(store):
    assert await store.cancel("missing", 1) is None
    await store.enqueue(q("d1"))
    c = await store.cancel("d1", 2000)
    assert c.status == S.CANCELLED and c.completed_at == 2000 and c.updated_at == 2000
    assert await store.load_dispatch("d1") == c
    assert await store.cancel("d1", 3000) is None  # terminal: untouched
    d = await claimed_one(store, "d2")
    assert await store.cancel("d2", 3000) is None  # claimed: the runtime cancels it
    assert await store.load_dispatch("d2") == d


# ---------------------------------------------------------------------- leases


async def test_extend_lease_measures_from_now(store):
    d = await claimed_one(store, "d1")
    assert await store.extend_lease("d1", d.claim_token, 60_000, 15_000) is True
    ext = await store.load_dispatch("d1")
    assert ext.lease_until == 75_000 and ext.updated_at == 15_000


async def test_extend_lease_false_when_the_claim_is_lost(store):
    assert await store.extend_lease("missing", "t", 1, 1) is False
    await store.enqueue(q("q1"))
    assert await store.extend_lease("q1", "t", 1, 1) is False
    d = await claimed_one(store, "d1", thread_id="t2")
    assert await store.extend_lease("d1", "wrong", 1, 1) is False
    assert await store.load_dispatch("d1") == d
    # expired, not yet reclaimed: still extendable
    assert await store.extend_lease("d1", d.claim_token, LEASE, 1000 + LEASE + 5) is True
    # reclaimed: the token is gone
    assert len(await store.reclaim_expired_leases(10**9, 10)) == 1
    assert await store.extend_lease("d1", d.claim_token, LEASE, 10**9) is False


async def test_reclaim_expired_leases(store):
    a = await claimed_one(store, "a", thread_id="ta", max_attempts=3)
    await store.record_dispatch_start("a", a.claim_token, "i", 1001)
    b = await claimed_one(store, "b", thread_id="tb", max_attempts=1)
    await claimed_one(store, "c", thread_id="tc", now=5000)  # not expired yet
    boundary = a.lease_until
    assert await store.reclaim_expired_leases(boundary, 10) == []  # strict: lease_until == now is live
    reclaimed = {d.dispatch_id: d for d in await store.reclaim_expired_leases(boundary + 1, 10)}
    assert set(reclaimed) == {"a", "b"}
    ra = reclaimed["a"]
    assert ra.status == S.QUEUED and ra.attempt_count == 1 and ra.available_at == boundary + 1
    assert ra.claim_token is None and ra.dispatch_instance_id is None and ra.run_status is None
    rb = reclaimed["b"]
    assert rb.status == S.DEAD_LETTER and rb.last_error == LEASE_EXPIRED_MAX_ATTEMPTS
    assert rb.completed_at == boundary + 1
    assert await store.reclaim_expired_leases(boundary + 1, 10) == []  # idempotent
    assert (await store.load_dispatch("c")).status == S.CLAIMED
    assert b.claim_token  # (b was claimed before)


async def test_reclaim_limit(store):
    for i in range(3):
        await claimed_one(store, f"d{i}", thread_id=f"t{i}")
    assert len(await store.reclaim_expired_leases(10**9, 2)) == 2
    assert len(await store.reclaim_expired_leases(10**9, 2)) == 1


# ---------------------------------------------------------------------- interrupt and epochs


async def test_interrupt(store):
    assert await store.current_dispatch_epoch("t1") == 0
    first = await store.interrupt("empty-thread", 1000)
    assert first.new_dispatch_epoch == 1 and first.active_dispatch is None and first.superseded == []
    active = await claimed_one(store, "active")
    await store.enqueue(q("waiting", created_at=1001))
    await store.enqueue(q("delayed", created_at=1002, available_at=99_000))
    done = await claimed_one(store, "done", thread_id="t2")
    await store.ack("done", done.claim_token, 1100)
    await store.enqueue(q("other", thread_id="t3"))
    result = await store.interrupt("t1", 2000)
    assert result.new_dispatch_epoch == 1 and await store.current_dispatch_epoch("t1") == 1
    assert result.active_dispatch == active  # untouched, reported so its run can be cancelled
    assert sorted(d.dispatch_id for d in result.superseded) == ["delayed", "waiting"]
    assert result.superseded_count == 2
    for d in result.superseded:
        assert d.status == S.SUPERSEDED and d.last_error == QUEUED_SUPERSEDED_BY_INTERRUPT
        assert d.dispatch_epoch == 0 and d.completed_at == 2000
        assert await store.load_dispatch(d.dispatch_id) == d
    assert await store.load_dispatch("active") == active
    assert (await store.load_dispatch("other")).status == S.QUEUED
    assert (await store.interrupt("t1", 2001)).new_dispatch_epoch == 2
    # work enqueued after the interrupt carries the new epoch and runs normally
    await store.enqueue(q("fresh", created_at=2003))
    assert (await store.load_dispatch("fresh")).dispatch_epoch == 2


async def _stale_claim(store, dispatch_id: str = "d1") -> RunDispatch:
    d = await claimed_one(store, dispatch_id)
    await store.interrupt("t1", 1500)
    return d


@pytest.mark.parametrize(
    "op, reason",
    [
        ("ack", CLAIMED_SUPERSEDED_BY_EPOCH),
        ("start", CLAIMED_SUPERSEDED_BEFORE_START),
        ("result", CLAIMED_SUPERSEDED_BEFORE_RESULT),
        ("nack", CLAIMED_SUPERSEDED_BEFORE_NACK),
        ("dead_letter", CLAIMED_SUPERSEDED_BEFORE_DEAD_LETTER),
    ],
)
async def test_operations_on_a_stale_claim_supersede_it_and_fail(store, op, reason):
    d = await _stale_claim(store)
    calls = {
        "ack": lambda: store.ack("d1", d.claim_token, 2000),
        "start": lambda: store.record_dispatch_start("d1", d.claim_token, "inst", 2000),
        "result": lambda: store.record_run_result("d1", d.claim_token, result_for(d), 2000),
        "nack": lambda: store.nack("d1", d.claim_token, 3000, "e", 2000),
        "dead_letter": lambda: store.dead_letter("d1", d.claim_token, "e", 2000),
    }
    with pytest.raises(VersionConflictError) as err:
        await calls[op]()
    assert (err.value.expected, err.value.actual) == (0, 1)
    after = await store.load_dispatch("d1")
    assert after.status == S.SUPERSEDED and after.last_error == reason and after.dispatch_epoch == 1
    assert after.claim_token is None and after.dispatch_instance_id is None and after.run_status is None
    assert after.completed_at == 2000


async def test_extend_lease_on_a_stale_claim_supersedes_it(store):
    d = await _stale_claim(store)
    assert await store.extend_lease("d1", d.claim_token, LEASE, 2000) is False
    after = await store.load_dispatch("d1")
    assert after.status == S.SUPERSEDED and after.last_error == CLAIMED_SUPERSEDED_DURING_LEASE_RENEWAL


async def test_reclaim_supersedes_a_stale_expired_claim_without_returning_it(store):
    await _stale_claim(store)
    assert await store.reclaim_expired_leases(10**9, 10) == []
    after = await store.load_dispatch("d1")
    assert after.status == S.SUPERSEDED and after.last_error == CLAIMED_LEASE_EXPIRED_AFTER_INTERRUPT


async def test_supersede_claimed(store):
    assert await store.supersede_claimed("missing", "t", 1, "r") is None
    await store.enqueue(q("queued"))
    assert await store.supersede_claimed("queued", "t", 1, "r") is None
    d = await claimed_one(store, "d1", thread_id="t2")
    with pytest.raises(VersionConflictError):
        await store.supersede_claimed("d1", "wrong", 1100, "r")
    s = await store.supersede_claimed("d1", d.claim_token, 1200, "interrupt won")
    assert s.status == S.SUPERSEDED and s.last_error == "interrupt won" and s.completed_at == 1200
    assert s.claim_token is None and await store.load_dispatch("d1") == s


async def test_supersede_claimed_moves_a_stale_claim_to_the_current_epoch(store):
    d = await _stale_claim(store)
    s = await store.supersede_claimed("d1", d.claim_token, 2000, "late")
    assert s.dispatch_epoch == 1


# ---------------------------------------------------------------------- listing and counting


async def test_list_dispatches_filter_order_pagination(store):
    await store.enqueue(q("c", created_at=1003))
    await store.enqueue(q("a", created_at=1001, priority=5))
    await store.enqueue(q("b", created_at=1002))
    await store.cancel("b", 1500)
    ids = lambda rows: [d.dispatch_id for d in rows]  # noqa: E731
    assert ids(await store.list_dispatches("t1")) == ["a", "b", "c"]
    assert ids(await store.list_dispatches("t1", [S.QUEUED])) == ["a", "c"]
    assert ids(await store.list_dispatches("t1", [S.CANCELLED, S.QUEUED])) == ["a", "b", "c"]
    assert await store.list_dispatches("t1", []) == []
    assert ids(await store.list_dispatches("t1", None, 1, 1)) == ["b"]
    assert ids(await store.list_dispatches("t1", None, None, 2)) == ["c"]
    assert await store.list_dispatches("nobody") == []


async def test_count_dispatches_by_status(store):
    await store.enqueue(q("q1"))
    await store.enqueue(q("q2", thread_id="t2"))
    c = await claimed_one(store, "c1", thread_id="t3")
    a = await claimed_one(store, "a1", thread_id="t4")
    await store.ack("a1", a.claim_token, 1100)
    await store.enqueue(q("x1", thread_id="t5"))
    await store.cancel("x1", 1100)
    dl = await claimed_one(store, "dl", thread_id="t6")
    await store.dead_letter("dl", dl.claim_token, "e", 1100)
    await store.enqueue(q("s1", thread_id="t7"))
    await store.interrupt("t7", 1100)
    expected = {S.QUEUED: 2, S.CLAIMED: 1, S.ACKED: 1, S.CANCELLED: 1, S.DEAD_LETTER: 1, S.SUPERSEDED: 1}
    for status, n in expected.items():
        assert await store.count_dispatches_by_status(status) == n, status
    assert await store.count_all_by_status() == expected
    assert c.status == S.CLAIMED


async def test_list_terminal_dispatches_order_and_pages(store):
    await store.enqueue(q("q", thread_id="tq"))
    for i, (tid, updated) in enumerate([("x", 3000), ("y", 2000), ("z", 2000)]):
        await store.enqueue(q(tid, thread_id=f"t-{tid}", created_at=1000 + (10 - i)))
        await store.cancel(tid, updated)
    rows = await store.list_terminal_dispatches(10, 0)
    # updated_at, then created_at: z (created 1008) before y (created 1009)
    assert [d.dispatch_id for d in rows] == ["z", "y", "x"]
    assert [d.dispatch_id for d in await store.list_terminal_dispatches(1, 1)] == ["y"]


async def test_queued_thread_ids(store):
    await store.enqueue(q("b1", thread_id="b"))
    await store.enqueue(q("b2", thread_id="b", created_at=1001))
    await store.enqueue(q("a1", thread_id="a", available_at=10**9))
    await claimed_one(store, "c1", thread_id="c")
    await store.enqueue(q("d1", thread_id="d"))
    await store.cancel("d1", 1100)
    assert await store.queued_thread_ids() == ["a", "b"]


# ---------------------------------------------------------------------- purge


async def test_purge_terminal(store):
    for i, t in enumerate(["old", "new"]):
        await store.enqueue(q(f"{t}-d", thread_id=f"t-{t}"))
        await store.cancel(f"{t}-d", 2000 + i * 1000)
    await store.enqueue(q("live", thread_id="t-old", created_at=1001))
    await store.interrupt("t-new", 3000)  # t-new has an epoch
    await store.interrupt("t-old", 3000)
    assert await store.purge_terminal(2000) == 0  # strict
    assert await store.purge_terminal(2001) == 1
    assert await store.load_dispatch("old-d") is None
    assert (await store.load_dispatch("live")).status == S.SUPERSEDED
    assert (await store.load_dispatch("new-d")).status == S.CANCELLED
    assert await store.purge_terminal(10**12) == 2
    # a thread left with nothing restarts its epoch at 0
    assert await store.current_dispatch_epoch("t-old") == 0
    assert await store.list_dispatches("t-old") == []
    # ids are free again
    await store.enqueue(q("old-d", thread_id="elsewhere", run_id="run-old-d"))


async def test_purge_never_removes_live_dispatches(store):
    await store.enqueue(q("queued"))
    await claimed_one(store, "claimed", thread_id="t2")
    assert await store.purge_terminal(10**12) == 0
    assert (await store.load_dispatch("queued")).status == S.QUEUED
    assert (await store.load_dispatch("claimed")).status == S.CLAIMED


# ---------------------------------------------------------------------- snapshots


async def test_returned_records_are_snapshots(store):
    await store.enqueue(q("d1"))
    d = await store.load_dispatch("d1")
    with pytest.raises(AttributeError):
        d.status = S.ACKED  # type: ignore[misc]
    state = await store.read_thread("t1")
    state.dispatches.clear()
    assert (await store.load_dispatch("d1")).status == S.QUEUED


# ---------------------------------------------------------------------- concurrency


async def test_concurrent_claimers_exactly_one_wins(store):
    await store.enqueue(q("d1"))
    await store.enqueue(q("d2", created_at=1001))
    results = await asyncio.gather(*(store.claim("t1", f"w{i}", LEASE, 2000, 1) for i in range(16)))
    winners = [r for r in results if r]
    assert len(winners) == 1 and winners[0][0].dispatch_id == "d1"


async def test_concurrent_claim_dispatch_of_two_dispatches_exactly_one_wins(store):
    await store.enqueue(q("d1"))
    await store.enqueue(q("d2", created_at=1001))
    results = await asyncio.gather(
        store.claim_dispatch("d1", "a", LEASE, 2000), store.claim_dispatch("d2", "b", LEASE, 2000)
    )
    assert sum(r is not None for r in results) == 1


async def test_concurrent_reclaim_sweeps_reclaim_each_dispatch_once(store):
    for i in range(6):
        await claimed_one(store, f"d{i}", thread_id=f"t{i}")
    sweeps = await asyncio.gather(*(store.reclaim_expired_leases(10**9, 100) for _ in range(4)))
    ids = [d.dispatch_id for sweep in sweeps for d in sweep]
    assert sorted(ids) == [f"d{i}" for i in range(6)]
    for i in range(6):
        assert (await store.load_dispatch(f"d{i}")).attempt_count == 1


async def test_concurrent_enqueues_with_one_dedupe_key_store_one(store):
    results = await asyncio.gather(
        *(store.enqueue(q(f"d{i}", dedupe_key="same")) for i in range(8)), return_exceptions=True
    )
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, AlreadyExistsError) for r in results if r is not None)
    assert len(await store.list_dispatches("t1")) == 1


async def test_interrupt_racing_enqueues_leaves_no_startable_old_epoch_work(store):
    async def enqueue(i: int) -> None:
        await store.enqueue(q(f"d{i}", created_at=1000 + i))

    tasks = [enqueue(i) for i in range(10)] + [store.interrupt("t1", 5000) for _ in range(3)]
    await asyncio.gather(*tasks)
    epoch = await store.current_dispatch_epoch("t1")
    assert epoch == 3
    for d in await store.list_dispatches("t1", [S.QUEUED]):
        assert d.dispatch_epoch == epoch
    # whatever is claimable now carries the current epoch
    claimed = await store.claim("t1", "w", LEASE, 10**6, 1)
    assert all(d.dispatch_epoch == epoch for d in claimed)


# ---------------------------------------------------------------------- runs


def run(run_id: str, thread_id: str = "t1", **kw) -> RunRecord:
    return RunRecord(run_id=run_id, thread_id=thread_id, created_at=1000, updated_at=1000, **kw)


async def test_create_load_update_and_list_runs(store):
    r = run("r1", input={"text": "hi"}, dispatch_id="d1")
    await store.create_run(r, RunDispatch.queued("d1", "t1", "r1", 1000))
    assert await store.load_run("r1") == r
    assert (await store.load_dispatch("d1")).run_id == "r1"
    updated = await store.update_run("r1", lambda x: msgspec.structs.replace(x, status=RunStatus.RUNNING))
    assert updated.status == RunStatus.RUNNING and await store.load_run("r1") == updated
    await store.create_run(run("r2"))
    assert [x.run_id for x in await store.list_runs("t1")] == ["r1", "r2"]
    assert [x.run_id for x in await store.list_runs("t1", [RunStatus.CREATED])] == ["r2"]
    assert [x.run_id for x in await store.scan_runs([RunStatus.RUNNING])] == ["r1"]
    with pytest.raises(NotFoundError):
        await store.update_run("nope", lambda x: x)
    assert await store.load_run("nope") is None


async def test_create_run_rejects_duplicates(store):
    await store.create_run(run("r1"))
    with pytest.raises(AlreadyExistsError):
        await store.create_run(run("r1", input=1))
    with pytest.raises(AlreadyExistsError):
        await store.create_run(run("r1", thread_id="t2"))
    with pytest.raises(StoreError):
        await store.create_run(run("r3", input="x" * (store.max_record_bytes + 1)))
    assert await store.load_run("r3") is None


async def test_a_runs_first_dispatch_is_found_by_its_id_through_the_run(store):
    r = run("r1", dispatch_id="r1#1")
    await store.create_run(r, RunDispatch.queued("r1#1", "t1", "r1", 1000))
    assert (await store.load_dispatch("r1#1")).run_id == "r1"
    assert await store.load_dispatch("r2#1") is None  # a run that does not exist has no first dispatch
    await store.cancel("r1#1", 3000)
    assert (await store.load_dispatch("r1#1")).status == S.CANCELLED
    # purged with its run, the id is free again, like any other
    await store.update_run("r1", lambda x: msgspec.structs.replace(x, status=RunStatus.DONE, updated_at=3000))
    assert await store.purge_terminal(10**12) == 1
    assert await store.load_dispatch("r1#1") is None


async def test_dispatch_ids_ending_in_hash_1_belong_to_the_first_dispatch_of_their_run(store):
    # another run cannot take one: two dispatches named alike would be found by one id
    with pytest.raises(ValidationError) as refused:
        await store.enqueue(q("r1#1", run_id="other"))
    assert refused.value.field == "dispatch_id"
    with pytest.raises(ValidationError):
        await store.create_run(run("r2", dispatch_id="r1#1"), RunDispatch.queued("r1#1", "t1", "r2", 1000))
    assert await store.list_dispatches("t1") == [] and await store.load_run("r2") is None
    assert await store.load_run("other") is None
    # its own run's dispatch is an ordinary one: enqueued, found, unique on its thread
    await store.enqueue(q("r1#1", run_id="r1"))
    assert (await store.load_dispatch("r1#1")).run_id == "r1"
    with pytest.raises(AlreadyExistsError):
        await store.enqueue(q("r1#1", run_id="r1"))
    with pytest.raises(ValidationError):  # and the run, with it, lives on one thread
        await store.enqueue(q("r1#1", thread_id="t2", run_id="r1"))
    assert await store.list_dispatches("t2") == []


async def test_claim_can_record_the_start_in_the_same_write(store):
    await store.enqueue(q("d1"))
    [d] = await store.claim("t1", "w", LEASE, 2000, 1, start="inst-9")
    assert d.status == S.CLAIMED and d.dispatch_instance_id == "inst-9" and d.run_status == RunStatus.RUNNING
    assert await store.load_dispatch("d1") == d
    await store.complete("d1", d.claim_token, result_for(d, response="ok"), 2100)
    done = await store.load_dispatch("d1")
    assert done.status == S.ACKED and done.run_response == "ok" and done.completed_at == 2100
