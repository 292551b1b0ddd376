"""Unit tests of the store's pure decisions in `service/store/ops.py`
(spec/dispatch-contract.md §2).

Each op reads a `ThreadState` and returns `Outcome(change, result, error)`; `ops.apply`
gives the next state. No I/O, no NATS.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.model import (
    CLAIMED_LEASE_EXPIRED_AFTER_INTERRUPT,
    CLAIMED_SUPERSEDED_BEFORE_DEAD_LETTER,
    CLAIMED_SUPERSEDED_BEFORE_NACK,
    CLAIMED_SUPERSEDED_BEFORE_RESULT,
    CLAIMED_SUPERSEDED_BEFORE_START,
    CLAIMED_SUPERSEDED_BY_EPOCH,
    CLAIMED_SUPERSEDED_DURING_LEASE_RENEWAL,
    LEASE_EXPIRED_MAX_ATTEMPTS,
    QUEUED_SUPERSEDED_BY_EPOCH,
    QUEUED_SUPERSEDED_BY_INTERRUPT,
    AlreadyExistsError,
    DispatchStatus,
    NotFoundError,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    StoreError,
    ValidationError,
    VersionConflictError,
)
from service.store import ops
from service.store.ops import (
    Change,
    DeleteDispatch,
    DeleteEpoch,
    ForgetRun,
    Outcome,
    PutDispatch,
    PutEpoch,
    ThreadState,
)

S = DispatchStatus
THREAD = "t1"
CONSUMER = "worker-1"
TOKEN = "tok-1"
LEASE = 30_000
NOW = 10_000


# --------------------------------------------------------------------------- helpers


def dispatch(dispatch_id: str, *, created_at: int = 1_000, **kw: Any) -> RunDispatch:
    kw.setdefault("run_id", f"run-{dispatch_id}")
    return RunDispatch.queued(dispatch_id, kw.pop("thread_id", THREAD), kw.pop("run_id"), created_at, **kw)


def state(*records: RunDispatch, epoch: int = 0) -> ThreadState:
    """A thread holding exactly these records (no op involved)."""
    return ThreadState(thread_id=THREAD, epoch=epoch, dispatches={d.dispatch_id: d for d in records})


def commit(st: ThreadState, outcome: Outcome[Any]) -> ThreadState:
    return ops.apply(st, outcome.change)


def enqueued(*records: RunDispatch, epoch: int = 0) -> ThreadState:
    """A thread after enqueueing these records through `ops.enqueue`."""
    st = state(epoch=epoch)
    for d in records:
        st = commit(st, ops.enqueue(st, d))
    return st


def claim_one(st: ThreadState, *, token: str = TOKEN, now: int = NOW, lease_ms: int = LEASE) -> ThreadState:
    outcome = ops.claim(st, CONSUMER, token, lease_ms, now, 1)
    assert len(outcome.result) == 1
    return commit(st, outcome)


def interrupted(st: ThreadState, now: int = NOW) -> ThreadState:
    return commit(st, ops.interrupt(st, now))


def put_records(change: Change) -> list[RunDispatch]:
    return [w.record for w in change.writes if isinstance(w, PutDispatch)]


def ids(records: list[RunDispatch]) -> list[str]:
    return [d.dispatch_id for d in records]


def run(run_id: str = "run-a", *, status: RunStatus = RunStatus.CREATED, updated_at: int = 1_000) -> RunRecord:
    return RunRecord(run_id=run_id, thread_id=THREAD, status=status, created_at=500, updated_at=updated_at)


def claimed_record(dispatch_id: str = "a", *, epoch: int = 0, token: str = TOKEN, **kw: Any) -> RunDispatch:
    return dispatch(dispatch_id, **kw).prepare_for_enqueue(epoch).claim(CONSUMER, token, NOW + LEASE, NOW)


def result_for(d: RunDispatch, **kw: Any) -> RunDispatchResult:
    return RunDispatchResult(run_id=d.run_id, dispatch_instance_id="inst-1", status=RunStatus.DONE, **kw)


# --------------------------------------------------------------------------- apply / ThreadState


def test_apply_does_not_mutate_the_input_state() -> None:
    st = enqueued(dispatch("a"))
    before = msgspec.structs.asdict(st)
    before_dispatches = dict(st.dispatches)
    new = ops.apply(st, Change([PutEpoch(4), DeleteDispatch("a")]))
    assert msgspec.structs.asdict(st) == before
    assert st.dispatches == before_dispatches
    assert new.epoch == 4
    assert new.dispatches == {}


def test_apply_writes_in_order_and_delete_epoch_resets_to_zero() -> None:
    st = state(dispatch("a"), epoch=3)
    new = ops.apply(st, Change([PutEpoch(5), DeleteEpoch(), ForgetRun("x")]))
    assert new.epoch == 0
    assert set(new.dispatches) == {"a"}


def test_empty_change_is_falsy() -> None:
    assert not Change()
    assert Change([PutEpoch(1)])


def test_thread_state_claimed_lists_claimed_in_sort_order() -> None:
    b = claimed_record("b", priority=5)
    a = claimed_record("a", priority=9)
    assert ids(state(a, b, dispatch("q")).claimed()) == ["b", "a"]


# --------------------------------------------------------------------------- enqueue


def test_enqueue_writes_one_dispatch_stamped_with_the_thread_epoch() -> None:
    d = msgspec.structs.replace(dispatch("a", priority=3, available_at=5_000, attempt_count=1), dispatch_epoch=999)
    outcome = ops.enqueue(state(epoch=2), d)
    assert outcome.result is None
    assert outcome.error is None
    assert not outcome.change.atomic
    assert outcome.change.writes == [PutDispatch(msgspec.structs.replace(d, dispatch_epoch=2))]


def test_enqueue_on_a_fresh_thread_stamps_epoch_zero() -> None:
    d = msgspec.structs.replace(dispatch("a"), dispatch_epoch=999)
    (stored,) = put_records(ops.enqueue(state(), d).change)
    assert stored.dispatch_epoch == 0


def test_enqueue_keeps_caller_values() -> None:
    d = msgspec.structs.replace(
        dispatch("a", priority=0, dedupe_key="k", available_at=70_000, attempt_count=2, max_attempts=4),
        last_error="from before",
        updated_at=1_500,
    )
    (stored,) = put_records(ops.enqueue(state(), d).change)
    assert stored == d


def test_enqueue_validates_first() -> None:
    with pytest.raises(ValidationError, match="must start as Queued"):
        ops.enqueue(state(), claimed_record("a"))
    with pytest.raises(ValidationError, match="must not be empty"):
        ops.enqueue(state(), msgspec.structs.replace(dispatch("a"), run_id=" "))


@pytest.mark.parametrize("status", list(DispatchStatus))
def test_enqueue_rejects_an_existing_dispatch_id_in_any_status(status: DispatchStatus) -> None:
    existing = {
        S.QUEUED: dispatch("a"),
        S.CLAIMED: claimed_record("a"),
        S.ACKED: claimed_record("a").mark_acked(NOW),
        S.CANCELLED: dispatch("a").mark_cancelled(NOW),
        S.SUPERSEDED: dispatch("a").mark_superseded(NOW),
        S.DEAD_LETTER: claimed_record("a").mark_dead_letter(NOW, "x"),
    }[status]
    with pytest.raises(AlreadyExistsError, match="'a' already exists"):
        ops.enqueue(state(existing), dispatch("a", created_at=2_000))


@pytest.mark.parametrize(
    "holder",
    [dispatch("a", dedupe_key="k"), claimed_record("a", dedupe_key="k")],
    ids=["queued", "claimed"],
)
def test_enqueue_rejects_a_dedupe_key_held_by_a_live_dispatch(holder: RunDispatch) -> None:
    with pytest.raises(AlreadyExistsError, match="dedupe_key=k"):
        ops.enqueue(state(holder), dispatch("b", dedupe_key="k"))


@pytest.mark.parametrize(
    "holder",
    [
        claimed_record("a", dedupe_key="k").mark_acked(NOW),
        dispatch("a", dedupe_key="k").mark_cancelled(NOW),
        dispatch("a", dedupe_key="k").mark_superseded(NOW),
        claimed_record("a", dedupe_key="k").mark_dead_letter(NOW, "x"),
    ],
    ids=["acked", "cancelled", "superseded", "dead_letter"],
)
def test_enqueue_reuses_a_dedupe_key_once_its_holder_is_terminal(holder: RunDispatch) -> None:
    (stored,) = put_records(ops.enqueue(state(holder), dispatch("b", dedupe_key="k")).change)
    assert stored.dedupe_key == "k"


def test_enqueue_never_dedupes_a_missing_key_or_different_keys() -> None:
    st = enqueued(dispatch("a"), dispatch("b"), dispatch("c", dedupe_key="k1"), dispatch("d", dedupe_key="k2"))
    assert set(st.dispatches) == {"a", "b", "c", "d"}


# --------------------------------------------------------------------------- claim


def test_claim_orders_by_priority_then_created_at_then_id() -> None:
    st = enqueued(
        dispatch("late-high", priority=1, created_at=3_000),
        dispatch("low", priority=200, created_at=1),
        dispatch("early-high", priority=1, created_at=2_000),
        dispatch("tie-b", priority=1, created_at=2_500),
        dispatch("tie-a", priority=1, created_at=2_500),
    )
    outcome = ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 10)
    assert ids(outcome.result) == ["early-high", "tie-a", "tie-b", "late-high", "low"]


def test_claim_sets_the_claim_fields_with_one_token_for_the_batch() -> None:
    st = enqueued(dispatch("a"), dispatch("b", created_at=1_001))
    outcome = ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 2)
    for d in outcome.result:
        assert d.status == S.CLAIMED
        assert d.claim_token == TOKEN
        assert d.claimed_by == CONSUMER
        assert d.lease_until == NOW + LEASE
        assert d.updated_at == NOW
        assert d.attempt_count == 0
    assert put_records(outcome.change) == outcome.result
    assert outcome.error is None


def test_claim_takes_only_the_highest_with_limit_one() -> None:
    st = enqueued(dispatch("a", priority=5), dispatch("b", priority=4))
    outcome = ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 1)
    assert ids(outcome.result) == ["b"]
    assert ids(put_records(outcome.change)) == ["b"]
    assert commit(st, outcome).dispatches["a"].status == S.QUEUED


def test_claim_respects_limit() -> None:
    st = enqueued(dispatch("a"), dispatch("b", created_at=1_001), dispatch("c", created_at=1_002))
    outcome = ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 2)
    assert ids(outcome.result) == ["a", "b"]
    assert commit(st, outcome).dispatches["c"].status == S.QUEUED


def test_claim_with_limit_zero_claims_nothing() -> None:
    outcome = ops.claim(enqueued(dispatch("a")), CONSUMER, TOKEN, LEASE, NOW, 0)
    assert outcome.result == []
    assert not outcome.change


def test_claim_change_is_atomic_only_for_several_claims() -> None:
    st = enqueued(dispatch("a"), dispatch("b", created_at=1_001))
    assert ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 2).change.atomic is True
    assert ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 1).change.atomic is False


def test_claim_available_at_is_inclusive() -> None:
    st = enqueued(dispatch("due", available_at=NOW), dispatch("later", available_at=NOW + 1, priority=0))
    outcome = ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 10)
    assert ids(outcome.result) == ["due"]


def test_claim_of_only_delayed_work_returns_nothing() -> None:
    outcome = ops.claim(enqueued(dispatch("a", available_at=NOW + 1)), CONSUMER, TOKEN, LEASE, NOW, 1)
    assert outcome.result == []
    assert not outcome.change


def test_claim_on_an_empty_thread_returns_nothing() -> None:
    outcome = ops.claim(state(), CONSUMER, TOKEN, LEASE, NOW, 1)
    assert outcome.result == []
    assert not outcome.change


def test_claim_ignores_terminal_dispatches() -> None:
    st = state(dispatch("gone").mark_cancelled(5), dispatch("done").mark_superseded(5))
    assert ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 5).result == []


@pytest.mark.parametrize("lease_offset", [LEASE, -1], ids=["live-lease", "expired-lease"])
def test_claim_is_blocked_by_a_claimed_dispatch(lease_offset: int) -> None:
    holder = dispatch("a").claim("other", "other-token", NOW + lease_offset, NOW - 5_000)
    st = state(holder, dispatch("b"))
    outcome = ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 1)
    assert outcome.result == []
    assert not outcome.change


def test_claim_is_free_again_after_the_claimed_dispatch_ends() -> None:
    st = claim_one(enqueued(dispatch("a"), dispatch("b", created_at=1_001)))
    st = commit(st, ops.ack(st, "a", TOKEN, NOW + 1))
    outcome = ops.claim(st, CONSUMER, "tok-2", LEASE, NOW + 2, 1)
    assert ids(outcome.result) == ["b"]


def test_claim_supersedes_stale_queued_first() -> None:
    stale = dispatch("stale", priority=0).prepare_for_enqueue(1)
    fresh = dispatch("fresh", priority=9).prepare_for_enqueue(2)
    outcome = ops.claim(state(stale, fresh, epoch=2), CONSUMER, TOKEN, LEASE, NOW, 5)
    assert ids(outcome.result) == ["fresh"]
    superseded, claimed = put_records(outcome.change)
    assert superseded.dispatch_id == "stale"
    assert superseded.status == S.SUPERSEDED
    assert superseded.dispatch_epoch == 2  # rewritten to the current epoch
    assert superseded.last_error == QUEUED_SUPERSEDED_BY_EPOCH
    assert superseded.completed_at == superseded.updated_at == NOW
    assert claimed.dispatch_id == "fresh"


@pytest.mark.parametrize(
    ("extra", "limit"),
    [((claimed_record("held", epoch=2, token="other"),), 1), ((), 0)],
    ids=["thread-busy", "limit-zero"],
)
def test_claim_supersedes_stale_queued_even_when_it_returns_nothing(extra: tuple[RunDispatch, ...], limit: int) -> None:
    stale = dispatch("stale").prepare_for_enqueue(1)
    outcome = ops.claim(state(stale, *extra, epoch=2), CONSUMER, TOKEN, LEASE, NOW, limit)
    assert outcome.result == []
    (superseded,) = put_records(outcome.change)
    assert (superseded.dispatch_id, superseded.status) == ("stale", S.SUPERSEDED)
    assert superseded.last_error == QUEUED_SUPERSEDED_BY_EPOCH


def test_claim_with_only_stale_work_supersedes_it_and_returns_nothing() -> None:
    stale = dispatch("stale").prepare_for_enqueue(0)
    outcome = ops.claim(state(stale, epoch=1), CONSUMER, TOKEN, LEASE, NOW, 1)
    assert outcome.result == []
    assert [d.status for d in put_records(outcome.change)] == [S.SUPERSEDED]


def test_claim_replay_with_the_same_token_returns_the_earlier_claim_unchanged() -> None:
    st = enqueued(dispatch("a"), dispatch("b", created_at=1_001), dispatch("c", created_at=1_002))
    first = ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 2)
    st = commit(st, first)
    replay = ops.claim(st, CONSUMER, TOKEN, LEASE, NOW + 500, 2)
    assert replay.result == first.result
    assert not replay.change


def test_claim_with_another_token_after_a_claim_gets_nothing() -> None:
    st = claim_one(enqueued(dispatch("a"), dispatch("b", created_at=1_001)))
    assert ops.claim(st, CONSUMER, "tok-2", LEASE, NOW, 1).result == []


# --------------------------------------------------------------------------- claim_dispatch


def test_claim_dispatch_claims_the_named_dispatch() -> None:
    st = enqueued(dispatch("a", priority=0), dispatch("b", priority=255))
    outcome = ops.claim_dispatch(st, "b", CONSUMER, TOKEN, LEASE, NOW)
    assert outcome.result is not None
    assert outcome.result.dispatch_id == "b"
    assert outcome.result.status == S.CLAIMED
    assert outcome.result.claim_token == TOKEN
    assert outcome.result.claimed_by == CONSUMER
    assert outcome.result.lease_until == NOW + LEASE
    assert put_records(outcome.change) == [outcome.result]


def test_claim_dispatch_ignores_available_at() -> None:
    st = enqueued(dispatch("a", available_at=NOW + 60_000))
    assert ops.claim_dispatch(st, "a", CONSUMER, TOKEN, LEASE, NOW).result is not None


def test_claim_dispatch_of_an_unknown_id_returns_none() -> None:
    outcome = ops.claim_dispatch(state(), "nope", CONSUMER, TOKEN, LEASE, NOW)
    assert outcome.result is None
    assert not outcome.change


@pytest.mark.parametrize(
    "record",
    [
        claimed_record("a", token="someone-else"),
        dispatch("a").mark_cancelled(5),
        claimed_record("a").mark_acked(NOW),
    ],
    ids=["claimed-by-other", "cancelled", "acked"],
)
def test_claim_dispatch_of_a_non_queued_dispatch_returns_none(record: RunDispatch) -> None:
    outcome = ops.claim_dispatch(state(record), "a", CONSUMER, TOKEN, LEASE, NOW)
    assert outcome.result is None
    assert not outcome.change


def test_claim_dispatch_returns_none_while_another_dispatch_is_claimed() -> None:
    st = state(claimed_record("a", token="other"), dispatch("b"))
    outcome = ops.claim_dispatch(st, "b", CONSUMER, TOKEN, LEASE, NOW)
    assert outcome.result is None
    assert not outcome.change


def test_claim_dispatch_supersedes_a_stale_dispatch_and_returns_none() -> None:
    st = state(dispatch("a").prepare_for_enqueue(0), epoch=3)
    outcome = ops.claim_dispatch(st, "a", CONSUMER, TOKEN, LEASE, NOW)
    assert outcome.result is None
    (superseded,) = put_records(outcome.change)
    assert superseded.status == S.SUPERSEDED
    assert superseded.dispatch_epoch == 3
    assert superseded.last_error == QUEUED_SUPERSEDED_BY_EPOCH


def test_claim_dispatch_replay_with_the_same_token_returns_the_claim() -> None:
    st = enqueued(dispatch("a"))
    first = ops.claim_dispatch(st, "a", CONSUMER, TOKEN, LEASE, NOW)
    st = commit(st, first)
    replay = ops.claim_dispatch(st, "a", CONSUMER, TOKEN, LEASE, NOW + 100)
    assert replay.result == first.result
    assert not replay.change


# --------------------------------------------------------------------------- token-checked ops

TOKEN_OPS: dict[str, Any] = {
    "ack": lambda st, i, tok, now: ops.ack(st, i, tok, now),
    "record_dispatch_start": lambda st, i, tok, now: ops.record_dispatch_start(st, i, tok, "inst-1", now),
    "record_run_result": lambda st, i, tok, now: ops.record_run_result(
        st, i, tok, RunDispatchResult(run_id=f"run-{i}", dispatch_instance_id="inst-1", status=RunStatus.DONE), now
    ),
    "nack": lambda st, i, tok, now: ops.nack(st, i, tok, now + 1_000, "retry", now),
    "dead_letter": lambda st, i, tok, now: ops.dead_letter(st, i, tok, "fatal", now),
}
STALE_REASONS = {
    "ack": CLAIMED_SUPERSEDED_BY_EPOCH,
    "record_dispatch_start": CLAIMED_SUPERSEDED_BEFORE_START,
    "record_run_result": CLAIMED_SUPERSEDED_BEFORE_RESULT,
    "nack": CLAIMED_SUPERSEDED_BEFORE_NACK,
    "dead_letter": CLAIMED_SUPERSEDED_BEFORE_DEAD_LETTER,
}
token_op_names = pytest.mark.parametrize("name", list(TOKEN_OPS))


@token_op_names
def test_token_op_on_an_unknown_dispatch_raises_not_found(name: str) -> None:
    with pytest.raises(NotFoundError) as err:
        TOKEN_OPS[name](state(), "nope", TOKEN, NOW)
    assert err.value.id == "nope"


@token_op_names
def test_token_op_with_a_wrong_token_raises_version_conflict_0_1(name: str) -> None:
    with pytest.raises(VersionConflictError) as err:
        TOKEN_OPS[name](state(claimed_record("a")), "a", "wrong", NOW)
    assert (err.value.expected, err.value.actual) == (0, 1)


@token_op_names
@pytest.mark.parametrize(
    "record",
    [dispatch("a"), dispatch("a").mark_cancelled(5), claimed_record("a").mark_acked(NOW)],
    ids=["queued", "cancelled", "acked"],
)
def test_token_op_on_an_unclaimed_dispatch_raises_version_conflict(name: str, record: RunDispatch) -> None:
    with pytest.raises(VersionConflictError) as err:
        TOKEN_OPS[name](state(record), "a", TOKEN, NOW)
    assert (err.value.expected, err.value.actual) == (0, 1)


@token_op_names
def test_token_op_with_a_wrong_token_on_a_stale_claim_does_not_supersede(name: str) -> None:
    # the token check comes first: a stranger cannot supersede someone else's claim
    with pytest.raises(VersionConflictError) as err:
        TOKEN_OPS[name](state(claimed_record("a", epoch=0), epoch=1), "a", "wrong", NOW)
    assert (err.value.expected, err.value.actual) == (0, 1)


@token_op_names
def test_token_op_on_a_stale_claim_supersedes_it_and_reports_a_conflict(name: str) -> None:
    st = state(claimed_record("a", epoch=1).record_dispatch_start("inst-0", NOW), epoch=3)
    outcome = TOKEN_OPS[name](st, "a", TOKEN, NOW + 7)
    # the supersede is written even though the call fails
    (superseded,) = put_records(outcome.change)
    assert superseded.status == S.SUPERSEDED
    assert superseded.dispatch_epoch == 3
    assert superseded.last_error == STALE_REASONS[name]
    assert superseded.claim_token is None
    assert superseded.claimed_by is None
    assert superseded.lease_until is None
    assert superseded.dispatch_instance_id is None
    assert superseded.run_status is None
    assert superseded.completed_at == superseded.updated_at == NOW + 7
    assert superseded.attempt_count == 0
    assert outcome.result is None
    assert isinstance(outcome.error, VersionConflictError)
    assert (outcome.error.expected, outcome.error.actual) == (1, 3)
    assert outcome.error.id == "a"


def test_ack_marks_acked_and_keeps_the_runtime_projection() -> None:
    st = claim_one(enqueued(dispatch("a")))
    st = commit(st, ops.record_dispatch_start(st, "a", TOKEN, "inst-1", NOW + 1))
    result = RunDispatchResult(run_id="run-a", dispatch_instance_id="inst-1", status=RunStatus.DONE, response="hi")
    st = commit(st, ops.record_run_result(st, "a", TOKEN, result, NOW + 2))
    outcome = ops.ack(st, "a", TOKEN, NOW + 3)
    assert outcome.result is None and outcome.error is None
    (acked,) = put_records(outcome.change)
    assert acked.status == S.ACKED
    assert acked.claim_token is None and acked.claimed_by is None and acked.lease_until is None
    assert acked.completed_at == acked.updated_at == NOW + 3
    assert acked.run_status == RunStatus.DONE
    assert acked.run_response == "hi"
    assert acked.dispatch_instance_id == "inst-1"


def test_ack_after_the_lease_passed_but_before_reclaim_succeeds() -> None:
    st = claim_one(enqueued(dispatch("a")))
    (acked,) = put_records(ops.ack(st, "a", TOKEN, NOW + LEASE + 1).change)
    assert acked.status == S.ACKED


def test_record_dispatch_start_sets_running() -> None:
    st = claim_one(enqueued(dispatch("a")))
    (started,) = put_records(ops.record_dispatch_start(st, "a", TOKEN, "inst-7", NOW + 1).change)
    assert started.status == S.CLAIMED
    assert started.dispatch_instance_id == "inst-7"
    assert started.run_status == RunStatus.RUNNING
    assert started.updated_at == NOW + 1


def test_record_run_result_keeps_the_claim_and_sets_completed_at() -> None:
    st = claim_one(enqueued(dispatch("a")))
    d = st.dispatches["a"]
    (recorded,) = put_records(ops.record_run_result(st, "a", TOKEN, result_for(d, error="e"), NOW + 1).change)
    assert recorded.status == S.CLAIMED
    assert recorded.claim_token == TOKEN
    assert recorded.run_status == RunStatus.DONE
    assert recorded.run_error == "e"
    assert recorded.completed_at == NOW + 1


def test_record_run_result_for_another_run_is_a_validation_error() -> None:
    st = claim_one(enqueued(dispatch("a")))
    wrong = RunDispatchResult(run_id="other", dispatch_instance_id="i", status=RunStatus.DONE)
    with pytest.raises(ValidationError, match="does not match"):
        ops.record_run_result(st, "a", TOKEN, wrong, NOW)


def test_nack_requeues_at_retry_at_and_counts_the_attempt() -> None:
    st = claim_one(enqueued(dispatch("a", max_attempts=2)))
    st = commit(st, ops.nack(st, "a", TOKEN, NOW + 5_000, "boom", NOW + 1))
    d = st.dispatches["a"]
    assert (d.status, d.attempt_count, d.available_at, d.last_error) == (S.QUEUED, 1, NOW + 5_000, "boom")
    assert d.claim_token is None
    # a thread-scan claim before retry_at skips it; at retry_at it is claimable again
    assert ops.claim(st, CONSUMER, "tok-2", LEASE, NOW + 4_999, 1).result == []
    st = commit(st, ops.claim(st, CONSUMER, "tok-2", LEASE, NOW + 5_000, 1))
    st = commit(st, ops.nack(st, "a", "tok-2", NOW + 9_000, "boom again", NOW + 6_000))
    d = st.dispatches["a"]
    assert (d.status, d.attempt_count, d.last_error, d.completed_at) == (S.DEAD_LETTER, 2, "boom again", NOW + 6_000)


def test_dead_letter_does_not_count_an_attempt() -> None:
    st = claim_one(enqueued(dispatch("a", attempt_count=1)))
    (dead,) = put_records(ops.dead_letter(st, "a", TOKEN, "fatal", NOW + 1).change)
    assert (dead.status, dead.attempt_count, dead.last_error) == (S.DEAD_LETTER, 1, "fatal")
    assert dead.completed_at == dead.updated_at == NOW + 1


# --------------------------------------------------------------------------- extend_lease


def test_extend_lease_measures_the_new_lease_from_now() -> None:
    st = claim_one(enqueued(dispatch("a")), now=1_000, lease_ms=30_000)
    outcome = ops.extend_lease(st, "a", TOKEN, 60_000, 15_000)
    assert outcome.result is True
    assert outcome.error is None
    (extended,) = put_records(outcome.change)
    assert extended.lease_until == 75_000
    assert extended.updated_at == 15_000
    assert extended.status == S.CLAIMED


def test_extend_lease_works_on_an_expired_but_unreclaimed_lease() -> None:
    st = claim_one(enqueued(dispatch("a")))
    assert ops.extend_lease(st, "a", TOKEN, 1_000, NOW + LEASE + 50).result is True


@pytest.mark.parametrize(
    ("records", "dispatch_id", "token"),
    [
        ((), "nope", TOKEN),
        ((dispatch("a"),), "a", TOKEN),
        ((claimed_record("a"),), "a", "wrong"),
        ((claimed_record("a").mark_acked(NOW),), "a", TOKEN),
    ],
    ids=["unknown", "queued", "wrong-token", "acked"],
)
def test_extend_lease_returns_false_without_a_change(
    records: tuple[RunDispatch, ...], dispatch_id: str, token: str
) -> None:
    outcome = ops.extend_lease(state(*records), dispatch_id, token, 1_000, NOW)
    assert outcome.result is False
    assert not outcome.change
    assert outcome.error is None


def test_extend_lease_after_a_reclaim_returns_false() -> None:
    st = claim_one(enqueued(dispatch("a")))
    st = commit(st, ops.reclaim_expired(st, "a", NOW + LEASE + 1))
    assert ops.extend_lease(st, "a", TOKEN, 1_000, NOW + LEASE + 2).result is False


def test_extend_lease_on_a_stale_claim_supersedes_it_and_returns_false() -> None:
    st = interrupted(claim_one(enqueued(dispatch("a"))))
    outcome = ops.extend_lease(st, "a", TOKEN, 1_000, NOW + 1)
    assert outcome.result is False
    assert outcome.error is None
    (superseded,) = put_records(outcome.change)
    assert superseded.status == S.SUPERSEDED
    assert superseded.claim_token is None
    assert superseded.dispatch_epoch == 1
    assert superseded.last_error == CLAIMED_SUPERSEDED_DURING_LEASE_RENEWAL


# --------------------------------------------------------------------------- supersede_claimed


def test_supersede_claimed_supersedes_a_live_claim_with_the_reason() -> None:
    st = claim_one(enqueued(dispatch("a")))
    st = commit(st, ops.record_dispatch_start(st, "a", TOKEN, "inst-1", NOW + 1))
    outcome = ops.supersede_claimed(st, "a", TOKEN, NOW + 2, "interrupt won")
    d = outcome.result
    assert d is not None
    assert put_records(outcome.change) == [d]
    assert d.status == S.SUPERSEDED
    assert d.last_error == "interrupt won"
    assert (d.claim_token, d.claimed_by, d.lease_until) == (None, None, None)
    assert (d.dispatch_instance_id, d.run_status) == (None, None)
    assert d.completed_at == d.updated_at == NOW + 2
    assert d.dispatch_epoch == 0


def test_supersede_claimed_on_a_stale_claim_writes_the_current_epoch() -> None:
    st = interrupted(interrupted(claim_one(enqueued(dispatch("a")))))
    outcome = ops.supersede_claimed(st, "a", TOKEN, NOW + 2, "why")
    assert outcome.error is None
    assert outcome.result is not None
    assert outcome.result.dispatch_epoch == 2


def test_supersede_claimed_never_lowers_the_epoch() -> None:
    st = state(claimed_record("a", epoch=5), epoch=2)
    outcome = ops.supersede_claimed(st, "a", TOKEN, NOW, "why")
    assert outcome.result is not None
    assert outcome.result.dispatch_epoch == 5


@pytest.mark.parametrize(
    "records",
    [(), (dispatch("a"),), (claimed_record("a").mark_acked(NOW),)],
    ids=["unknown", "queued", "acked"],
)
def test_supersede_claimed_returns_none_when_not_claimed(records: tuple[RunDispatch, ...]) -> None:
    outcome = ops.supersede_claimed(state(*records), "a", TOKEN, NOW, "why")
    assert outcome.result is None
    assert not outcome.change


def test_supersede_claimed_with_a_wrong_token_raises_version_conflict() -> None:
    with pytest.raises(VersionConflictError) as err:
        ops.supersede_claimed(state(claimed_record("a")), "a", "wrong", NOW, "why")
    assert (err.value.expected, err.value.actual) == (0, 1)


# --------------------------------------------------------------------------- cancel


def test_cancel_cancels_a_queued_dispatch() -> None:
    st = enqueued(dispatch("a", available_at=NOW + 99))
    outcome = ops.cancel(st, "a", NOW)
    d = outcome.result
    assert d is not None
    assert put_records(outcome.change) == [d]
    assert d.status == S.CANCELLED
    assert d.completed_at == d.updated_at == NOW


def test_cancel_ignores_the_epoch() -> None:
    outcome = ops.cancel(state(dispatch("a"), epoch=4), "a", NOW)
    assert outcome.result is not None
    assert outcome.result.status == S.CANCELLED


@pytest.mark.parametrize(
    "records",
    [
        (),
        (claimed_record("a"),),
        (dispatch("a").mark_cancelled(5),),
        (claimed_record("a").mark_dead_letter(NOW, "x"),),
    ],
    ids=["unknown", "claimed", "cancelled", "dead_letter"],
)
def test_cancel_returns_none_and_changes_nothing_unless_queued(records: tuple[RunDispatch, ...]) -> None:
    outcome = ops.cancel(state(*records), "a", NOW)
    assert outcome.result is None
    assert not outcome.change


def test_cancel_frees_the_dedupe_key() -> None:
    st = enqueued(dispatch("a", dedupe_key="k"))
    st = commit(st, ops.cancel(st, "a", NOW))
    st = commit(st, ops.enqueue(st, dispatch("b", dedupe_key="k")))
    assert st.dispatches["b"].status == S.QUEUED


# --------------------------------------------------------------------------- interrupt


def test_interrupt_on_an_empty_thread_bumps_the_epoch_to_one() -> None:
    outcome = ops.interrupt(state(), NOW)
    assert outcome.change.writes == [PutEpoch(1)]
    assert outcome.change.atomic is True
    assert outcome.result.new_dispatch_epoch == 1
    assert outcome.result.active_dispatch is None
    assert outcome.result.superseded == []
    assert outcome.result.superseded_count == 0
    assert outcome.error is None


def test_interrupt_supersedes_all_queued_including_delayed_ones() -> None:
    st = enqueued(dispatch("a"), dispatch("delayed", available_at=NOW + 60_000), dispatch("b", created_at=900))
    outcome = ops.interrupt(st, NOW)
    writes = outcome.change.writes
    assert writes[0] == PutEpoch(1)  # the epoch bump comes first
    assert outcome.change.atomic is True
    superseded = outcome.result.superseded
    assert sorted(ids(superseded)) == ["a", "b", "delayed"]
    assert put_records(outcome.change) == superseded
    assert outcome.result.superseded_count == 3
    for d in superseded:
        assert d.status == S.SUPERSEDED
        assert d.last_error == QUEUED_SUPERSEDED_BY_INTERRUPT
        assert d.dispatch_epoch == 0  # the epoch field is left as it was
        assert d.completed_at == d.updated_at == NOW


def test_interrupt_reports_the_claimed_dispatch_without_changing_it() -> None:
    st = claim_one(enqueued(dispatch("active"), dispatch("waiting", created_at=1_001)))
    outcome = ops.interrupt(st, NOW + 1)
    assert outcome.result.active_dispatch == st.dispatches["active"]
    assert outcome.result.active_dispatch.status == S.CLAIMED
    assert "active" not in ids(put_records(outcome.change))
    assert ids(outcome.result.superseded) == ["waiting"]
    after = commit(st, outcome)
    assert after.dispatches["active"] == st.dispatches["active"]
    assert after.epoch == 1


def test_interrupt_leaves_terminal_dispatches_alone() -> None:
    acked = claimed_record("a").mark_acked(NOW)
    cancelled = dispatch("c").mark_cancelled(NOW)
    outcome = ops.interrupt(state(acked, cancelled), NOW + 1)
    assert outcome.change.writes == [PutEpoch(1)]


def test_interrupt_increments_the_current_epoch() -> None:
    st = interrupted(interrupted(state()))
    assert st.epoch == 2
    assert ops.interrupt(st, NOW).result.new_dispatch_epoch == 3


def test_interrupt_makes_the_active_claim_stale() -> None:
    st = interrupted(claim_one(enqueued(dispatch("a"))))
    outcome = ops.ack(st, "a", TOKEN, NOW + 5)
    assert isinstance(outcome.error, VersionConflictError)
    assert (outcome.error.expected, outcome.error.actual) == (0, 1)
    assert commit(st, outcome).dispatches["a"].status == S.SUPERSEDED


def test_work_enqueued_after_an_interrupt_gets_the_new_epoch_and_can_run() -> None:
    st = interrupted(enqueued(dispatch("old")))
    st = commit(st, ops.enqueue(st, dispatch("new", created_at=2_000)))
    assert st.dispatches["new"].dispatch_epoch == 1
    outcome = ops.claim(st, CONSUMER, TOKEN, LEASE, NOW, 5)
    assert ids(outcome.result) == ["new"]


# --------------------------------------------------------------------------- reclaim_expired


def test_reclaim_keeps_a_lease_that_ends_exactly_now() -> None:
    st = claim_one(enqueued(dispatch("a")))
    outcome = ops.reclaim_expired(st, "a", NOW + LEASE)
    assert outcome.result is None
    assert not outcome.change


def test_reclaim_requeues_an_expired_lease() -> None:
    st = claim_one(enqueued(dispatch("a", available_at=500)))
    st = commit(st, ops.record_dispatch_start(st, "a", TOKEN, "inst-1", NOW + 1))
    later = NOW + LEASE + 1
    outcome = ops.reclaim_expired(st, "a", later)
    d = outcome.result
    assert d is not None
    assert put_records(outcome.change) == [d]
    assert d.status == S.QUEUED
    assert d.attempt_count == 1
    assert d.available_at == later
    assert d.updated_at == later
    assert (d.claim_token, d.claimed_by, d.lease_until) == (None, None, None)
    assert (d.dispatch_instance_id, d.run_status, d.completed_at) == (None, None, None)
    assert d.last_error is None


def test_reclaim_dead_letters_when_attempts_are_used_up() -> None:
    st = claim_one(enqueued(dispatch("a", max_attempts=1)))
    later = NOW + LEASE + 1
    outcome = ops.reclaim_expired(st, "a", later)
    d = outcome.result
    assert d is not None
    assert d.status == S.DEAD_LETTER
    assert d.attempt_count == 1
    assert d.last_error == LEASE_EXPIRED_MAX_ATTEMPTS
    assert d.completed_at == later


def test_reclaim_supersedes_a_stale_expired_claim_and_does_not_return_it() -> None:
    st = interrupted(claim_one(enqueued(dispatch("a"))))
    outcome = ops.reclaim_expired(st, "a", NOW + LEASE + 1)
    assert outcome.result is None
    assert outcome.error is None
    (superseded,) = put_records(outcome.change)
    assert superseded.status == S.SUPERSEDED
    assert superseded.dispatch_epoch == 1
    assert superseded.last_error == CLAIMED_LEASE_EXPIRED_AFTER_INTERRUPT
    assert superseded.attempt_count == 0


@pytest.mark.parametrize(
    "records",
    [(), (dispatch("a"),), (claimed_record("a").mark_acked(NOW),)],
    ids=["unknown", "queued", "acked"],
)
def test_reclaim_ignores_anything_not_claimed(records: tuple[RunDispatch, ...]) -> None:
    outcome = ops.reclaim_expired(state(*records), "a", NOW * 100)
    assert outcome.result is None
    assert not outcome.change


def test_reclaim_is_idempotent() -> None:
    st = claim_one(enqueued(dispatch("a")))
    later = NOW + LEASE + 1
    st = commit(st, ops.reclaim_expired(st, "a", later))
    again = ops.reclaim_expired(st, "a", later + 1)
    assert again.result is None
    assert not again.change


# --------------------------------------------------------------------------- purge_terminal


def terminal(dispatch_id: str, at: int, **kw: Any) -> RunDispatch:
    return dispatch(dispatch_id, **kw).mark_cancelled(at)


def test_purge_deletes_terminal_dispatches_strictly_older_than() -> None:
    st = state(terminal("old", 99), terminal("edge", 100), terminal("new", 101), epoch=0)
    outcome = ops.purge_terminal(st, 100, set())
    assert outcome.result == 1
    assert DeleteDispatch("old") in outcome.change.writes
    assert set(commit(st, outcome).dispatches) == {"edge", "new"}


def test_purge_never_deletes_live_dispatches() -> None:
    queued = dispatch("q", created_at=1)
    claimed = claimed_record("c", created_at=1)
    outcome = ops.purge_terminal(state(queued, claimed), 10**12, set())
    assert outcome.result == 0
    assert not outcome.change


@pytest.mark.parametrize(
    "record",
    [
        claimed_record("a").mark_acked(50),
        dispatch("a").mark_cancelled(50),
        dispatch("a").mark_superseded(50),
        claimed_record("a").mark_dead_letter(50, "x"),
    ],
    ids=["acked", "cancelled", "superseded", "dead_letter"],
)
def test_purge_deletes_every_terminal_status(record: RunDispatch) -> None:
    assert ops.purge_terminal(state(record), 51, set()).result == 1


def test_purge_keeps_run_ids_that_have_a_run_record() -> None:
    st = state(terminal("a", 50, run_id="run-a"))
    outcome = ops.purge_terminal(st, 100, {"run-a"})
    assert outcome.change.writes == [DeleteDispatch("a")]  # the run's own purge releases it


def test_purge_run_deletes_a_done_run_once_no_dispatch_refers_to_it() -> None:
    done = run("run-a", status=RunStatus.DONE, updated_at=50)
    assert ops.purge_run(done, 100, set()).delete
    assert not ops.purge_run(done, 100, {"run-a"}).delete  # still referenced (a replay, say)
    assert not ops.purge_run(done, 50, set()).delete  # strict: updated_at < older_than
    waiting = run("run-a", status=RunStatus.WAITING, updated_at=50)
    assert not ops.purge_run(waiting, 100, set()).delete
    assert not ops.purge_run(None, 100, set()).delete


def test_purge_forgets_run_ids_used_only_by_bare_dispatches() -> None:
    st = state(
        terminal("a1", 50, run_id="bare"),
        terminal("a2", 60, run_id="bare"),
        terminal("b1", 50, run_id="shared"),
        dispatch("b2", run_id="shared", created_at=70),
    )
    outcome = ops.purge_terminal(st, 100, set())
    forgotten = [w for w in outcome.change.writes if isinstance(w, ForgetRun)]
    assert forgotten == [ForgetRun("bare")]


def test_purge_drops_the_epoch_only_when_the_thread_is_left_empty() -> None:
    st = state(terminal("a", 50, run_id="run-a"), epoch=3)
    outcome = ops.purge_terminal(st, 100, set())
    assert DeleteEpoch() in outcome.change.writes
    after = commit(st, outcome)
    assert after.epoch == 0
    assert after.is_empty()


def test_purge_keeps_the_epoch_while_any_dispatch_remains() -> None:
    st = state(terminal("a", 50), terminal("b", 150), epoch=3)
    outcome = ops.purge_terminal(st, 100, set())
    assert DeleteEpoch() not in outcome.change.writes
    assert commit(st, outcome).epoch == 3


def test_purge_does_not_delete_a_zero_epoch() -> None:
    outcome = ops.purge_terminal(state(terminal("a", 50), epoch=0), 100, set())
    assert DeleteEpoch() not in outcome.change.writes


def test_purge_with_nothing_to_delete_writes_nothing() -> None:
    outcome = ops.purge_terminal(state(terminal("a", 500), epoch=2), 100, set())
    assert outcome.result == 0
    assert not outcome.change


def test_after_a_full_purge_the_thread_epoch_restarts_at_zero() -> None:
    st = interrupted(enqueued(dispatch("a")))
    st = commit(st, ops.purge_terminal(st, NOW + 1, set()))
    st = commit(st, ops.enqueue(st, dispatch("b", created_at=NOW + 2)))
    assert st.dispatches["b"].dispatch_epoch == 0
    assert ids(ops.claim(st, CONSUMER, TOKEN, LEASE, NOW + 3, 1).result) == ["b"]


# --------------------------------------------------------------------------- create_run / update_run


def test_create_run_writes_a_new_run() -> None:
    r = run("run-a")
    assert ops.create_run(None, r).record == r


def test_create_run_is_idempotent_for_the_same_run_record() -> None:
    r = run("run-a")
    decision = ops.create_run(r, r)
    assert decision.record is None and not decision.delete


def test_create_run_rejects_a_different_run_with_the_same_id() -> None:
    other = msgspec.structs.replace(run("run-a"), input="different")
    with pytest.raises(AlreadyExistsError):
        ops.create_run(run("run-a"), other)


def test_create_run_validates_the_run() -> None:
    with pytest.raises(ValidationError):
        ops.create_run(None, msgspec.structs.replace(run(), priority=300))
    with pytest.raises(ValidationError):
        ops.create_run(None, msgspec.structs.replace(run(), run_id=" "))


def test_update_run_writes_the_new_record() -> None:
    r = run("run-a")
    decision = ops.update_run(r, "run-a", lambda x: msgspec.structs.replace(x, status=RunStatus.RUNNING))
    assert decision.record is not None and decision.record.status == RunStatus.RUNNING
    assert decision.result == decision.record


@pytest.mark.parametrize("change", [lambda r: None, lambda r: r], ids=["none", "same"])
def test_update_run_without_a_difference_writes_nothing(change: Any) -> None:
    r = run("run-a")
    decision = ops.update_run(r, "run-a", change)
    assert decision.record is None and decision.result == r


def test_update_run_of_an_unknown_run_raises_not_found() -> None:
    with pytest.raises(NotFoundError):
        ops.update_run(None, "nope", lambda r: r)


@pytest.mark.parametrize("field", ["run_id", "thread_id"])
def test_update_run_cannot_change_identity(field: str) -> None:
    with pytest.raises(ValidationError):
        ops.update_run(run("run-a"), "run-a", lambda r: msgspec.structs.replace(r, **{field: "x"}))


# --------------------------------------------------------------------------- the claim index


def _index_view(index: ops.QueueIndex) -> tuple[Any, ...]:
    return (index.order, sorted(index.claimed), dict(index.epochs))


_ENQUEUE = st.tuples(st.just("enqueue"), st.integers(0, 3), st.sampled_from([0, 0, 0, 15, 40]), st.integers(0, 3))
_CLAIM = st.tuples(st.just("claim"), st.sampled_from([1, 1, 1, 2, 3]))
_STEPS = st.lists(
    st.one_of(  # weighted towards queues of several dispatches, claimed and settled in turn
        _ENQUEUE, _ENQUEUE, _ENQUEUE, _CLAIM, _CLAIM,
        st.tuples(st.just("ack")),
        st.tuples(st.just("ack")),
        st.tuples(st.just("nack"), st.integers(0, 3)),
        st.tuples(st.just("expire")),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
        st.tuples(st.just("interrupt")),
        st.tuples(st.just("epoch")),  # an epoch bump that leaves queued dispatches stale
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps=_STEPS)
def test_a_claim_decides_the_same_with_the_index_as_by_walking_the_thread(steps: list[tuple[Any, ...]]) -> None:
    """The same operations on a thread with and without a `QueueIndex`: every decision is the
    same, and the index kept up by `apply` equals one built from scratch."""
    plain = state()
    indexed = state()
    indexed.index = ops.QueueIndex.of(indexed.dispatches)
    now, n = NOW, 0
    for step in steps:
        now += 10
        kind = step[0]
        claimed = [d for d in plain.dispatches.values() if d.status == DispatchStatus.CLAIMED]
        if kind == "enqueue":
            n += 1
            _, priority, delay, _ = step
            d = dispatch(f"d{n}", created_at=now - 5 * (n % 3), priority=priority, available_at=now + delay)
            decide: Any = lambda s, d=d: ops.enqueue(s, d)  # noqa: E731
        elif kind == "claim":
            decide = lambda s, limit=step[1]: ops.claim(s, CONSUMER, f"tok{now}", LEASE, now, limit, start="i")  # noqa: E731
        elif kind in ("ack", "nack", "expire") and claimed:
            c = claimed[0]
            if kind == "ack":
                decide = lambda s, c=c: ops.ack(s, c.dispatch_id, c.claim_token, now)  # noqa: E731
            elif kind == "nack":
                decide = lambda s, c=c: ops.nack(s, c.dispatch_id, c.claim_token, now + step[1], "e", now)  # noqa: E731
            else:
                decide = lambda s, c=c: ops.reclaim_expired(s, c.dispatch_id, (c.lease_until or 0) + 1)  # noqa: E731
        elif kind == "cancel" and plain.dispatches:
            victim = sorted(plain.dispatches)[step[1] % len(plain.dispatches)]
            decide = lambda s, v=victim: ops.cancel(s, v, now)  # noqa: E731
        elif kind == "interrupt":
            decide = lambda s: ops.interrupt(s, now)  # noqa: E731
        elif kind == "epoch":
            decide = lambda s: Outcome(Change([PutEpoch(s.epoch + 1)]), None)  # noqa: E731
        else:
            continue
        try:
            a = decide(plain)
        except StoreError as exc:
            with pytest.raises(type(exc)):
                decide(indexed)
            continue
        b = decide(indexed)
        assert (a.result, a.change, type(a.error)) == (b.result, b.change, type(b.error))
        plain, indexed = ops.apply(plain, a.change), ops.apply(indexed, b.change)
        assert indexed.dispatches == plain.dispatches
        assert indexed.index is not None
        assert _index_view(indexed.index) == _index_view(ops.QueueIndex.of(indexed.dispatches))
