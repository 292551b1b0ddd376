"""Wire formats of the service API (DESIGN.md §2.5): strict msgspec Structs.

Requests reject unknown fields, wrong types and out-of-range numbers at decoding; ids are
further checked by `model.validate_id` (non-blank, at most `MAX_ID_BYTES` UTF-8 bytes).
Replies are JSON-encoded Structs with defaults omitted. The JSON Schemas in `schemas/` are
generated from these (`python -m service.schemas`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .events import Event
from .model import MAX_ID_BYTES, RunDispatch, RunRecord

Strategy = Literal["enqueue", "interrupt", "reject", "steer"]

Id = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_ID_BYTES,
        pattern=r"\S",
        description=f"An id: any text that is not blank, at most {MAX_ID_BYTES} UTF-8 bytes.",
    ),
]
Priority = Annotated[int, Meta(ge=0, le=255, description="0 is the highest priority; default 128.")]
Limit = Annotated[int, Meta(ge=1, le=1000, description="Page size (1..1000).")]
Offset = Annotated[int, Meta(ge=0, le=10_000_000, description="Rows to skip (pagination).")]
Metadata = Annotated[dict[str, str], Meta(description="Free-form string labels, handed to the handler.")]


class _Request(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    pass


class _Reply(msgspec.Struct, omit_defaults=True, frozen=True):
    pass


# --------------------------------------------------------------------------- submit


class SubmitRequest(_Request):
    """Create a run (and its first dispatch) on a thread.

    `strategy`: `enqueue` queues behind the thread's work (default); `interrupt` supersedes
    the queued work and cancels the active run first (latest wins); `reject` fails with 409
    when the thread has queued or active work; `steer` hands `input` to the active run live
    and enqueues a new run only when no run is active. A repeated submit with the same
    `run_id`, or the same `dedupe_key` while that dispatch is live, returns the earlier run
    (`duplicate: true`)."""

    thread_id: Id
    input: Annotated[Any, Meta(description="Any JSON; at most MAILBOX_MAX_PAYLOAD bytes encoded.")] = None
    strategy: Strategy = "enqueue"
    priority: Priority = 128
    dedupe_key: Id | None = None
    delay_ms: Annotated[int, Meta(ge=0, le=365 * 86_400_000, description="Start no earlier than this many ms from now.")] | None = None
    max_attempts: Annotated[int, Meta(ge=1, le=1000, description="Attempts before dead-lettering; default from config.")] | None = None
    run_id: Id | None = None
    dispatch_id: Annotated[
        Id,
        Meta(description=f"An id (not blank, at most {MAX_ID_BYTES} UTF-8 bytes); default: the run id and '#1'. Ids ending in '#1' are reserved: each names the first dispatch of the run before it."),
    ] | None = None
    metadata: Metadata = {}


class SubmitReply(_Reply):
    run_id: str
    dispatch_id: str
    thread_id: str
    status: Literal["queued", "running"]
    duplicate: bool = False
    """True when an earlier submit with this run_id or dedupe_key is returned instead."""
    steered: bool = False
    """True when the input went to the thread's active run live (strategy `steer`)."""


# --------------------------------------------------------------------------- get / list


class GetRequest(_Request):
    """`{"run_id"}` (the run with its dispatches) or `{"dispatch_id"}` (the dispatch record);
    `thread_id`, when given, must be the record's thread (and saves a lookup)."""

    run_id: Id | None = None
    dispatch_id: Id | None = None
    thread_id: Id | None = None


class RunView(RunRecord, frozen=True, kw_only=True, omit_defaults=True):
    """A run (every field of the run record) with its dispatches, oldest first."""

    dispatches: list[RunDispatch] = []

    @classmethod
    def of(cls, run: RunRecord, dispatches: list[RunDispatch] | None = None) -> RunView:
        """The view of `run` with these dispatches (sorted oldest first)."""
        fields = {f: getattr(run, f) for f in RunRecord.__struct_fields__}
        ordered = sorted(dispatches or [], key=lambda d: (d.created_at, d.dispatch_id))
        return cls(**fields, dispatches=ordered)

    @property
    def record(self) -> RunRecord:
        """The run record alone."""
        return RunRecord(**{f: getattr(self, f) for f in RunRecord.__struct_fields__})


GetReply = RunView | RunDispatch
"""`get` answers a RunView for a run_id and the RunDispatch record for a dispatch_id."""

RunStatusName = Literal["created", "running", "waiting", "done"]
DispatchStatusName = Literal["queued", "claimed", "acked", "cancelled", "superseded", "dead_letter"]
RUN_STATUSES = frozenset(RunStatusName.__args__)
DISPATCH_STATUSES = frozenset(DispatchStatusName.__args__)


class ListRequest(_Request):
    """A thread's runs (oldest first) or, with `dispatches: true`, its dispatches (claim
    order); `status` filters by run statuses, or by dispatch statuses for dispatches."""

    thread_id: Id
    status: list[RunStatusName | DispatchStatusName] | None = None
    limit: Limit = 50
    offset: Offset = 0
    dispatches: bool = False


class ListReply(_Reply):
    runs: list[RunRecord] = []
    dispatches: list[RunDispatch] = []
    next_offset: int | None = None
    """The offset of the next page; absent on the last page."""


# --------------------------------------------------------------------------- cancel / interrupt


class CancelRequest(_Request):
    """Exactly one of `dispatch_id`, `run_id`, `thread_id`: queued work is cancelled, an
    active run receives a live cancel."""

    dispatch_id: Id | None = None
    run_id: Id | None = None
    thread_id: Id | None = None


class CancelReply(_Reply):
    cancelled: list[str] = []
    """Dispatch ids that were queued and are now cancelled."""
    signalled: list[str] = []
    """Run ids executing somewhere that received a live cancel."""


class InterruptRequest(_Request):
    """Bump the thread's epoch, supersede its queued work and cancel its active run."""

    thread_id: Id


class InterruptReply(_Reply):
    new_dispatch_epoch: int
    superseded: list[str] = []
    """Dispatch ids superseded."""
    active_run_id: str | None = None
    active_cancelled: bool = False
    """True when the active run's pod took the cancel."""


# --------------------------------------------------------------------------- decide / send


class DecideRequest(_Request):
    """A decision for a run waiting on `ticket`: handed over live when the run waits in its
    pod, else stored and the run resumed as a new dispatch (on any pod)."""

    run_id: Id
    ticket: Id
    decision: Annotated[Any, Meta(description="Any JSON; at most MAILBOX_MAX_PAYLOAD bytes encoded.")] = None


class DecideReply(_Reply):
    delivered: Literal["live", "durable"]
    dispatch_id: str | None = None
    """The resuming dispatch (durable delivery)."""


class SendRequest(_Request):
    """Input for the active run of a thread (`thread_id`) or for a given run (`run_id`),
    delivered live only: `delivered: false` when no such run is executing."""

    thread_id: Id | None = None
    run_id: Id | None = None
    input: Annotated[Any, Meta(description="Any JSON; at most MAILBOX_MAX_PAYLOAD bytes encoded.")] = None


class SendReply(_Reply):
    delivered: bool
    run_id: str | None = None
    reason: str | None = None
    """Why it was not delivered."""


# --------------------------------------------------------------------------- dead letters


class DeadLettersRequest(_Request):
    """Dead-lettered dispatches, oldest first; of one thread when `thread_id` is given
    (a point read), else of every thread (a scan)."""

    thread_id: Id | None = None
    limit: Limit = 50
    offset: Offset = 0


class DeadLettersReply(_Reply):
    dispatches: list[RunDispatch] = []
    next_offset: int | None = None


class ReplayRequest(_Request):
    """Re-queue a dead-lettered dispatch as a new dispatch of the same run."""

    dispatch_id: Id


class ReplayReply(_Reply):
    run_id: str
    dispatch_id: str
    """The new dispatch."""
    thread_id: str


# --------------------------------------------------------------------------- stats / events


class StatsRequest(_Request):
    """No fields (an empty body is accepted too)."""


class StatsReply(_Reply):
    depth: dict[str, int]
    """Dispatches by status (every status, zeros included)."""
    active_runs: int
    """Claimed dispatches: runs executing (or suspended in-run) now."""
    pods: int
    """Mailbox service instances of this prefix that answered a $SRV.PING."""


class EventsRequest(_Request):
    """A run's events with stream sequence > `after`, oldest first. With `wait_ms` > 0 and
    nothing there yet, the reply waits up to that long for the next event (a long poll)."""

    run_id: Id
    after: Annotated[int, Meta(ge=0, description="The last stream sequence already seen (0: from the start).")] = 0
    limit: Limit = 256
    wait_ms: Annotated[int, Meta(ge=0, le=60_000, description="Long-poll wait when nothing is there yet.")] = 0


class EventsReply(_Reply):
    events: list[Event] = []
    last_seq: int = 0
    """The last stream sequence read (the request's `after` when nothing new was there):
    pass it as `after` to read on."""


# --------------------------------------------------------------------------- errors


class ErrorBody(_Reply):
    code: int
    """400 bad input, 404 unknown id, 409 conflict, 500 internal error, 503 store unavailable."""
    message: str
    field: str | None = None
    """The request field at fault, when known."""


class ErrorReply(msgspec.Struct, frozen=True):
    """Every error reply; the `Nats-Service-Error` and `Nats-Service-Error-Code` headers
    carry the message and code too."""

    error: ErrorBody
