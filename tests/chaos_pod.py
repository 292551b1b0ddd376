"""A pod in its own OS process for the chaos runner (tests/chaos.py).

    python -m tests.chaos_pod <nats_urls> <prefix> <journal> [key=value settings...]

`<nats_urls>` is one URL or several, comma-separated (as `MAILBOX_NATS_URL`).
Settings are `tests.pods.fast_settings(prefix, **overrides)`; every value is an integer.

It appends JSON lines to <journal> (O_APPEND, one `write` per line, so concurrent pods never
interleave). Every line has `event`, `pod` (the consumer id, `proc<pid>`) and `t` (wall
clock, `time.time()`, shared by all processes on the machine). Events:

- the handler: `start` and `exit` (`how`: ok, fail, suspended, cancelled, error) with `run`,
  `thread`, `dispatch`, `attempt`; `ask` (the handler calls `wait_for_decision`; `stored`
  tells whether the decision was already stored with the run) and `decided` (`token` of the
  decision it got);
- what the store accepted from this pod (the store object is wrapped, the service is not
  changed): `claim` (`t0`/`t1` around the call, the claimed `dispatch`, `attempt`, `token`),
  `begin` (record_dispatch_start, when the claim did not record the start itself), `settle` (`op`: complete, nack, dead_letter,
  supersede_claimed; `ok`: true, "conflict" or "error"), `renew_lost` (a lease renewal
  answered "claim lost"), `run_write` (a run record changed by this pod: `dispatch` and
  `token` of the execution that wrote it, the new `status`, `term`, `error`, `t0`/`t1`).

The handler's input is `{"i": n, "sleep": s, "fail": bool, "decide": bool}`: it asks for a
decision on ticket "approval" when `decide`, sleeps `sleep` seconds, and raises a
TransientError on its first attempt when `fail`. SIGTERM drains gracefully, exit 0.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from service.app import start_pod
from service.handlers import RunContext, Suspended, TransientError
from service.model import VersionConflictError

from .pods import fast_settings

# the execution a run-record write belongs to, when made from the handler's own task
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("chaos_dispatch", default=None)


class Journal:
    def __init__(self, path: str, pod: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pod = pod

    def note(self, event: str, **fields: Any) -> None:
        line = {"event": event, "pod": self.pod, "t": time.time(), **fields}
        os.write(self.fd, (json.dumps(line) + "\n").encode())


def make_handler(journal: Journal):
    async def handler(run: RunContext) -> Any:
        _current.set(run.dispatch_id)
        spec = run.input if isinstance(run.input, dict) else {}
        ids = {"run": run.run_id, "thread": run.thread_id, "dispatch": run.dispatch_id, "attempt": run.attempt}
        journal.note("start", **ids)
        how = "error"
        try:
            if spec.get("decide"):
                stored = "approval" in run._decisions  # noqa: SLF001 (test instrumentation)
                journal.note("ask", stored=stored, **ids)
                decision = await run.wait_for_decision("approval")
                token = decision.get("token") if isinstance(decision, dict) else None
                journal.note("decided", token=token, stored=stored, **ids)
            await asyncio.sleep(float(spec.get("sleep", 0)))
            if spec.get("fail") and run.attempt == 1:
                how = "fail"
                raise TransientError("injected")
            how = "ok"
            return {"i": spec.get("i"), "pod": journal.pod, "dispatch": run.dispatch_id, "attempt": run.attempt}
        except Suspended:
            how = "suspended"
            raise
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        finally:
            journal.note("exit", how=how, **ids)

    return handler


def instrument(store: Any, journal: Journal) -> None:
    """Wrap the store's methods on this instance to journal what the store accepted."""
    tokens: dict[str, str] = {}  # dispatch -> token of this pod's latest claim on it

    def outcome(exc: BaseException | None) -> Any:
        if exc is None:
            return True
        if isinstance(exc, VersionConflictError):
            return "conflict"
        if isinstance(exc, asyncio.CancelledError):
            return "cancelled"  # the call was abandoned midway: its write may or may not have landed
        return "error"

    claim = store.claim

    async def claim_(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        claimed = await claim(*args, **kwargs)
        t1 = time.time()
        for d in claimed:
            tokens[d.dispatch_id] = d.claim_token or ""
            # a claim may record the attempt's start in the same write (then it carries the instance)
            journal.note("claim", thread=d.thread_id, run=d.run_id, dispatch=d.dispatch_id,
                         attempt=d.attempt_count + 1, token=d.claim_token, instance=d.dispatch_instance_id,
                         t0=t0, t1=t1)
        return claimed

    store.claim = claim_

    begin = store.record_dispatch_start

    async def begin_(dispatch_id: str, claim_token: str, instance: str, *args: Any, **kwargs: Any) -> Any:
        exc: BaseException | None = None
        try:
            return await begin(dispatch_id, claim_token, instance, *args, **kwargs)
        except BaseException as e:
            exc = e
            raise
        finally:
            journal.note("begin", dispatch=dispatch_id, token=claim_token, instance=instance, ok=outcome(exc))

    store.record_dispatch_start = begin_

    def settle(op: str) -> None:
        original = getattr(store, op)

        async def wrapped(dispatch_id: str, claim_token: str, *args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            stats = store.stats
            before = (stats.conflicts, stats.lost_replies_recovered, stats.snapshots)
            exc: BaseException | None = None
            try:
                return await original(dispatch_id, claim_token, *args, **kwargs)
            except BaseException as e:
                exc = e
                raise
            finally:
                after = (stats.conflicts, stats.lost_replies_recovered, stats.snapshots)
                journal.note("settle", op=op, dispatch=dispatch_id, token=claim_token, ok=outcome(exc),
                             t0=t0, t1=time.time(), stats=[a - b for a, b in zip(after, before)],
                             error=repr(exc)[:200] if exc else None)

        setattr(store, op, wrapped)

    for op in ("complete", "nack", "dead_letter", "supersede_claimed", "ack"):
        settle(op)

    extend = store.extend_lease

    async def extend_(dispatch_id: str, claim_token: str, *args: Any, **kwargs: Any) -> Any:
        ok = await extend(dispatch_id, claim_token, *args, **kwargs)
        if not ok:
            journal.note("renew_lost", dispatch=dispatch_id, token=claim_token)
        return ok

    store.extend_lease = extend_

    update_run = store.update_run

    async def update_run_(run_id: str, change: Any, *args: Any, **kwargs: Any) -> Any:
        dispatch = _current.get()
        task = asyncio.current_task()
        if dispatch is None and task is not None and task.get_name().startswith("run-"):
            dispatch = task.get_name()[4:]
        last: list[Any] = [None]
        before: list[Any] = [None]

        def tracked(r: Any) -> Any:
            before[0] = r
            last[0] = change(r)
            return last[0]

        t0 = time.time()
        result = await update_run(run_id, tracked, *args, **kwargs)
        new = last[0]
        if new is not None and new != before[0]:
            journal.note(
                "run_write", run=run_id, dispatch=dispatch, token=tokens.get(dispatch or ""),
                status=str(new.status), term=str(new.termination.type) if new.termination else None,
                error=new.error, t0=t0, t1=time.time(),
            )
        return result

    store.update_run = update_run_


def trace_writes(store: Any, journal: Journal) -> None:
    """Diagnostics (MAILBOX_CHAOS_TRACE=1): journal every KV publish with its guard and result,
    so a thread's accepted writes can be checked to form one chain of revisions."""
    request = store._request  # noqa: SLF001

    async def request_(subject: str, data: bytes, headers: dict[str, str], *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            reply = await request(subject, data, headers, *args, **kwargs)
        except BaseException as exc:
            journal.note("pub", subject=subject, guard=headers.get("Nats-Expected-Last-Subject-Sequence"),
                         filter=headers.get("Nats-Expected-Last-Subject-Sequence-Subject"), t0=t0,
                         error=repr(exc)[:120])
            raise
        try:
            ack = json.loads(reply.data)
        except ValueError:
            ack = {}
        journal.note("pub", subject=subject, guard=headers.get("Nats-Expected-Last-Subject-Sequence"),
                     filter=headers.get("Nats-Expected-Last-Subject-Sequence-Subject"), t0=t0,
                     seq=ack.get("seq"), err=(ack.get("error") or {}).get("err_code"),
                     batch=headers.get("Nats-Batch-Id"))
        return reply

    store._request = request_  # noqa: SLF001


def main() -> None:
    urls, prefix, journal_path, *rest = sys.argv[1:]
    overrides = {k: int(v) for k, v in (a.split("=", 1) for a in rest)}
    pod_name = f"proc{os.getpid()}"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {pod_name} %(name)s %(levelname)s %(message)s")
    journal = Journal(journal_path, pod_name)

    async def run() -> None:
        pod = await start_pod(fast_settings(prefix, **overrides), url=urls, handler=make_handler(journal),
                              consumer_id=pod_name, start_api=False, start_worker=False)
        instrument(pod.store, journal)  # before the worker claims anything
        if os.environ.get("MAILBOX_CHAOS_TRACE") == "1":
            trace_writes(pod.store, journal)
        await pod.worker.start(recover=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        journal.note("pod_up", pid=os.getpid())
        print("ready", flush=True)
        await stop.wait()
        await pod.stop()
        journal.note("pod_down", pid=os.getpid())

    asyncio.run(run())


if __name__ == "__main__":
    main()
