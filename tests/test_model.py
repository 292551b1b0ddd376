"""Unit tests of the pure record logic in `service/model.py` (spec/dispatch-contract.md §1).

No I/O: every test builds records in memory and checks the exact field effects of one
transition or validation rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.model import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PRIORITY,
    LEASE_EXPIRED_MAX_ATTEMPTS,
    MAX_ID_BYTES,
    TERMINAL_STATUSES,
    DispatchStatus,
    RunDispatch,
    RunDispatchResult,
    RunStatus,
    StoreError,
    Termination,
    TerminationKind,
    ValidationError,
    check_dispatch_id_for_run,
    first_dispatch_id,
    is_stale,
    run_of_first_dispatch,
    validate_for_enqueue,
    validate_for_persist,
    validate_id,
)

S = DispatchStatus

CREATED_AT = 1_000
CLAIMED_AT = 2_000
LEASE_UNTIL = 32_000
NOW = 5_000
TOKEN = "token-1"
CONSUMER = "worker-1"

CLAIM_FIELDS = ("claim_token", "claimed_by", "lease_until")
PROJECTION_FIELDS = ("dispatch_instance_id", "run_status", "termination", "run_response", "run_error")
CLEARED_CLAIM = dict.fromkeys(CLAIM_FIELDS)
CLEARED_PROJECTION = dict.fromkeys(PROJECTION_FIELDS)


# --------------------------------------------------------------------------- helpers


def queued(dispatch_id: str = "d1", **kw: Any) -> RunDispatch:
    kw.setdefault("thread_id", "t1")
    kw.setdefault("run_id", "r1")
    kw.setdefault("created_at", CREATED_AT)
    return RunDispatch.queued(dispatch_id, **kw)


def claimed(d: RunDispatch | None = None, *, now: int = CLAIMED_AT) -> RunDispatch:
    return (d or queued()).claim(CONSUMER, TOKEN, LEASE_UNTIL, now)


def run_result(run_id: str = "r1", **kw: Any) -> RunDispatchResult:
    kw.setdefault("dispatch_instance_id", "inst-1")
    kw.setdefault("status", RunStatus.DONE)
    kw.setdefault("termination", Termination(TerminationKind.NATURAL_END))
    kw.setdefault("response", "all done")
    kw.setdefault("error", None)
    return RunDispatchResult(run_id=run_id, **kw)


def loaded_claim() -> RunDispatch:
    """A Claimed dispatch with every optional field filled in, so a transition's effect on
    each field (set, cleared or kept) is visible: non-default priority, dedupe key, epoch,
    attempts, an earlier error and a recorded runtime result."""
    d = queued(priority=7, dedupe_key="k1", available_at=1_500, attempt_count=1, max_attempts=3)
    d = msgspec.structs.replace(d, last_error="earlier failure").prepare_for_enqueue(4)
    return claimed(d).record_run_result(run_result(error="partial"), now=3_000)


def in_status(status: DispatchStatus) -> RunDispatch:
    """A valid record in `status`, reached through the transitions."""
    d = queued()
    match status:
        case S.QUEUED:
            return d
        case S.CLAIMED:
            return claimed(d)
        case S.ACKED:
            return claimed(d).mark_acked(NOW)
        case S.CANCELLED:
            return d.mark_cancelled(NOW)
        case S.SUPERSEDED:
            return d.mark_superseded(NOW, "gone")
        case S.DEAD_LETTER:
            return claimed(d).mark_dead_letter(NOW, "fatal")
    raise AssertionError(status)


def changed_fields(before: RunDispatch, after: RunDispatch) -> dict[str, Any]:
    """The fields whose value differs between the two records, with their new value."""
    b, a = msgspec.structs.asdict(before), msgspec.structs.asdict(after)
    return {k: v for k, v in a.items() if v != b[k]}


# --------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (S.QUEUED, False),
        (S.CLAIMED, False),
        (S.ACKED, True),
        (S.CANCELLED, True),
        (S.SUPERSEDED, True),
        (S.DEAD_LETTER, True),
    ],
)
def test_status_is_terminal(status: DispatchStatus, terminal: bool) -> None:
    assert status.is_terminal is terminal
    assert in_status(status).is_terminal is terminal


def test_there_are_exactly_six_statuses_and_four_are_terminal() -> None:
    assert len(DispatchStatus) == 6
    assert TERMINAL_STATUSES == {S.ACKED, S.CANCELLED, S.SUPERSEDED, S.DEAD_LETTER}


def test_status_wire_values_are_the_lowercase_names() -> None:
    assert [s.value for s in DispatchStatus] == [
        "queued",
        "claimed",
        "acked",
        "cancelled",
        "superseded",
        "dead_letter",
    ]


# --------------------------------------------------------------------------- queued()


def test_queued_defaults() -> None:
    d = RunDispatch.queued("d1", "t1", "r1", 1_234)
    assert d.dispatch_id == "d1"
    assert d.thread_id == "t1"
    assert d.run_id == "r1"
    assert d.priority == DEFAULT_PRIORITY == 128
    assert d.max_attempts == DEFAULT_MAX_ATTEMPTS == 5
    assert d.attempt_count == 0
    assert d.dedupe_key is None
    assert d.dispatch_epoch == 0
    assert d.status == S.QUEUED
    assert d.created_at == 1_234
    assert d.available_at == 1_234
    assert d.updated_at == 1_234
    assert d.last_error is None
    for field in (*CLAIM_FIELDS, *PROJECTION_FIELDS, "completed_at"):
        assert getattr(d, field) is None, field


def test_queued_keeps_caller_options() -> None:
    d = RunDispatch.queued(
        "d1", "t1", "r1", 1_000, priority=0, dedupe_key="k", available_at=61_000, max_attempts=2, attempt_count=1
    )
    assert (d.priority, d.dedupe_key, d.available_at, d.max_attempts, d.attempt_count) == (0, "k", 61_000, 2, 1)
    # a delayed dispatch still has updated_at = created_at
    assert d.updated_at == 1_000


def test_queued_validates_its_input() -> None:
    with pytest.raises(ValidationError, match="dispatch_id must not be empty"):
        RunDispatch.queued(" ", "t1", "r1", 0)
    with pytest.raises(ValidationError):
        RunDispatch.queued("d1", "t1", "r1", 0, max_attempts=0)


def test_records_are_frozen() -> None:
    d = queued()
    with pytest.raises(AttributeError):
        d.status = S.CLAIMED  # type: ignore[misc]
    with pytest.raises(AttributeError):
        d.attempt_count = 3  # type: ignore[misc]
    r = run_result()
    with pytest.raises(AttributeError):
        r.run_id = "other"  # type: ignore[misc]


def test_transitions_return_new_records_and_leave_the_source_alone() -> None:
    d = queued()
    snapshot = msgspec.structs.asdict(d)
    c = d.claim(CONSUMER, TOKEN, LEASE_UNTIL, CLAIMED_AT)
    assert c is not d
    assert msgspec.structs.asdict(d) == snapshot
    assert d.status == S.QUEUED


def test_sort_key_is_priority_then_created_at_then_id() -> None:
    d = queued("b", priority=3, created_at=7)
    assert d.sort_key() == (3, 7, "b")


def test_is_stale_means_epoch_older_than_the_thread() -> None:
    d = queued().prepare_for_enqueue(2)
    assert not is_stale(d, 1)
    assert not is_stale(d, 2)
    assert is_stale(d, 3)


# --------------------------------------------------------------------------- transitions


def test_prepare_for_enqueue_from_queued_only_stamps_the_epoch() -> None:
    d = queued(dispatch_id="d1", priority=9, dedupe_key="k", available_at=9_000, attempt_count=2)
    d = msgspec.structs.replace(d, dispatch_epoch=999, last_error="kept")
    assert changed_fields(d, d.prepare_for_enqueue(3)) == {"dispatch_epoch": 3}


def test_prepare_for_enqueue_from_claimed_resets_status_claim_and_projection() -> None:
    before = loaded_claim()
    after = before.prepare_for_enqueue(7)
    assert changed_fields(before, after) == {
        "dispatch_epoch": 7,
        "status": S.QUEUED,
        "completed_at": None,
        **CLEARED_CLAIM,
        **CLEARED_PROJECTION,
    }
    # kept: priority, dedupe_key, available_at, attempt_count, max_attempts, last_error,
    # created_at and updated_at (updated_at is not touched by prepare_for_enqueue)
    assert after.updated_at == before.updated_at
    assert after.last_error == "earlier failure"


def test_prepare_for_enqueue_from_terminal_record() -> None:
    before = loaded_claim().mark_acked(NOW)
    after = before.prepare_for_enqueue(0)
    assert changed_fields(before, after) == {
        "dispatch_epoch": 0,
        "status": S.QUEUED,
        "completed_at": None,
        **CLEARED_PROJECTION,
    }


def test_claim_sets_claim_fields_and_updated_at_only() -> None:
    before = queued(attempt_count=2, available_at=1_500)
    after = before.claim(CONSUMER, TOKEN, LEASE_UNTIL, CLAIMED_AT)
    assert changed_fields(before, after) == {
        "status": S.CLAIMED,
        "claim_token": TOKEN,
        "claimed_by": CONSUMER,
        "lease_until": LEASE_UNTIL,
        "updated_at": CLAIMED_AT,
    }
    # claim does not count as an attempt and leaves available_at alone
    assert after.attempt_count == 2
    assert after.available_at == 1_500


def test_extend_lease_replaces_lease_until() -> None:
    before = loaded_claim()
    after = before.extend_lease(90_000, NOW)
    assert changed_fields(before, after) == {"lease_until": 90_000, "updated_at": NOW}
    assert after.status == S.CLAIMED


def test_record_dispatch_start_resets_projection_to_running() -> None:
    before = loaded_claim()
    after = before.record_dispatch_start("inst-2", NOW)
    assert changed_fields(before, after) == {
        "dispatch_instance_id": "inst-2",
        "run_status": RunStatus.RUNNING,
        "termination": None,
        "run_response": None,
        "run_error": None,
        "completed_at": None,
        "updated_at": NOW,
    }
    assert after.status == S.CLAIMED
    assert after.claim_token == TOKEN


def test_record_run_result_copies_the_result_and_sets_completed_at() -> None:
    before = claimed().record_dispatch_start("inst-1", 2_500)
    stopped = Termination(TerminationKind.STOPPED, {"code": "max_turns", "detail": "10"})
    result = run_result(
        dispatch_instance_id="inst-9", status=RunStatus.WAITING, termination=stopped, response="r", error="e"
    )
    after = before.record_run_result(result, NOW)
    assert changed_fields(before, after) == {
        "dispatch_instance_id": "inst-9",
        "run_status": RunStatus.WAITING,
        "termination": stopped,
        "run_response": "r",
        "run_error": "e",
        "completed_at": NOW,
        "updated_at": NOW,
    }
    assert after.status == S.CLAIMED
    assert after.claim_token == TOKEN


def test_record_run_result_with_empty_optionals_clears_them() -> None:
    before = loaded_claim()
    after = before.record_run_result(
        run_result(dispatch_instance_id="inst-1", status=RunStatus.DONE, termination=None, response=None), NOW
    )
    assert after.termination is None
    assert after.run_response is None
    assert after.run_error is None


def test_record_run_result_rejects_a_result_of_another_run() -> None:
    with pytest.raises(ValidationError, match="does not match"):
        claimed().record_run_result(run_result(run_id="other-run"), NOW)


def test_mark_acked_clears_claim_and_keeps_projection() -> None:
    before = loaded_claim()
    after = before.mark_acked(NOW)
    assert changed_fields(before, after) == {
        "status": S.ACKED,
        "completed_at": NOW,
        "updated_at": NOW,
        **CLEARED_CLAIM,
    }
    assert after.run_status == RunStatus.DONE
    assert after.run_response == "all done"


def test_mark_cancelled() -> None:
    before = queued(dedupe_key="k")
    after = before.mark_cancelled(NOW)
    assert changed_fields(before, after) == {"status": S.CANCELLED, "completed_at": NOW, "updated_at": NOW}


def test_mark_superseded_with_reason() -> None:
    before = msgspec.structs.replace(queued(), last_error="old").prepare_for_enqueue(2)
    after = before.mark_superseded(NOW, "interrupted")
    assert changed_fields(before, after) == {
        "status": S.SUPERSEDED,
        "completed_at": NOW,
        "updated_at": NOW,
        "last_error": "interrupted",
    }
    assert after.dispatch_epoch == 2  # epoch unchanged


def test_mark_superseded_without_reason_keeps_last_error() -> None:
    before = msgspec.structs.replace(queued(), last_error="old")
    after = before.mark_superseded(NOW)
    assert after.last_error == "old"
    assert changed_fields(before, after) == {"status": S.SUPERSEDED, "completed_at": NOW, "updated_at": NOW}


def test_mark_superseded_at_epoch_from_queued() -> None:
    before = queued().prepare_for_enqueue(1)
    after = before.mark_superseded_at_epoch(NOW, 3, "stale")
    assert changed_fields(before, after) == {
        "dispatch_epoch": 3,
        "status": S.SUPERSEDED,
        "completed_at": NOW,
        "updated_at": NOW,
        "last_error": "stale",
    }


def test_mark_superseded_at_epoch_from_claimed_clears_claim_and_projection() -> None:
    before = loaded_claim()
    after = before.mark_superseded_at_epoch(NOW, 6, "stale claim")
    assert changed_fields(before, after) == {
        "dispatch_epoch": 6,
        "status": S.SUPERSEDED,
        "completed_at": NOW,
        "updated_at": NOW,
        "last_error": "stale claim",
        **CLEARED_CLAIM,
        **CLEARED_PROJECTION,
    }


def test_mark_superseded_at_epoch_without_reason_keeps_last_error() -> None:
    after = loaded_claim().mark_superseded_at_epoch(NOW, 6)
    assert after.last_error == "earlier failure"


def test_mark_dead_letter_keeps_attempts_and_projection() -> None:
    before = loaded_claim()
    after = before.mark_dead_letter(NOW, "fatal")
    assert changed_fields(before, after) == {
        "status": S.DEAD_LETTER,
        "last_error": "fatal",
        "completed_at": NOW,
        "updated_at": NOW,
        **CLEARED_CLAIM,
    }
    assert after.attempt_count == before.attempt_count == 1
    assert after.run_status == RunStatus.DONE


def test_mark_nack_result_requeues_while_attempts_are_left() -> None:
    before = loaded_claim()  # attempt 1 of 3
    after = before.mark_nack_result(NOW, 9_000, "try again")
    assert changed_fields(before, after) == {
        "status": S.QUEUED,
        "attempt_count": 2,
        "last_error": "try again",
        "available_at": 9_000,
        "completed_at": None,
        "updated_at": NOW,
        **CLEARED_CLAIM,
        **CLEARED_PROJECTION,
    }


def test_mark_nack_result_dead_letters_when_attempts_are_used_up() -> None:
    before = claimed(loaded_claim().mark_nack_result(NOW, 4_000, "first")).record_run_result(run_result(), 6_000)
    assert (before.attempt_count, before.max_attempts) == (2, 3)
    after = before.mark_nack_result(7_000, 9_000, "second")
    assert changed_fields(before, after) == {
        "status": S.DEAD_LETTER,
        "attempt_count": 3,
        "last_error": "second",
        "completed_at": 7_000,
        "updated_at": 7_000,
        **CLEARED_CLAIM,
    }
    # projection kept, available_at not moved to retry_at
    assert after.run_status == RunStatus.DONE
    assert after.available_at == before.available_at


def test_mark_nack_result_with_max_attempts_one_dead_letters_at_once() -> None:
    after = claimed(queued(max_attempts=1)).mark_nack_result(NOW, 9_000, "no")
    assert after.status == S.DEAD_LETTER
    assert after.attempt_count == 1


def test_nack_example_from_the_contract_max_attempts_two() -> None:
    first = claimed(queued(max_attempts=2)).mark_nack_result(3_000, 4_000, "e1")
    assert (first.status, first.attempt_count) == (S.QUEUED, 1)
    second = claimed(first, now=4_000).mark_nack_result(5_000, 6_000, "e2")
    assert (second.status, second.attempt_count) == (S.DEAD_LETTER, 2)


def test_mark_expired_lease_requeues_while_attempts_are_left() -> None:
    before = loaded_claim()  # attempt 1 of 3
    after = before.mark_expired_lease(NOW)
    assert changed_fields(before, after) == {
        "status": S.QUEUED,
        "attempt_count": 2,
        "available_at": NOW,
        "completed_at": None,
        "updated_at": NOW,
        **CLEARED_CLAIM,
        **CLEARED_PROJECTION,
    }
    assert after.last_error == "earlier failure"


def test_mark_expired_lease_dead_letters_when_attempts_are_used_up() -> None:
    before = claimed(queued(max_attempts=2, attempt_count=1)).record_run_result(run_result(error="partial"), 3_000)
    after = before.mark_expired_lease(NOW)
    assert changed_fields(before, after) == {
        "status": S.DEAD_LETTER,
        "attempt_count": 2,
        "available_at": NOW,
        "last_error": LEASE_EXPIRED_MAX_ATTEMPTS,
        "completed_at": NOW,
        "updated_at": NOW,
        **CLEARED_CLAIM,
        **CLEARED_PROJECTION,  # lease expiry clears the projection even when dead-lettering
    }


def test_lease_expiry_text() -> None:
    assert LEASE_EXPIRED_MAX_ATTEMPTS == "lease expired; max attempts reached"


# --------------------------------------------------------------------------- wrong source status

Transition = Callable[[RunDispatch], RunDispatch]

NEEDS_QUEUED: dict[str, Transition] = {
    "claim": lambda d: d.claim(CONSUMER, TOKEN, LEASE_UNTIL, NOW),
    "mark_cancelled": lambda d: d.mark_cancelled(NOW),
    "mark_superseded": lambda d: d.mark_superseded(NOW, "x"),
}
NEEDS_CLAIMED: dict[str, Transition] = {
    "extend_lease": lambda d: d.extend_lease(LEASE_UNTIL + 1, NOW),
    "record_dispatch_start": lambda d: d.record_dispatch_start("inst", NOW),
    "record_run_result": lambda d: d.record_run_result(run_result(), NOW),
    "mark_acked": lambda d: d.mark_acked(NOW),
    "mark_dead_letter": lambda d: d.mark_dead_letter(NOW, "x"),
    "mark_nack_result": lambda d: d.mark_nack_result(NOW, NOW, "x"),
    "mark_expired_lease": lambda d: d.mark_expired_lease(NOW),
}


def _wrong_sources(table: dict[str, Transition], required: DispatchStatus) -> list[Any]:
    return [
        pytest.param(fn, status, id=f"{name}-from-{status.value}")
        for name, fn in table.items()
        for status in DispatchStatus
        if status != required
    ]


@pytest.mark.parametrize(("transition", "status"), _wrong_sources(NEEDS_QUEUED, S.QUEUED))
def test_queued_only_transitions_reject_other_statuses(transition: Transition, status: DispatchStatus) -> None:
    with pytest.raises(ValidationError, match="must be Queued"):
        transition(in_status(status))


@pytest.mark.parametrize(("transition", "status"), _wrong_sources(NEEDS_CLAIMED, S.CLAIMED))
def test_claimed_only_transitions_reject_other_statuses(transition: Transition, status: DispatchStatus) -> None:
    with pytest.raises(ValidationError, match="must be Claimed"):
        transition(in_status(status))


def test_wrong_status_message_names_the_dispatch() -> None:
    with pytest.raises(ValidationError, match="dispatch 'd1' must be Claimed before") as err:
        queued().mark_acked(NOW)
    assert err.value.id == "d1"


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_mark_superseded_at_epoch_rejects_terminal_records(status: DispatchStatus) -> None:
    with pytest.raises(ValidationError, match="must be Queued or Claimed before epoch supersede"):
        in_status(status).mark_superseded_at_epoch(NOW, 9, "x")


@pytest.mark.parametrize("status", list(DispatchStatus))
def test_prepare_for_enqueue_accepts_any_status(status: DispatchStatus) -> None:
    d = in_status(status).prepare_for_enqueue(1)
    assert d.status == S.QUEUED
    validate_for_enqueue(d)


def test_validation_error_is_a_store_error() -> None:
    assert issubclass(ValidationError, StoreError)


# --------------------------------------------------------------------------- validate_id


@pytest.mark.parametrize("value", ["", " ", "\t\n", "   \u3000"])
def test_validate_id_rejects_blank(value: str) -> None:
    with pytest.raises(ValidationError, match="thread_id must not be empty") as err:
        validate_id(value, "thread_id")
    assert err.value.field == "thread_id"


@pytest.mark.parametrize("value", [None, 42, b"bytes"])
def test_validate_id_rejects_non_strings(value: object) -> None:
    with pytest.raises(ValidationError):
        validate_id(value, "run_id")


def test_validate_id_returns_the_id_unchanged() -> None:
    assert validate_id(" padded ", "dispatch_id") == " padded "


@pytest.mark.parametrize(
    ("char", "width"),
    [("a", 1), ("é", 2), ("€", 3), ("🙂", 4)],
    ids=["ascii", "2-byte", "3-byte", "4-byte"],
)
def test_validate_id_counts_utf8_bytes_not_characters(char: str, width: int) -> None:
    fits = char * (MAX_ID_BYTES // width)
    assert len(fits.encode()) <= MAX_ID_BYTES
    assert validate_id(fits, "dispatch_id") == fits
    too_long = fits + char
    assert len(too_long) <= MAX_ID_BYTES or width == 1  # short in characters, long in bytes
    with pytest.raises(ValidationError, match=f"at most {MAX_ID_BYTES} bytes"):
        validate_id(too_long, "dispatch_id")


def test_max_id_bytes_boundary_is_inclusive() -> None:
    assert MAX_ID_BYTES == 256
    validate_id("x" * 256, "id")
    with pytest.raises(ValidationError):
        validate_id("x" * 257, "id")
    # 255 ASCII bytes + one 2-byte character = 257 bytes
    with pytest.raises(ValidationError):
        validate_id("x" * 255 + "é", "id")


@pytest.mark.parametrize("field", ["dispatch_id", "thread_id", "run_id"])
def test_every_id_of_a_dispatch_is_checked(field: str) -> None:
    d = queued()
    with pytest.raises(ValidationError, match=f"{field} must not be empty"):
        validate_for_persist(msgspec.structs.replace(d, **{field: "  "}))
    with pytest.raises(ValidationError, match="bytes"):
        validate_for_persist(msgspec.structs.replace(d, **{field: "é" * 129}))


def test_dedupe_key_is_checked_like_an_id() -> None:
    validate_for_enqueue(queued(dedupe_key="k" * MAX_ID_BYTES))
    with pytest.raises(ValidationError):
        queued(dedupe_key="")
    with pytest.raises(ValidationError):
        queued(dedupe_key="k" * (MAX_ID_BYTES + 1))


# --------------------------------------------------------------------------- identity and retry rules


@pytest.mark.parametrize("priority", [0, 1, 128, 255])
def test_priority_in_range_is_accepted(priority: int) -> None:
    assert queued(priority=priority).priority == priority


@pytest.mark.parametrize("priority", [-1, 256, 1_000])
def test_priority_out_of_range_is_rejected(priority: int) -> None:
    with pytest.raises(ValidationError, match="priority") as err:
        queued(priority=priority)
    assert err.value.field == "priority"


@pytest.mark.parametrize("max_attempts", [0, -1])
def test_max_attempts_must_be_positive(max_attempts: int) -> None:
    with pytest.raises(ValidationError, match="max_attempts") as err:
        queued(max_attempts=max_attempts, attempt_count=0)
    assert err.value.field == "max_attempts"


def test_attempt_count_may_equal_but_not_exceed_max_attempts() -> None:
    assert queued(max_attempts=3, attempt_count=3).attempt_count == 3
    with pytest.raises(ValidationError, match="attempt_count") as err:
        queued(max_attempts=3, attempt_count=4)
    assert err.value.field == "attempt_count"


@pytest.mark.parametrize("field", ["dispatch_epoch", "available_at", "attempt_count", "created_at", "updated_at"])
def test_negative_numbers_are_rejected(field: str) -> None:
    with pytest.raises(ValidationError, match="negative"):
        validate_for_persist(msgspec.structs.replace(queued(), **{field: -1}))


def test_negative_lease_until_is_rejected() -> None:
    with pytest.raises(ValidationError, match="negative"):
        validate_for_persist(msgspec.structs.replace(claimed(), lease_until=-1))


def test_identity_rules_apply_to_persisted_records_of_any_status() -> None:
    acked = in_status(S.ACKED)
    with pytest.raises(ValidationError):
        validate_for_persist(msgspec.structs.replace(acked, max_attempts=0))
    with pytest.raises(ValidationError):
        validate_for_persist(msgspec.structs.replace(acked, run_id=""))


# --------------------------------------------------------------------------- per-status shape checks


@pytest.mark.parametrize("status", list(DispatchStatus))
def test_records_reached_by_transitions_pass_validate_for_persist(status: DispatchStatus) -> None:
    validate_for_persist(in_status(status))


@pytest.mark.parametrize(
    "fields",
    [{"claim_token": "t"}, {"claimed_by": "c"}, {"lease_until": 5}],
    ids=["claim_token", "claimed_by", "lease_until"],
)
def test_queued_must_not_carry_claim_fields(fields: dict[str, Any]) -> None:
    bad = msgspec.structs.replace(queued(), **fields)
    with pytest.raises(ValidationError, match="must not carry claim fields"):
        validate_for_persist(bad)
    with pytest.raises(ValidationError, match="must not carry claim fields"):
        validate_for_enqueue(bad)


@pytest.mark.parametrize(
    "fields",
    [
        {"dispatch_instance_id": "i"},
        {"run_status": RunStatus.RUNNING},
        {"termination": Termination(TerminationKind.CANCELLED)},
        {"run_response": "r"},
        {"run_error": "e"},
    ],
    ids=lambda f: next(iter(f)),
)
def test_queued_must_not_carry_runtime_result_fields(fields: dict[str, Any]) -> None:
    bad = msgspec.structs.replace(queued(), **fields)
    with pytest.raises(ValidationError, match="must not carry runtime result fields"):
        validate_for_persist(bad)
    with pytest.raises(ValidationError, match="must not carry runtime result fields"):
        validate_for_enqueue(bad)


def test_queued_must_not_carry_completed_at() -> None:
    bad = msgspec.structs.replace(queued(), completed_at=5)
    with pytest.raises(ValidationError):
        validate_for_persist(bad)
    with pytest.raises(ValidationError):
        validate_for_enqueue(bad)


@pytest.mark.parametrize(
    "fields",
    [
        {"claim_token": None},
        {"claim_token": ""},
        {"claim_token": "  "},
        {"claimed_by": None},
        {"claimed_by": " "},
        {"lease_until": None},
    ],
    ids=["no-token", "empty-token", "blank-token", "no-claimer", "blank-claimer", "no-lease"],
)
def test_claimed_must_carry_claim_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="must carry claim_token, claimed_by and lease_until"):
        validate_for_persist(msgspec.structs.replace(claimed(), **fields))


def test_claim_with_blank_token_or_consumer_is_rejected() -> None:
    with pytest.raises(ValidationError):
        queued().claim(CONSUMER, " ", LEASE_UNTIL, NOW)
    with pytest.raises(ValidationError):
        queued().claim("", TOKEN, LEASE_UNTIL, NOW)


def test_claimed_may_carry_a_runtime_result_and_completed_at() -> None:
    validate_for_persist(loaded_claim())
    assert loaded_claim().completed_at is not None


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
@pytest.mark.parametrize("field", CLAIM_FIELDS)
def test_terminal_must_not_carry_lease_fields(status: DispatchStatus, field: str) -> None:
    value = 5 if field == "lease_until" else "x"
    with pytest.raises(ValidationError, match="must not carry active lease fields"):
        validate_for_persist(msgspec.structs.replace(in_status(status), **{field: value}))


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_terminal_must_carry_completed_at(status: DispatchStatus) -> None:
    with pytest.raises(ValidationError, match="must carry completed_at"):
        validate_for_persist(msgspec.structs.replace(in_status(status), completed_at=None))


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_terminal_may_carry_the_runtime_projection(status: DispatchStatus) -> None:
    d = msgspec.structs.replace(
        in_status(status), dispatch_instance_id="i", run_status=RunStatus.DONE, run_response="ok"
    )
    validate_for_persist(d)


@pytest.mark.parametrize("status", [s for s in DispatchStatus if s != S.QUEUED])
def test_validate_for_enqueue_requires_queued(status: DispatchStatus) -> None:
    d = in_status(status)
    with pytest.raises(ValidationError, match="must start as Queued"):
        validate_for_enqueue(d)


def test_validate_for_enqueue_checks_identity_and_retry() -> None:
    with pytest.raises(ValidationError, match="run_id must not be empty"):
        validate_for_enqueue(msgspec.structs.replace(queued(), run_id=""))
    with pytest.raises(ValidationError, match="attempt_count"):
        validate_for_enqueue(msgspec.structs.replace(queued(), attempt_count=6))


def test_transitions_revalidate_their_result() -> None:
    # the record itself is fine, but a claim with no lease deadline is not a valid Claimed
    with pytest.raises(ValidationError):
        queued().claim(CONSUMER, TOKEN, None, NOW)  # type: ignore[arg-type]


def test_transitions_check_the_numbers_they_change() -> None:
    # a transition re-checks what it changed and the status's shape, not the ids (which
    # never change after the enqueue checked them)
    with pytest.raises(ValidationError, match="lease_until must not be negative"):
        claimed().extend_lease(-1, NOW)
    with pytest.raises(ValidationError, match="available_at must not be negative"):
        claimed().mark_nack_result(NOW, -5, "boom")
    with pytest.raises(ValidationError, match="dispatch_epoch must not be negative"):
        queued().mark_superseded_at_epoch(NOW, -1)
    with pytest.raises(ValidationError, match="updated_at must not be negative"):
        claimed().mark_acked(-1)


# --------------------------------------------------------------------------- JSON


def _json_samples() -> list[Any]:
    stopped = Termination(TerminationKind.STOPPED, {"code": "limit", "detail": "too many turns"})
    blocked = Termination(TerminationKind.BLOCKED, "policy")
    samples = {s.value: in_status(s) for s in DispatchStatus}
    samples["loaded-claim"] = loaded_claim()
    samples["started"] = claimed().record_dispatch_start("inst-1", NOW)
    samples["result-stopped"] = claimed().record_run_result(run_result(termination=stopped, error="x"), NOW)
    samples["acked-blocked"] = claimed().record_run_result(run_result(termination=blocked), NOW).mark_acked(NOW + 1)
    samples["unicode-ids"] = queued("dispatch-é🙂", thread_id="thread-€", run_id="run-ü", dedupe_key="κλειδί")
    return [pytest.param(d, id=name) for name, d in samples.items()]


@pytest.mark.parametrize("record", _json_samples())
def test_json_round_trip_keeps_equality(record: RunDispatch) -> None:
    data = msgspec.json.encode(record)
    back = msgspec.json.decode(data, type=RunDispatch)
    assert back == record
    assert msgspec.structs.asdict(back) == msgspec.structs.asdict(record)
    assert isinstance(back.status, DispatchStatus)


def test_json_writes_status_and_run_status_as_wire_strings() -> None:
    d = claimed().record_run_result(run_result(), NOW).mark_dead_letter(NOW, "x")
    decoded = msgspec.json.decode(msgspec.json.encode(d))
    assert decoded["status"] == "dead_letter"
    assert decoded["run_status"] == "done"
    assert decoded["termination"] == {"type": "natural_end"}


def test_json_omits_the_runtime_projection_when_absent() -> None:
    decoded = msgspec.json.decode(msgspec.json.encode(queued()))
    for field in (*PROJECTION_FIELDS, "completed_at"):
        assert field not in decoded


def test_json_with_explicit_nulls_reads_back_as_none() -> None:
    payload = {
        "dispatch_id": "d1",
        "thread_id": "t1",
        "run_id": "r1",
        "status": "queued",
        "available_at": 10,
        "created_at": 10,
        "updated_at": 10,
        **dict.fromkeys(("dedupe_key", "last_error", *CLAIM_FIELDS, *PROJECTION_FIELDS, "completed_at")),
    }
    d = msgspec.json.decode(msgspec.json.encode(payload), type=RunDispatch)
    assert d == RunDispatch.queued("d1", "t1", "r1", 10)


def test_run_dispatch_result_round_trip() -> None:
    r = run_result(termination=Termination(TerminationKind.ERROR, "boom"), error="boom")
    assert msgspec.json.decode(msgspec.json.encode(r), type=RunDispatchResult) == r


# --------------------------------------------------------------------------- first dispatch ids


def test_a_runs_first_dispatch_id_leads_back_to_the_run():
    assert first_dispatch_id("r-1") == "r-1#1"
    assert run_of_first_dispatch("r-1#1") == "r-1"
    assert run_of_first_dispatch("r-1#1#1") == "r-1#1"  # one suffix at a time: any run id round-trips
    assert run_of_first_dispatch("r-1") is None and run_of_first_dispatch("r-1#2") is None
    fits = "é" * (MAX_ID_BYTES // 2 - 1)  # two bytes short of the limit: room for "#1"
    assert first_dispatch_id(fits) == fits + "#1"
    assert first_dispatch_id("a" + fits) is None  # the caller's dispatch then gets a minted id


def test_reserved_dispatch_ids_are_refused_for_any_run_but_their_own():
    check_dispatch_id_for_run("r#1", "r")
    check_dispatch_id_for_run("plain", "r")
    check_dispatch_id_for_run("plain", None)
    for dispatch_id, run_id in (("r#1", "s"), ("r#1", None), ("#1", None), ("#1", "r")):
        with pytest.raises(ValidationError) as refused:
            check_dispatch_id_for_run(dispatch_id, run_id)
        assert refused.value.field == "dispatch_id" and refused.value.id == dispatch_id


@given(st.one_of(st.text(max_size=300), st.text(alphabet=st.characters(max_codepoint=127), max_size=300),
                 st.sampled_from(["", " ", "\t\n", "\x1c", "a" * 256, "a" * 257, "é" * 128, "é" * 129, "\ud800"])))
def test_an_id_is_accepted_exactly_when_it_is_non_blank_utf8_of_at_most_256_bytes(value):
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        size = None
    usable = value.strip() != "" and size is not None and size <= MAX_ID_BYTES
    try:
        validate_id(value, "run_id")
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == usable
