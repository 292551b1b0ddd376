"""Wire formats of the service API (DESIGN.md §2.5): strict msgspec Structs.

Requests reject unknown fields; the JSON Schemas in `schemas/` are generated from these.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .events import Event
from .model import RunDispatch, RunRecord

Strategy = Literal["enqueue", "interrupt", "reject", "steer"]


class _Request(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    pass


class SubmitRequest(_Request):
    thread_id: str
    input: Any = None
    strategy: Strategy = "enqueue"
    priority: int = 128
    dedupe_key: str | None = None
    delay_ms: int | None = None
    max_attempts: int | None = None
    run_id: str | None = None
    dispatch_id: str | None = None
    metadata: dict[str, str] = {}


class SubmitReply(msgspec.Struct, omit_defaults=True, frozen=True):
    run_id: str
    dispatch_id: str
    thread_id: str
    status: Literal["queued", "running"]
    duplicate: bool = False
    """True when an earlier submit with this run_id or dedupe_key is returned instead."""
    steered: bool = False
    """True when the input went to the thread's active run live (strategy `steer`)."""


class GetRequest(_Request):
    run_id: str | None = None
    dispatch_id: str | None = None
    thread_id: str | None = None


class RunView(msgspec.Struct, omit_defaults=True, frozen=True):
    """A run with its dispatches (newest last)."""

    run: RunRecord
    dispatches: list[RunDispatch] = []


class DispatchView(msgspec.Struct, omit_defaults=True, frozen=True):
    dispatch: RunDispatch


class ListRequest(_Request):
    thread_id: str
    status: list[Literal["created", "running", "waiting", "done"]] | None = None
    limit: int = 50
    offset: int = 0
    dispatches: bool = False
    """List the thread's dispatches instead of its runs."""


class ListReply(msgspec.Struct, omit_defaults=True, frozen=True):
    runs: list[RunRecord] = []
    dispatches: list[RunDispatch] = []
    next_offset: int | None = None


class CancelRequest(_Request):
    dispatch_id: str | None = None
    run_id: str | None = None
    thread_id: str | None = None


class CancelReply(msgspec.Struct, omit_defaults=True, frozen=True):
    cancelled: list[str] = []
    """Dispatch ids that were queued and are now cancelled."""
    signalled: list[str] = []
    """Run ids executing somewhere that received a live cancel."""


class InterruptRequest(_Request):
    thread_id: str


class InterruptReply(msgspec.Struct, omit_defaults=True, frozen=True):
    new_dispatch_epoch: int
    superseded: list[str] = []
    active_run_id: str | None = None
    active_cancelled: bool = False


class DecideRequest(_Request):
    run_id: str
    ticket: str
    decision: Any = None


class DecideReply(msgspec.Struct, omit_defaults=True, frozen=True):
    delivered: Literal["live", "durable"]
    dispatch_id: str | None = None


class SendRequest(_Request):
    thread_id: str | None = None
    run_id: str | None = None
    input: Any = None


class SendReply(msgspec.Struct, omit_defaults=True, frozen=True):
    delivered: bool
    run_id: str | None = None
    reason: str | None = None


class DeadLettersRequest(_Request):
    limit: int = 50
    offset: int = 0


class DeadLettersReply(msgspec.Struct, omit_defaults=True, frozen=True):
    dispatches: list[RunDispatch] = []
    next_offset: int | None = None


class ReplayRequest(_Request):
    dispatch_id: str


class ReplayReply(msgspec.Struct, omit_defaults=True, frozen=True):
    run_id: str
    dispatch_id: str
    thread_id: str


class StatsRequest(_Request):
    pass


class StatsReply(msgspec.Struct, omit_defaults=True, frozen=True):
    depth: dict[str, int]
    active_runs: int
    pods: int


class EventsRequest(_Request):
    run_id: str
    after: int = 0


class EventsReply(msgspec.Struct, omit_defaults=True, frozen=True):
    events: list[Event] = []


class ErrorBody(msgspec.Struct, omit_defaults=True, frozen=True):
    code: int
    message: str
    field: str | None = None


class ErrorReply(msgspec.Struct, frozen=True):
    error: ErrorBody
