"""The handler protocol (DESIGN.md §4) and the built-in handlers.

A handler is `async def handle(run: RunContext) -> Any`; its return value is the run's output.
Raise `TransientError` to retry with backoff, `PermanentError` to dead-letter; any other
exception counts as transient. Cancellation (cancel, interrupt, lost lease, shutdown) sets
`run.cancelled` and then raises `asyncio.CancelledError` at the handler's next await; a
handler that catches it to clean up may return, but the run still ends cancelled (what it
returns is not recorded).

Waiting for a human: `await run.wait_for_decision(ticket)` suspends the run (its lease becomes
the long suspended lease) and returns the decision when it is delivered live. If none comes
within the wait, the attempt ends as `waiting`; a later decision resumes the run as a new
dispatch, possibly on another pod, and the handler runs again from the top: this time
`wait_for_decision(ticket)` returns the stored decision at once. Write handlers so that a
re-run is safe (as with any at-least-once executor).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
import nats.errors


class TransientError(Exception):
    """A failure worth retrying (with capped exponential backoff)."""


class PermanentError(Exception):
    """A failure no retry will fix: the run is dead-lettered."""


class Suspended(Exception):
    """Raised inside `wait_for_decision` to end the attempt as `waiting` (not an error)."""

    def __init__(self, ticket: str, prompt: Any = None) -> None:
        super().__init__(f"waiting for decision on ticket '{ticket}'")
        self.ticket = ticket
        self.prompt = prompt


class RunHooks(Protocol):
    """What the worker does when a run emits, suspends or resumes."""

    async def emit(self, kind: str, data: Any) -> None: ...
    async def suspended(self, ticket: str, prompt: Any) -> None: ...
    async def resumed(self, ticket: str) -> None: ...


class RunContext:
    """What a handler sees of its run."""

    def __init__(
        self,
        *,
        thread_id: str,
        run_id: str,
        dispatch_id: str,
        attempt: int,
        input: Any,
        metadata: dict[str, str],
        decisions: dict[str, Any],
        hooks: RunHooks,
        decision_wait_ms: int,
        nats: Any = None,
    ) -> None:
        self.thread_id = thread_id
        self.run_id = run_id
        self.dispatch_id = dispatch_id
        self.attempt = attempt
        self.input = input
        self.metadata = metadata
        self.cancelled = asyncio.Event()
        self.nats = nats
        """The service's NATS connection (for handlers that call other services)."""
        self._decisions = dict(decisions)
        self._hooks = hooks
        self._decision_wait_ms = decision_wait_ms
        self._waiters: dict[str, asyncio.Future[Any]] = {}
        self._inputs: asyncio.Queue[Any] = asyncio.Queue()
        self.suspended = False

    async def emit(self, kind: str, data: Any = None) -> None:
        """Publish an event on the run's event stream (followers see it live)."""
        await self._hooks.emit(kind, data)

    async def wait_for_decision(self, ticket: str, timeout: float | None = None, prompt: Any = None) -> Any:
        """The decision for `ticket`. Suspends the run until it arrives; after `timeout`
        seconds (default: the service's decision wait) the attempt ends as `waiting`."""
        if ticket in self._decisions:
            return self._decisions[ticket]
        future = self._waiters.setdefault(ticket, asyncio.get_running_loop().create_future())
        self.suspended = True
        await self._hooks.suspended(ticket, prompt)
        wait = self._decision_wait_ms / 1000 if timeout is None else timeout
        try:
            decision = await asyncio.wait_for(asyncio.shield(future), wait)
        except TimeoutError:
            raise Suspended(ticket, prompt) from None
        finally:
            self.suspended = False
        self._decisions[ticket] = decision
        await self._hooks.resumed(ticket)
        return decision

    async def next_input(self, timeout: float | None = None) -> Any:
        """The next input sent to this run with `send`; TimeoutError after `timeout` seconds."""
        return await asyncio.wait_for(self._inputs.get(), timeout)

    # -- the worker's side -----------------------------------------------------------

    def deliver_decision(self, ticket: str, decision: Any) -> bool:
        """Hand a live decision to a waiting run; False if it is not waiting on `ticket`."""
        future = self._waiters.get(ticket)
        if future is None or future.done():
            return False
        future.set_result(decision)
        return True

    def deliver_input(self, data: Any) -> None:
        self._inputs.put_nowait(data)


Handler = Callable[[RunContext], Awaitable[Any]]


# --------------------------------------------------------------------------- built-ins


async def echo(run: RunContext) -> Any:
    """Streams its input back (word by word for text), then returns it."""
    text = run.input if isinstance(run.input, str) else msgspec.json.encode(run.input).decode()
    for word in text.split(" "):
        await run.emit("delta", word)
    return run.input


async def sleep(run: RunContext) -> Any:
    """Sleeps `input` seconds (a number, or `{"seconds": n}`), reporting progress each second."""
    seconds = run.input.get("seconds", 1) if isinstance(run.input, dict) else run.input
    try:
        total = float(seconds)
    except (TypeError, ValueError):
        raise PermanentError(f"sleep needs a number of seconds, got {seconds!r}") from None
    slept = 0.0
    while slept < total:
        step = min(1.0, total - slept)
        await asyncio.sleep(step)
        slept += step
        await run.emit("progress", {"slept": round(slept, 3), "of": total})
    return {"slept": total}


async def approval(run: RunContext) -> Any:
    """Asks for a decision on ticket `approval` (the input is the prompt) and returns it."""
    decision = await run.wait_for_decision("approval", prompt=run.input)
    approved = decision.get("approved", decision) if isinstance(decision, dict) else decision
    return {"approved": approved, "decision": decision}


class _NatsReply(msgspec.Struct):
    output: Any = None
    error: str | None = None
    permanent: bool = False


async def nats_forward(run: RunContext) -> Any:
    """Forwards the run by request/reply to `metadata["subject"]` (a handler in any language).

    Request: `{"run_id", "thread_id", "dispatch_id", "attempt", "input", "metadata"}`. Reply:
    `{"output": ...}` or `{"error": "...", "permanent": bool}`. No responder → transient.
    """
    subject = run.metadata.get("subject")
    if not subject:
        raise PermanentError("the nats handler needs metadata.subject")
    timeout = float(run.metadata.get("timeout_s", "60"))
    request = {
        "run_id": run.run_id,
        "thread_id": run.thread_id,
        "dispatch_id": run.dispatch_id,
        "attempt": run.attempt,
        "input": run.input,
        "metadata": run.metadata,
    }
    try:
        msg = await run.nats.request(subject, msgspec.json.encode(request), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise TransientError(f"no responder on {subject}") from None
    except nats.errors.TimeoutError:
        raise TransientError(f"no reply from {subject} within {timeout}s") from None
    try:
        reply = msgspec.json.decode(msg.data, type=_NatsReply)
    except msgspec.DecodeError as exc:
        raise PermanentError(f"malformed reply from {subject}: {exc}") from None
    if reply.error is not None:
        raise (PermanentError if reply.permanent else TransientError)(reply.error)
    return reply.output


BUILTIN: dict[str, Handler] = {"echo": echo, "sleep": sleep, "approval": approval, "nats": nats_forward}


def load_handler(spec: str) -> Handler:
    """A built-in by name (`echo`, `sleep`, `approval`, `nats`) or `module:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor 'module:function'")
    try:
        handler = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"handler {spec!r} cannot be loaded: {exc}") from None
    if not callable(handler):
        raise ValueError(f"handler {spec!r} is not callable")
    return handler
