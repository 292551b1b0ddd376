"""The `mailbox` command: run the service (`serve`) and talk to it (every other command).

Exit codes (scripts can rely on them):
  0  ok
  1  the run failed: it was dead-lettered, cancelled or superseded (watch, wait,
     submit --watch/--wait); also an internal error of the service (500)
  2  usage error: bad arguments, bad configuration, or a request the service rejected (400)
  3  not found (404)
  4  conflict (409), e.g. `submit --strategy reject` on a busy thread; `send` not delivered
  5  unavailable: no NATS connection, no service answering, store unavailable (503), timeout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import msgspec
import nats.errors

from . import __version__
from .config import mask_url
from .tuning import MMAP_THRESHOLD, YOUNG_THRESHOLD, fix_mmap_threshold, freeze_startup_objects, raise_young_threshold

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNAVAILABLE = 5

DEFAULT_URL = "nats://127.0.0.1:4222"
EMBEDDED_PORT = 4222

_EXIT_BY_CODE = {400: EXIT_USAGE, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT, 503: EXIT_UNAVAILABLE}

_json = msgspec.json.Encoder()


class UsageError(Exception):
    """A bad argument found after parsing (exit 2)."""


# --------------------------------------------------------------------------- parser

EPILOG = """\
environment:
  MAILBOX_NATS_URL   NATS server URL(s), comma-separated (default for the client commands: nats://127.0.0.1:4222;
                     unset for `serve`: start an embedded nats-server under MAILBOX_DATA_DIR)
  MAILBOX_PREFIX     the mailbox's prefix: subjects, streams and bucket names derive from it (default: mailbox)
  Every MAILBOX_* setting of `serve` is listed by `mailbox serve --print-config`.

exit codes:
  0 ok, 1 run failed (dead-lettered, cancelled, superseded) or internal error, 2 usage error or
  request rejected (400), 3 not found (404), 4 conflict (409), 5 unavailable or connection error

examples:
  mailbox serve                                   # embedded NATS, echo handler
  mailbox submit chat-42 "hello world" --watch    # submit, then follow the run to its end
  mailbox submit chat-42 '{"n": 1}' --strategy interrupt --json
  mailbox watch 0190f3c2-...                      # follow a run's events live
  mailbox decide 0190f3c2-... approval '{"approved": true}'
  mailbox dlq list && mailbox dlq replay 0190f3c3-...
"""


def _common(defaults: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command (`mailbox --json get X` = `mailbox get X --json`)."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    g.add_argument("--url", default=d(None), metavar="URL",
                   help=f"NATS server URL(s), comma-separated (env MAILBOX_NATS_URL; default {DEFAULT_URL})")
    g.add_argument("--prefix", default=d(None), metavar="PREFIX",
                   help="the mailbox prefix (env MAILBOX_PREFIX; default mailbox)")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="machine-readable output: one JSON document per line")
    g.add_argument("--timeout", type=float, default=d(5.0), metavar="SECONDS",
                   help="request timeout in seconds (default 5)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common(defaults=False)
    parser = argparse.ArgumentParser(
        prog="mailbox",
        description=(
            "A durable, per-thread run mailbox on NATS JetStream. Other services submit runs addressed "
            "to a thread; at most one run per thread executes at a time, across all pods."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"mailbox {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=description or help, parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command(
        "serve",
        "run a pod: worker manager and the service API",
        "Run one pod: it executes runs with the configured handler (MAILBOX_HANDLER, default echo) and serves "
        "the API (NATS micro service 'mailbox', subjects <prefix>.api.*). Settings come from MAILBOX_* variables. "
        "Without MAILBOX_NATS_URL it starts an embedded nats-server with JetStream under MAILBOX_DATA_DIR/nats "
        "(port 4222 if free), so a second `serve` finds the same data. SIGTERM or Ctrl-C stops gracefully: "
        "runs in flight finish (up to MAILBOX_DRAIN_TIMEOUT_MS) before it exits.",
    )
    p.add_argument("--print-config", action="store_true", help="print the effective settings (secrets masked) and exit")

    p = command(
        "submit",
        "create a run on a thread",
        "Create a run on THREAD. INPUT is parsed as JSON when it is valid JSON (42, true, {\"a\": 1}), "
        "else taken as text; '-' reads it from stdin.",
    )
    p.add_argument("positional", metavar="THREAD INPUT", nargs="*",
                   help="the thread id (the serialization key), then the run's input (JSON or text; '-' = stdin)")
    p.add_argument("--thread", "-t", metavar="THREAD", help="the thread id, instead of the first positional argument")
    p.add_argument("--text", action="store_true", help="take INPUT as text even if it parses as JSON")
    p.add_argument(
        "--strategy", choices=["enqueue", "interrupt", "reject", "steer"], default="enqueue",
        help="enqueue: queue behind the thread's work (default); interrupt: supersede queued work and cancel the "
             "active run (latest wins); reject: fail (exit 4) if the thread is busy; steer: hand the input to the "
             "active run live, else enqueue",
    )
    p.add_argument("--priority", type=int, metavar="0..255", help="0 starts first (default 128)")
    p.add_argument("--dedupe-key", metavar="KEY", help="a second submit with this key, while the first is live, returns the first")
    p.add_argument("--delay-ms", type=int, metavar="MS", help="do not start before MS milliseconds from now")
    p.add_argument("--max-attempts", type=int, metavar="N", help="attempts before dead-lettering (default from the service)")
    p.add_argument("--run-id", metavar="ID", help="your own run id: resubmitting it returns the same run (safe retries)")
    p.add_argument("--dispatch-id", metavar="ID", help="your own id for the first dispatch")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata for the handler (repeatable)")
    then = p.add_mutually_exclusive_group()
    then.add_argument("--watch", action="store_true", help="then follow the run's events until it ends (exit as `watch`)")
    then.add_argument("--wait", action="store_true", help="then wait for the run to end and print it (exit as `wait`)")

    p = command(
        "watch",
        "follow a run's events live until it ends",
        "Print a run's events as they happen, one line each ('+0.012s started (attempt 1)'), until the run ends. "
        "With --json: one JSON event per line (with its stream sequence 'seq'). Reconnects by itself. "
        "Exit 0 when the run finished, 1 when it was dead-lettered, cancelled or superseded.",
    )
    p.add_argument("run", metavar="RUN_ID")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="start after this stream sequence (resume a watch)")

    p = command("wait", "wait for a run to end and print it", "Wait until the run is done, print it, exit 0 if it finished, 1 if not.")
    p.add_argument("run", metavar="RUN_ID")
    p.add_argument("--for", dest="wait_for", type=float, default=None, metavar="SECONDS", help="give up after SECONDS (exit 5)")

    p = command("get", "show a run (or a dispatch)", "Show a run: status, input, output or error, waiting ticket, dispatches.")
    p.add_argument("run", metavar="RUN_ID", nargs="?")
    p.add_argument("--dispatch", metavar="DISPATCH_ID", help="show this dispatch record instead")

    p = command("list", "list a thread's runs (or dispatches)")
    p.add_argument("thread", metavar="THREAD")
    p.add_argument("--status", action="append", metavar="STATUS",
                   help="filter (repeatable): created, running, waiting, done; with --dispatches: queued, claimed, "
                        "acked, cancelled, superseded, dead_letter")
    p.add_argument("--dispatches", action="store_true", help="list dispatches (queue entries) instead of runs")
    p.add_argument("--limit", type=int, default=50, help="page size (default 50)")
    p.add_argument("--offset", type=int, default=0, help="skip this many (see 'next offset')")

    p = command(
        "cancel",
        "cancel a run, a dispatch or a whole thread",
        "Queued work is cancelled; an active run is sent a live cancel. Give RUN_ID, or --dispatch, or --thread.",
    )
    p.add_argument("run", metavar="RUN_ID", nargs="?")
    p.add_argument("--dispatch", metavar="DISPATCH_ID", help="cancel this dispatch")
    p.add_argument("--thread", metavar="THREAD", help="cancel everything queued or running on this thread")

    p = command(
        "interrupt",
        "supersede a thread's queued work and cancel its active run",
        "Bump the thread's epoch: queued dispatches are superseded and the active run is cancelled. "
        "(To replace the work with a new run in one step: `mailbox submit THREAD INPUT --strategy interrupt`.)",
    )
    p.add_argument("thread", metavar="THREAD")

    p = command(
        "decide",
        "deliver a decision to a run waiting on a ticket",
        "Deliver DECISION (JSON or text) for TICKET to a waiting run: live when the run waits in its pod, "
        "else stored, and the run resumes on any pod.",
    )
    p.add_argument("run", metavar="RUN_ID")
    p.add_argument("ticket", metavar="TICKET", help="the ticket the run waits on (see `mailbox get RUN_ID`)")
    p.add_argument("decision", metavar="DECISION", nargs="?", default="true", help="JSON or text (default: true)")
    p.add_argument("--text", action="store_true", help="take DECISION as text even if it parses as JSON")

    p = command(
        "send",
        "hand input to the active run of a thread (or a run)",
        "Deliver INPUT live to the run executing now. Exit 4 when it was not delivered (no run is active).",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--thread", metavar="THREAD")
    target.add_argument("--run", metavar="RUN_ID")
    p.add_argument("input", metavar="INPUT", help="JSON or text ('-' = stdin)")
    p.add_argument("--text", action="store_true", help="take INPUT as text even if it parses as JSON")

    dlq = command("dlq", "dead letters: list and replay", "Dead-lettered dispatches: runs that failed for good.")
    dsub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    p = dsub.add_parser("list", help="list dead-lettered dispatches", parents=[common])
    p.add_argument("--thread", metavar="THREAD", help="of this thread only")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p = dsub.add_parser("replay", help="re-queue a dead-lettered dispatch as a new dispatch of its run", parents=[common])
    p.add_argument("dispatch", metavar="DISPATCH_ID")

    command("stats", "queue depth by status, active runs, pods")
    return parser


# --------------------------------------------------------------------------- helpers


def parse_value(raw: str | None, *, text: bool = False, stdin: TextIO | None = None) -> Any:
    """JSON if it parses, else the text; '-' reads stdin; None stays None."""
    if raw is None:
        return None
    if raw == "-":
        raw = (stdin or sys.stdin).read()
        if raw.endswith("\n"):
            raw = raw[:-1]
    if text:
        return raw
    try:
        return msgspec.json.decode(raw.encode())
    except msgspec.DecodeError:
        return raw


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _show(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else _json.encode(value).decode()
    text = " ".join(text.split("\n"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


class Output:
    """Where and how results are printed."""

    def __init__(self, as_json: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def doc(self, value: Any) -> None:
        self.out.write(_json.encode(value).decode() + "\n")
        self.out.flush()

    def error(self, message: str, code: int | None = None, field: str | None = None) -> None:
        if self.as_json:
            body: dict[str, Any] = {"message": message}
            if code is not None:
                body["code"] = code
            if field is not None:
                body["field"] = field
            print(_json.encode({"error": body}).decode(), file=self.err, flush=True)
        else:
            print(f"error: {message}" + (f" (field: {field})" if field else ""), file=self.err, flush=True)


# --------------------------------------------------------------------------- event display


class EventPrinter:
    """One readable line per event: `+0.012s started (attempt 1)`."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.t0: int | None = None

    def __call__(self, ev: Any) -> None:
        if self.out.as_json:
            self.out.doc(ev)
            return
        if self.t0 is None:
            self.t0 = ev.ts_ms
        self.out.line(f"+{(ev.ts_ms - self.t0) / 1000:.3f}s {describe_event(ev)}")


def describe_event(ev: Any) -> str:
    data = ev.data if isinstance(ev.data, dict) else {}
    kind = ev.kind
    if kind == "queued":
        extra = []
        if "replay_of" in data:
            extra.append(f"replay of {data['replay_of']}")
        if "resume" in data:
            extra.append(f"to resume with the decision on '{data['resume']}'")
        if "strategy" in data and data.get("strategy") != "enqueue":
            extra.append(f"strategy {data['strategy']}")
        if "priority" in data and data.get("priority") != 128:
            extra.append(f"priority {data['priority']}")
        if data.get("recovered"):
            extra.append("recovered")
        return "queued" + (f" ({', '.join(extra)})" if extra else "")
    if kind in ("started", "resumed"):
        pod = f", pod {data['pod']}" if "pod" in data else ""
        ticket = f", ticket '{data['ticket']}'" if "ticket" in data else ""
        return f"{kind} (attempt {ev.attempt}{pod}{ticket})"
    if kind == "suspended":
        prompt = f" (prompt: {_show(data.get('prompt'))})" if data.get("prompt") is not None else ""
        return (
            f"suspended: waiting for a decision on ticket '{data.get('ticket')}'{prompt}; "
            f"decide with: mailbox decide {ev.run_id} {data.get('ticket')} '<json>'"
        )
    if kind == "finished":
        return f"finished: {_show(data.get('output'))}"
    if kind == "rescheduled":
        reason = data.get("reason", "retry")
        error = f" after error: {_show(data['error'])}" if data.get("error") else ""
        retry_at = data.get("retry_at")
        delay = f", retry in {(retry_at - ev.ts_ms) / 1000:.3f}s" if isinstance(retry_at, int) else ""
        return f"rescheduled ({reason}{delay}){error}"
    if kind == "dead_lettered":
        attempts = data.get("attempts")
        after = f" after {attempts} attempt(s)" if attempts else ""
        return f"dead-lettered{after}: {_show(data.get('error'))}"
    if kind in ("cancelled", "superseded"):
        reason = data.get("reason")
        return kind + (f" ({reason})" if reason and reason != kind else "")
    kind = " ".join(kind.split()) or "?"
    if ev.data is None:
        return kind
    return f"{kind} {_show(ev.data)}"


def run_exit_code(status: Any, error: Any, termination: Any) -> int:
    """0 when a done run succeeded, 1 when it failed, was cancelled or superseded."""
    if str(status) != "done":
        return EXIT_RUN_FAILED
    kind = getattr(termination, "type", None)
    if error is not None or (kind is not None and str(kind) not in ("natural_end", "behavior_requested")):
        return EXIT_RUN_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------- client commands


async def _client(args: argparse.Namespace) -> Any:
    from .client import MailboxClient

    url = args.url or os.environ.get("MAILBOX_NATS_URL") or DEFAULT_URL
    prefix = args.prefix or os.environ.get("MAILBOX_PREFIX") or "mailbox"
    return await MailboxClient.connect(url, prefix, timeout=args.timeout, connect_attempts=2)


async def _watch(client: Any, out: Output, run_id: str, after: int = 0) -> int:
    """Print the run's events until a final one; exit 0 if it finished, 1 otherwise."""
    printer = EventPrinter(out)
    last = None
    async for ev in client.follow(run_id, after=after):
        printer(ev)
        last = ev
    if last is not None and last.kind == "finished":
        return EXIT_OK
    if not out.as_json and last is not None:
        out.line(f"run {run_id} did not finish: {last.kind}")
    return EXIT_RUN_FAILED


async def _wait(client: Any, out: Output, run_id: str, timeout: float | None) -> int:
    try:
        view = await client.wait(run_id, timeout)
    except TimeoutError:
        out.error(f"run {run_id} is not done after {timeout}s", 503)
        return EXIT_UNAVAILABLE
    print_run(out, view)
    return run_exit_code(view.status, view.error, view.termination)


def print_run(out: Output, view: Any) -> None:
    if out.as_json:
        out.doc(view)
        return
    rows = [
        ("run", view.run_id),
        ("thread", view.thread_id),
        ("status", str(view.status)),
        ("attempts", f"{view.attempts} (max {view.max_attempts} per dispatch)"),
        ("priority", str(view.priority)),
        ("input", _show(view.input)),
    ]
    if view.metadata:
        rows.append(("metadata", _show(view.metadata)))
    if view.output is not None:
        rows.append(("output", _show(view.output, 1000)))
    if view.error is not None:
        rows.append(("error", _show(view.error, 1000)))
    if view.termination is not None:
        rows.append(("ended", str(view.termination.type) + (f" ({_show(view.termination.value)})" if view.termination.value else "")))
    if view.waiting is not None:
        prompt = f" (prompt: {_show(view.waiting.prompt)})" if view.waiting.prompt is not None else ""
        rows.append(("waiting", f"ticket '{view.waiting.ticket}'{prompt}"))
        rows.append(("", f"decide with: mailbox decide {view.run_id} {view.waiting.ticket} '<json>'"))
    rows.append(("created", _when(view.created_at)))
    if view.finished_at:
        rows.append(("finished", _when(view.finished_at)))
    for key, value in rows:
        out.line(f"{key:<9} {value}")
    if view.dispatches:
        out.line("dispatches:")
        for d in view.dispatches:
            out.line("  " + _dispatch_line(d))


def _dispatch_line(d: Any) -> str:
    # a dispatch's attempt_count is what failures and lost leases have used of max_attempts
    # (a permanent failure dead-letters without using any), not the executions it had
    parts = [d.dispatch_id, f"{str(d.status):<11}", f"retry budget {d.attempt_count}/{d.max_attempts}", f"epoch {d.dispatch_epoch}"]
    if d.claimed_by:
        parts.append(f"on {d.claimed_by}")
    if d.last_error:
        parts.append(f"last error: {_show(d.last_error, 120)}")
    return "  ".join(parts)


def _thread_and_input(args: argparse.Namespace) -> tuple[str, str | None]:
    """`submit THREAD [INPUT]` or `submit --thread THREAD [INPUT]`."""
    rest = list(args.positional)
    thread = args.thread if args.thread is not None else (rest.pop(0) if rest else None)
    if thread is None:
        raise UsageError("give the thread: `mailbox submit THREAD INPUT` or `mailbox submit --thread THREAD INPUT`")
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])} (quote an input with spaces)")
    return thread, rest[0] if rest else None


async def cmd_submit(client: Any, args: argparse.Namespace, out: Output) -> int:
    args.thread, args.input = _thread_and_input(args)
    reply = await client.submit(
        args.thread,
        parse_value(args.input, text=args.text),
        strategy=args.strategy,
        priority=args.priority,
        dedupe_key=args.dedupe_key,
        delay_ms=args.delay_ms,
        max_attempts=args.max_attempts,
        run_id=args.run_id,
        dispatch_id=args.dispatch_id,
        metadata=_metadata(args.meta),
    )
    if out.as_json:
        out.doc(reply)
    elif reply.steered:
        out.line(f"input handed to the active run {reply.run_id} on thread {reply.thread_id}")
    else:
        dup = " (duplicate: the earlier submit's run)" if reply.duplicate else ""
        out.line(f"run {reply.run_id} {reply.status} on thread {reply.thread_id} (dispatch {reply.dispatch_id}){dup}")
    if args.watch:
        return await _watch(client, out, reply.run_id)
    if args.wait:
        return await _wait(client, out, reply.run_id, None)
    return EXIT_OK


async def cmd_watch(client: Any, args: argparse.Namespace, out: Output) -> int:
    return await _watch(client, out, args.run, args.after)


async def cmd_wait(client: Any, args: argparse.Namespace, out: Output) -> int:
    return await _wait(client, out, args.run, args.wait_for)


async def cmd_get(client: Any, args: argparse.Namespace, out: Output) -> int:
    if (args.run is None) == (args.dispatch is None):
        raise UsageError("give RUN_ID or --dispatch DISPATCH_ID")
    if args.dispatch is not None:
        d = await client.get_dispatch(args.dispatch)
        if out.as_json:
            out.doc(d)
        else:
            for key in ("dispatch_id", "thread_id", "run_id", "status", "priority", "dispatch_epoch", "attempt_count",
                        "max_attempts", "last_error", "claimed_by", "dedupe_key"):
                value = getattr(d, key)
                if value is not None:
                    out.line(f"{key:<15} {value}")
            for key in ("available_at", "lease_until", "created_at", "updated_at", "completed_at"):
                value = getattr(d, key)
                if value:
                    out.line(f"{key:<15} {_when(value)}")
        return EXIT_OK
    print_run(out, await client.get(args.run))
    return EXIT_OK


async def cmd_list(client: Any, args: argparse.Namespace, out: Output) -> int:
    reply = await client.list(args.thread, status=args.status, limit=args.limit, offset=args.offset,
                              dispatches=args.dispatches)
    if out.as_json:
        out.doc(reply)
        return EXIT_OK
    if args.dispatches:
        for d in reply.dispatches:
            out.line(_dispatch_line(d))
        count = len(reply.dispatches)
    else:
        for r in reply.runs:
            outcome = f"error: {_show(r.error, 80)}" if r.error else (f"output: {_show(r.output, 80)}" if r.output is not None else "")
            waiting = f"waiting on '{r.waiting.ticket}'" if r.waiting else ""
            out.line(f"{r.run_id}  {str(r.status):<8} {_when(r.created_at)}  {waiting or outcome}".rstrip())
        count = len(reply.runs)
    if count == 0:
        out.line(f"nothing on thread {args.thread}" + (" with that status" if args.status else ""))
    if reply.next_offset is not None:
        out.line(f"(more: --offset {reply.next_offset})")
    return EXIT_OK


async def cmd_cancel(client: Any, args: argparse.Namespace, out: Output) -> int:
    given = [x for x in (args.run, args.dispatch, args.thread) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of RUN_ID, --dispatch, --thread")
    reply = await client.cancel(run_id=args.run, dispatch_id=args.dispatch, thread_id=args.thread)
    if out.as_json:
        out.doc(reply)
        return EXIT_OK
    if reply.cancelled:
        out.line(f"cancelled {len(reply.cancelled)} queued dispatch(es): {', '.join(reply.cancelled)}")
    if reply.signalled:
        out.line(f"sent a live cancel to running run(s): {', '.join(reply.signalled)}")
    if not reply.cancelled and not reply.signalled:
        out.line("nothing to cancel (already done, or its pod did not answer; see `mailbox get`)")
    return EXIT_OK


async def cmd_interrupt(client: Any, args: argparse.Namespace, out: Output) -> int:
    reply = await client.interrupt(args.thread)
    if out.as_json:
        out.doc(reply)
        return EXIT_OK
    out.line(f"thread {args.thread} is at epoch {reply.new_dispatch_epoch}")
    out.line(f"superseded {len(reply.superseded)} queued dispatch(es)" + (f": {', '.join(reply.superseded)}" if reply.superseded else ""))
    if reply.active_run_id:
        state = "cancelled" if reply.active_cancelled else "made stale (its pod did not answer; it stops at its next store write)"
        out.line(f"active run {reply.active_run_id} {state}")
    return EXIT_OK


async def cmd_decide(client: Any, args: argparse.Namespace, out: Output) -> int:
    reply = await client.decide(args.run, args.ticket, parse_value(args.decision, text=args.text))
    if out.as_json:
        out.doc(reply)
    elif reply.delivered == "live":
        out.line(f"decision delivered live to run {args.run}")
    else:
        out.line(f"decision stored; run {args.run} resumes as dispatch {reply.dispatch_id}")
    return EXIT_OK


async def cmd_send(client: Any, args: argparse.Namespace, out: Output) -> int:
    reply = await client.send(parse_value(args.input, text=args.text), thread_id=args.thread, run_id=args.run)
    if out.as_json:
        out.doc(reply)
    elif reply.delivered:
        out.line(f"delivered to run {reply.run_id}")
    else:
        out.line(f"not delivered: {reply.reason or 'no run is active'}")
    return EXIT_OK if reply.delivered else EXIT_CONFLICT


async def cmd_dlq(client: Any, args: argparse.Namespace, out: Output) -> int:
    if args.dlq_command == "replay":
        reply = await client.replay(args.dispatch)
        if out.as_json:
            out.doc(reply)
        else:
            out.line(f"replayed: run {reply.run_id} on thread {reply.thread_id} is queued again as dispatch {reply.dispatch_id}")
        return EXIT_OK
    reply = await client.dead_letters(thread_id=args.thread, limit=args.limit, offset=args.offset)
    if out.as_json:
        out.doc(reply)
        return EXIT_OK
    for d in reply.dispatches:
        out.line(f"{d.dispatch_id}  thread {d.thread_id}  run {d.run_id}  retry budget {d.attempt_count}/{d.max_attempts}  "
                 f"{_when(d.completed_at)}  {_show(d.last_error, 120) if d.last_error else ''}".rstrip())
    if not reply.dispatches:
        out.line("no dead letters")
    else:
        out.line("replay one with: mailbox dlq replay DISPATCH_ID")
    if reply.next_offset is not None:
        out.line(f"(more: --offset {reply.next_offset})")
    return EXIT_OK


async def cmd_stats(client: Any, args: argparse.Namespace, out: Output) -> int:
    reply = await client.stats()
    if out.as_json:
        out.doc(reply)
        return EXIT_OK
    out.line(f"{'pods':<12} {reply.pods}")
    out.line(f"{'active runs':<12} {reply.active_runs}")
    out.line("dispatches by status:")
    for status, n in reply.depth.items():
        out.line(f"  {status:<12} {n}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[Any, argparse.Namespace, Output], Awaitable[int]]] = {
    "submit": cmd_submit,
    "watch": cmd_watch,
    "wait": cmd_wait,
    "get": cmd_get,
    "list": cmd_list,
    "cancel": cmd_cancel,
    "interrupt": cmd_interrupt,
    "decide": cmd_decide,
    "send": cmd_send,
    "dlq": cmd_dlq,
    "stats": cmd_stats,
}


async def run_client_command(args: argparse.Namespace, out: Output) -> int:
    from .client import MailboxApiError

    try:
        client = await _client(args)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        url = args.url or os.environ.get("MAILBOX_NATS_URL") or DEFAULT_URL
        out.error(f"cannot connect to NATS at {url}: {exc!r}", 503)
        return EXIT_UNAVAILABLE
    try:
        return await COMMANDS[args.command](client, args, out)
    except UsageError as exc:
        out.error(str(exc))
        return EXIT_USAGE
    except MailboxApiError as exc:
        out.error(exc.message, exc.code, exc.field)
        return _EXIT_BY_CODE.get(exc.code, EXIT_RUN_FAILED)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


# --------------------------------------------------------------------------- serve


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


PID_FILE = "nats-server.pid"
"""`<pid> <url>` of the embedded nats-server, while `serve` runs it."""


def _lock_data_dir(nats_dir: Path) -> Any:
    """Hold an exclusive lock on the data dir for as long as `serve` runs: two embedded
    nats-servers must never share one JetStream store directory."""
    import fcntl

    handle = open(nats_dir / "serve.lock", "a+")  # noqa: SIM115 (held until serve ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        recorded = (nats_dir / PID_FILE).read_text().split() if (nats_dir / PID_FILE).exists() else []
        where = f" (its NATS: {recorded[1]})" if len(recorded) == 2 else ""
        raise UsageError(
            f"another `mailbox serve` runs on this data directory{where}; to run a second pod, point it at the "
            "first one's NATS with MAILBOX_NATS_URL, or give it its own MAILBOX_DATA_DIR"
        ) from None
    return handle


def _stop_orphan(nats_dir: Path, log: logging.Logger) -> None:
    """A nats-server left running on this data dir by a `serve` that was killed (SIGKILL
    does not let it stop its child): stop it before starting a new one on the same store."""
    try:
        pid = int((nats_dir / PID_FILE).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return
    if "nats-server" not in cmdline or str(nats_dir / "mailbox.conf") not in cmdline:
        return  # not ours (the pid was reused)
    log.warning("event=orphan_nats_server_stopped pid=%d", pid)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            time.sleep(0.1)
            os.kill(pid, 0)  # raises once it is gone
        os.kill(pid, signal.SIGKILL)


async def serve(args: argparse.Namespace, out: Output) -> int:
    from . import config
    from .embedded import EmbeddedServerError, NatsServer, free_port

    env = dict(os.environ)
    if args.url:
        env["MAILBOX_NATS_URL"] = args.url
    if args.prefix:
        env["MAILBOX_PREFIX"] = args.prefix
    try:
        settings = config.from_env(env)
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=out.err, flush=True)
        return EXIT_USAGE
    if args.print_config:
        values = config.masked(settings)
        if out.as_json:
            out.doc(values)
        else:
            for key, value in values.items():
                out.line(f"{key}={'' if value is None else value}")
        return EXIT_OK

    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        stream=out.err,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    log = logging.getLogger("mailbox.serve")
    if fix_mmap_threshold():
        log.info("event=malloc_tuned mmap_threshold=%d", MMAP_THRESHOLD)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = None
    lock = None
    nats_dir = Path(settings.data_dir) / "nats"
    pod = None
    try:
        url = settings.nats_url
        if not url:
            try:
                nats_dir.mkdir(parents=True, exist_ok=True)
                lock = _lock_data_dir(nats_dir)
            except (OSError, UsageError) as exc:
                print(f"cannot use MAILBOX_DATA_DIR={settings.data_dir!r}: {exc}", file=out.err, flush=True)
                return EXIT_USAGE
            await asyncio.to_thread(_stop_orphan, nats_dir, log)
            port = EMBEDDED_PORT if _port_free(EMBEDDED_PORT) else free_port()
            server = NatsServer(
                data_dir=str(nats_dir), port=port, name="mailbox", log_file=str(nats_dir / "nats-server.log")
            )
            try:
                await asyncio.to_thread(server.start, 0)  # spawn, then record it before waiting
                if server.process is not None:
                    (nats_dir / PID_FILE).write_text(f"{server.process.pid} {server.url}\n")
                await asyncio.to_thread(server.wait_ready)
            except (EmbeddedServerError, OSError) as exc:
                print(f"cannot start the embedded nats-server: {exc}", file=out.err, flush=True)
                return EXIT_UNAVAILABLE
            url = server.url
            log.info("event=embedded_nats_started url=%s data_dir=%s", url, nats_dir)

        from .app import start_pod

        from .connection import ConnectError

        try:
            pod = await _until(stop, start_pod(settings, url=url, serve_http=True))
        except ConnectError as exc:
            print(f"cannot connect to NATS: {exc}", file=out.err, flush=True)
            return EXIT_UNAVAILABLE
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            print(f"cannot start: {exc!r}", file=out.err, flush=True)
            return EXIT_UNAVAILABLE
        except ValueError as exc:  # a handler that cannot be loaded
            print(f"configuration error: {exc}", file=out.err, flush=True)
            return EXIT_USAGE
        if pod is None:
            return EXIT_OK  # stopped while connecting
        log.info("event=startup_objects_frozen count=%d", freeze_startup_objects())
        log.info("event=gc_tuned young_threshold=%d was=%d", YOUNG_THRESHOLD, raise_young_threshold())
        metrics_url = f"http://127.0.0.1:{pod.http[0].port}/metrics"
        health_url = f"http://127.0.0.1:{pod.http[1].port}"
        where = f"mailbox {__version__} serving the API on {mask_url(url)} with prefix '{settings.prefix}' (subjects {settings.prefix}.api.*)"
        if out.as_json:
            out.doc({"event": "serving", "url": mask_url(url), "prefix": settings.prefix, "version": __version__,
                     "embedded": server is not None, "handler": settings.handler,
                     "metrics": metrics_url, "health": health_url})
        else:
            out.line(where + (", embedded nats-server" if server is not None else "") + f"; handler {settings.handler}")
            out.line(f"metrics {metrics_url}   health {health_url}/healthz  {health_url}/readyz")
        await stop.wait()
        log.info("event=stopping")
        return EXIT_OK
    finally:
        if pod is not None:
            await pod.stop()
        if server is not None:
            await asyncio.to_thread(server.stop)
            with contextlib.suppress(OSError):
                (nats_dir / PID_FILE).unlink()
        if lock is not None:
            lock.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("event=stopped")


async def _until(stop: asyncio.Event, coro: Awaitable[Any]) -> Any:
    """Await `coro` unless `stop` is set first (then cancel it and return None)."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return None


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mailbox` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(getattr(args, "json", False))
    try:
        if args.command == "serve":
            return asyncio.run(serve(args, out))
        return asyncio.run(run_client_command(args, out))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mailbox watch X | head`
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
