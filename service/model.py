"""Records, statuses, errors and the pure state transitions of a dispatch.

Nothing here does I/O. Every transition returns a new, validated record; records are
frozen msgspec Structs, so a snapshot handed out by a store can never change the store.
Times are integer Unix milliseconds supplied by the caller.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

MAX_ID_BYTES = 256
"""Longest dispatch, thread or run id (UTF-8 bytes). Keys hex-encode ids, so this bounds
a NATS subject to about 1.1 KB, well inside the server's 4 KB control line."""

DEFAULT_PRIORITY = 128
DEFAULT_MAX_ATTEMPTS = 5

# Fixed reasons written to `last_error` (spec/dispatch-contract.md §1.7).
QUEUED_SUPERSEDED_BY_INTERRUPT = "queued dispatch superseded by interrupt"
QUEUED_SUPERSEDED_BY_EPOCH = "queued dispatch superseded by newer dispatch epoch"
CLAIMED_SUPERSEDED_BY_EPOCH = "claimed dispatch superseded by newer dispatch epoch"
CLAIMED_SUPERSEDED_BEFORE_START = "claimed dispatch superseded before runtime start"
CLAIMED_SUPERSEDED_BEFORE_RESULT = "claimed dispatch superseded before run result"
CLAIMED_SUPERSEDED_BEFORE_NACK = "claimed dispatch superseded before nack"
CLAIMED_SUPERSEDED_BEFORE_DEAD_LETTER = "claimed dispatch superseded before dead letter"
CLAIMED_SUPERSEDED_DURING_LEASE_RENEWAL = "claimed dispatch superseded during lease renewal"
CLAIMED_LEASE_EXPIRED_AFTER_INTERRUPT = "claimed dispatch lease expired after interrupt"
LEASE_EXPIRED_MAX_ATTEMPTS = "lease expired; max attempts reached"
RUN_SUPERSEDED = "superseded by interrupt"
"""The error of a run that an interrupt (a newer submit) superseded."""


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base of every store error. `id` names the record the error is about, if any."""

    def __init__(self, message: str, *, id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.id = id


class ValidationError(StoreError):
    """The input or the requested transition breaks an invariant; nothing was written."""

    def __init__(self, message: str, *, field: str | None = None, id: str | None = None) -> None:
        super().__init__(message, id=id)
        self.field = field


class AlreadyExistsError(StoreError):
    """A record with this id, or a live dispatch with this dedupe key, already exists."""


class NotFoundError(StoreError):
    """No record with this id."""


class VersionConflictError(StoreError):
    """A wrong or stale claim token, or a dispatch whose epoch is older than its thread's."""

    def __init__(self, message: str, *, expected: int, actual: int, id: str | None = None) -> None:
        super().__init__(message, id=id)
        self.expected = expected
        self.actual = actual


class StoreUnavailableError(StoreError):
    """The backend could not be reached or kept failing; the outcome is unknown or nothing was written."""


# --------------------------------------------------------------------------- enums


class DispatchStatus(enum.StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    ACKED = "acked"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    DEAD_LETTER = "dead_letter"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {DispatchStatus.ACKED, DispatchStatus.CANCELLED, DispatchStatus.SUPERSEDED, DispatchStatus.DEAD_LETTER}
)


class RunStatus(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    WAITING = "waiting"
    DONE = "done"


class TerminationKind(enum.StrEnum):
    NATURAL_END = "natural_end"
    BEHAVIOR_REQUESTED = "behavior_requested"
    STOPPED = "stopped"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"
    SUSPENDED = "suspended"
    ERROR = "error"


class Termination(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a run ended: `{"type": kind, "value"?: payload}`."""

    type: TerminationKind
    value: Any = None


# --------------------------------------------------------------------------- records


class RunDispatchResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """The runtime outcome of one attempt, projected onto its dispatch."""

    run_id: str
    dispatch_instance_id: str
    status: RunStatus
    termination: Termination | None = None
    response: str | None = None
    error: str | None = None


class RunDispatch(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One activation attempt of a run: queue status, lease, retries and a runtime trace.

    Build a new one with `RunDispatch.queued(...)`; the store owns every later change.
    """

    dispatch_id: str
    thread_id: str
    run_id: str
    priority: int = DEFAULT_PRIORITY
    dedupe_key: str | None = None
    dispatch_epoch: int = 0
    status: DispatchStatus = DispatchStatus.QUEUED
    available_at: int
    attempt_count: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    last_error: str | None = None
    claim_token: str | None = None
    claimed_by: str | None = None
    lease_until: int | None = None
    # runtime projection: queue-side debug data; the RunRecord holds the business outcome
    dispatch_instance_id: str | None = None
    run_status: RunStatus | None = None
    termination: Termination | None = None
    run_response: str | None = None
    run_error: str | None = None
    completed_at: int | None = None
    created_at: int
    updated_at: int

    @classmethod
    def queued(
        cls,
        dispatch_id: str,
        thread_id: str,
        run_id: str,
        created_at: int,
        *,
        priority: int = DEFAULT_PRIORITY,
        dedupe_key: str | None = None,
        available_at: int | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        attempt_count: int = 0,
    ) -> RunDispatch:
        """A new Queued dispatch; `available_at` defaults to `created_at`."""
        d = cls(
            dispatch_id=dispatch_id,
            thread_id=thread_id,
            run_id=run_id,
            priority=priority,
            dedupe_key=dedupe_key,
            available_at=created_at if available_at is None else available_at,
            attempt_count=attempt_count,
            max_attempts=max_attempts,
            created_at=created_at,
            updated_at=created_at,
        )
        validate_for_enqueue(d)
        return d

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def sort_key(self) -> tuple[int, int, str]:
        """Claim and listing order: priority (0 first), then FIFO, ties by id."""
        return (self.priority, self.created_at, self.dispatch_id)

    # -- transitions (each returns a new validated record) ---------------------------

    def prepare_for_enqueue(self, epoch: int) -> RunDispatch:
        return _checked(
            self,
            dispatch_epoch=epoch,
            status=DispatchStatus.QUEUED,
            completed_at=None,
            **_CLEAR_CLAIM,
            **_CLEAR_PROJECTION,
        )

    def claim(self, consumer_id: str, token: str, lease_until: int, now: int) -> RunDispatch:
        _require(self, DispatchStatus.QUEUED, "claim")
        return _checked(
            self,
            status=DispatchStatus.CLAIMED,
            claim_token=token,
            claimed_by=consumer_id,
            lease_until=lease_until,
            updated_at=now,
        )

    def extend_lease(self, lease_until: int, now: int) -> RunDispatch:
        _require(self, DispatchStatus.CLAIMED, "extend_lease")
        return _checked(self, lease_until=lease_until, updated_at=now)

    def record_dispatch_start(self, dispatch_instance_id: str, now: int) -> RunDispatch:
        _require(self, DispatchStatus.CLAIMED, "record_dispatch_start")
        return _checked(
            self,
            dispatch_instance_id=dispatch_instance_id,
            run_status=RunStatus.RUNNING,
            termination=None,
            run_response=None,
            run_error=None,
            completed_at=None,
            updated_at=now,
        )

    def record_run_result(self, result: RunDispatchResult, now: int) -> RunDispatch:
        _require(self, DispatchStatus.CLAIMED, "record_run_result")
        if result.run_id != self.run_id:
            raise ValidationError(
                f"result run_id '{result.run_id}' does not match dispatch '{self.dispatch_id}' run_id '{self.run_id}'",
                field="run_id",
                id=self.dispatch_id,
            )
        return _checked(
            self,
            dispatch_instance_id=result.dispatch_instance_id,
            run_status=result.status,
            termination=result.termination,
            run_response=result.response,
            run_error=result.error,
            completed_at=now,
            updated_at=now,
        )

    def mark_acked(self, now: int) -> RunDispatch:
        _require(self, DispatchStatus.CLAIMED, "ack")
        return _checked(self, status=DispatchStatus.ACKED, completed_at=now, updated_at=now, **_CLEAR_CLAIM)

    def mark_cancelled(self, now: int) -> RunDispatch:
        _require(self, DispatchStatus.QUEUED, "cancel")
        return _checked(self, status=DispatchStatus.CANCELLED, completed_at=now, updated_at=now, **_CLEAR_CLAIM)

    def mark_superseded(self, now: int, reason: str | None = None) -> RunDispatch:
        _require(self, DispatchStatus.QUEUED, "supersede")
        return self._superseded(now, reason)

    def mark_superseded_at_epoch(self, now: int, epoch: int, reason: str | None = None) -> RunDispatch:
        if self.status not in (DispatchStatus.QUEUED, DispatchStatus.CLAIMED):
            raise ValidationError(
                f"dispatch '{self.dispatch_id}' must be Queued or Claimed before epoch supersede",
                id=self.dispatch_id,
            )
        return self._superseded(now, reason, dispatch_epoch=epoch)

    def mark_dead_letter(self, now: int, error: str) -> RunDispatch:
        _require(self, DispatchStatus.CLAIMED, "dead letter")
        return _checked(
            self,
            status=DispatchStatus.DEAD_LETTER,
            last_error=error,
            completed_at=now,
            updated_at=now,
            **_CLEAR_CLAIM,
        )

    def mark_nack_result(self, now: int, retry_at: int, error: str) -> RunDispatch:
        _require(self, DispatchStatus.CLAIMED, "nack")
        attempts = min(self.attempt_count + 1, self.max_attempts)  # saturates: dead-letters, never invalid
        if attempts >= self.max_attempts:
            return _checked(
                self,
                attempt_count=attempts,
                last_error=error,
                status=DispatchStatus.DEAD_LETTER,
                completed_at=now,
                updated_at=now,
                **_CLEAR_CLAIM,
            )
        return _checked(
            self,
            attempt_count=attempts,
            last_error=error,
            status=DispatchStatus.QUEUED,
            available_at=retry_at,
            completed_at=None,
            updated_at=now,
            **_CLEAR_CLAIM,
            **_CLEAR_PROJECTION,
        )

    def mark_expired_lease(self, now: int) -> RunDispatch:
        _require(self, DispatchStatus.CLAIMED, "lease expiry")
        attempts = min(self.attempt_count + 1, self.max_attempts)
        common = dict(attempt_count=attempts, available_at=now, updated_at=now, **_CLEAR_CLAIM, **_CLEAR_PROJECTION)
        if attempts >= self.max_attempts:
            return _checked(
                self, status=DispatchStatus.DEAD_LETTER, last_error=LEASE_EXPIRED_MAX_ATTEMPTS, completed_at=now, **common
            )
        return _checked(self, status=DispatchStatus.QUEUED, completed_at=None, **common)

    def _superseded(self, now: int, reason: str | None, **more: Any) -> RunDispatch:
        changes: dict[str, Any] = dict(
            status=DispatchStatus.SUPERSEDED, completed_at=now, updated_at=now, **_CLEAR_CLAIM, **_CLEAR_PROJECTION, **more
        )
        if reason is not None:
            changes["last_error"] = reason
        return _checked(self, **changes)


_CLEAR_CLAIM: dict[str, Any] = {"claim_token": None, "claimed_by": None, "lease_until": None}
_CLEAR_PROJECTION: dict[str, Any] = {
    "dispatch_instance_id": None,
    "run_status": None,
    "termination": None,
    "run_response": None,
    "run_error": None,
}
_PROJECTION_FIELDS = tuple(_CLEAR_PROJECTION)


def _require(d: RunDispatch, status: DispatchStatus, transition: str) -> None:
    if d.status != status:
        raise ValidationError(
            f"dispatch '{d.dispatch_id}' must be {_PASCAL[status]} before {transition}", id=d.dispatch_id
        )


def _checked(d: RunDispatch, **changes: Any) -> RunDispatch:
    """`d` with `changes`, validated where a transition can break it: the fields it changes
    and the status's invariants (ids and limits never change after the enqueue checked them)."""
    new = msgspec.structs.replace(d, **changes)
    for field in _COUNTS.intersection(changes):
        _non_negative(new, field)
    if "attempt_count" in changes:
        _attempts_within_limit(new)
    _validate_lifecycle(new)
    return new


_PASCAL = {
    DispatchStatus.QUEUED: "Queued",
    DispatchStatus.CLAIMED: "Claimed",
    DispatchStatus.ACKED: "Acked",
    DispatchStatus.CANCELLED: "Cancelled",
    DispatchStatus.SUPERSEDED: "Superseded",
    DispatchStatus.DEAD_LETTER: "DeadLetter",
}


# --------------------------------------------------------------------------- validation


def validate_id(value: object, field: str) -> str:
    """A usable id: a non-blank string of at most MAX_ID_BYTES UTF-8 bytes."""
    if type(value) is str and value.isascii() and 0 < len(value) <= MAX_ID_BYTES and not value.isspace():
        return value  # the common case (~30 checks a run), without encoding the text
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{field} must not be empty", field=field)
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise ValidationError(f"{field} must be valid UTF-8 text", field=field) from None
    if size > MAX_ID_BYTES:
        raise ValidationError(f"{field} must be at most {MAX_ID_BYTES} bytes", field=field, id=value[:64])
    return value


FIRST_DISPATCH_SUFFIX = "#1"


def first_dispatch_id(run_id: str) -> str | None:
    """The id a submit gives its run's first dispatch when the caller names none: the run
    id and "#1". Such an id needs no alias key of its own (the run's alias finds its
    thread), so a submit writes one key fewer. None when it would be too long."""
    dispatch_id = run_id + FIRST_DISPATCH_SUFFIX
    return dispatch_id if len(dispatch_id.encode()) <= MAX_ID_BYTES else None


def run_of_first_dispatch(dispatch_id: str) -> str | None:
    """The run whose first dispatch `dispatch_id` names (it ends in "#1"), else None."""
    if dispatch_id.endswith(FIRST_DISPATCH_SUFFIX):
        return dispatch_id[: -len(FIRST_DISPATCH_SUFFIX)]
    return None


def check_dispatch_id_for_run(dispatch_id: str, run_id: str | None) -> None:
    """Dispatch ids ending in "#1" are reserved: each names the first dispatch of one run,
    so that two dispatches can never share one (the run id is unique, and no alias of the
    dispatch id guards it). `run_id` None: a run the service has not named yet."""
    owner = run_of_first_dispatch(dispatch_id)
    if owner is not None and owner != run_id:
        raise ValidationError(
            f"dispatch_id '{dispatch_id[:64]}' is reserved: ids ending in '{FIRST_DISPATCH_SUFFIX}' name the "
            f"first dispatch of the run before it ('{owner[:64]}'), not of run '{(run_id or '(new)')[:64]}'",
            field="dispatch_id",
            id=dispatch_id[:64],
        )


def _non_negative(d: RunDispatch, field: str) -> None:
    value = getattr(d, field)
    if value is not None and value < 0:
        raise ValidationError(f"{field} must not be negative", field=field, id=d.dispatch_id)


def validate_identity_and_retry(d: RunDispatch) -> None:
    for field in ("dispatch_id", "thread_id", "run_id"):
        validate_id(getattr(d, field), field)
    if not 0 <= d.priority <= 255:
        raise ValidationError("priority must be within 0..255", field="priority", id=d.dispatch_id)
    for field in _COUNTS:
        _non_negative(d, field)
    if d.max_attempts <= 0:
        raise ValidationError("max_attempts must be greater than 0", field="max_attempts", id=d.dispatch_id)
    _attempts_within_limit(d)
    if d.dedupe_key is not None:
        validate_id(d.dedupe_key, "dedupe_key")


_COUNTS = frozenset(("dispatch_epoch", "available_at", "attempt_count", "created_at", "updated_at", "lease_until"))


def _attempts_within_limit(d: RunDispatch) -> None:
    if d.attempt_count > d.max_attempts:
        raise ValidationError("attempt_count must not exceed max_attempts", field="attempt_count", id=d.dispatch_id)


def validate_for_persist(d: RunDispatch) -> None:
    validate_identity_and_retry(d)
    _validate_lifecycle(d)


def _validate_lifecycle(d: RunDispatch) -> None:
    """The status's invariants: claim fields exactly while claimed, completion once terminal."""
    claim_fields = (d.claim_token, d.claimed_by, d.lease_until)
    if d.status == DispatchStatus.QUEUED:
        if any(f is not None for f in claim_fields):
            raise ValidationError(f"queued dispatch '{d.dispatch_id}' must not carry claim fields", id=d.dispatch_id)
        if d.completed_at is not None or any(getattr(d, f) is not None for f in _PROJECTION_FIELDS):
            raise ValidationError(
                f"queued dispatch '{d.dispatch_id}' must not carry runtime result fields", id=d.dispatch_id
            )
    elif d.status == DispatchStatus.CLAIMED:
        if not (d.claim_token or "").strip() or not (d.claimed_by or "").strip() or d.lease_until is None:
            raise ValidationError(
                f"claimed dispatch '{d.dispatch_id}' must carry claim_token, claimed_by and lease_until",
                id=d.dispatch_id,
            )
    else:
        if any(f is not None for f in claim_fields):
            raise ValidationError(
                f"terminal dispatch '{d.dispatch_id}' must not carry active lease fields", id=d.dispatch_id
            )
        if d.completed_at is None:
            raise ValidationError(f"terminal dispatch '{d.dispatch_id}' must carry completed_at", id=d.dispatch_id)


def validate_for_enqueue(d: RunDispatch) -> None:
    if d.status != DispatchStatus.QUEUED:
        validate_identity_and_retry(d)
        raise ValidationError(f"dispatch '{d.dispatch_id}' must start as Queued", field="status", id=d.dispatch_id)
    validate_for_persist(d)


def is_stale(d: RunDispatch, current_epoch: int) -> bool:
    return d.dispatch_epoch < current_epoch


# --------------------------------------------------------------------------- runs


class WaitingTicket(msgspec.Struct, frozen=True, omit_defaults=True):
    """A run is waiting for a decision on `ticket` (a human approval, say)."""

    ticket: str
    prompt: Any = None
    since: int = 0


class RunRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One user intent on a thread: its input, status and outcome. 1 run → many dispatches."""

    run_id: str
    thread_id: str
    status: RunStatus = RunStatus.CREATED
    input: Any = None
    metadata: dict[str, str] = {}
    priority: int = DEFAULT_PRIORITY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    dispatch_id: str | None = None
    """The dispatch that currently activates the run (or did last)."""
    dispatch_instance_id: str | None = None
    """The attempt (claim) of that dispatch that started the run last: a reclaimed dispatch's
    older attempt may no longer write the run."""
    output: Any = None
    error: str | None = None
    termination: Termination | None = None
    waiting: WaitingTicket | None = None
    decisions: dict[str, Any] = {}
    """Decisions delivered durably while the run waited, by ticket; consumed on resume."""
    attempts: int = 0
    """Handler executions started, over all dispatches of the run."""
    trace: dict[str, str] = {}
    """W3C trace context of the submit (traceparent/tracestate), restored around the handler."""
    created_at: int
    updated_at: int
    finished_at: int | None = None

    @property
    def is_done(self) -> bool:
        return self.status == RunStatus.DONE


def validate_run(run: RunRecord) -> None:
    validate_id(run.run_id, "run_id")
    validate_id(run.thread_id, "thread_id")
    if not 0 <= run.priority <= 255:
        raise ValidationError("priority must be within 0..255", field="priority", id=run.run_id)
    if run.max_attempts <= 0:
        raise ValidationError("max_attempts must be greater than 0", field="max_attempts", id=run.run_id)
    if run.dispatch_id is not None:
        validate_id(run.dispatch_id, "dispatch_id")


# --------------------------------------------------------------------------- results


class Interrupt(msgspec.Struct, frozen=True):
    """What an interrupt did: the thread's new epoch, the claimed dispatch it made stale
    (the caller cancels its run), and the queued dispatches it superseded."""

    new_dispatch_epoch: int
    active_dispatch: RunDispatch | None
    superseded: list[RunDispatch]

    @property
    def superseded_count(self) -> int:
        return len(self.superseded)
