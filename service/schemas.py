"""JSON Schemas of every message, and an AsyncAPI 3.0 document of every subject.

Generated from the msgspec Structs (`msgspec.json.schema`), so the code is the source of
truth. `python -m service.schemas` (or `make schemas`) rewrites `schemas/`;
`python -m service.schemas --check` exits 1 when the checked-in files are out of date
(tests/test_schemas.py does the same).

Files: `schemas/<Name>.json` (a standalone JSON Schema, draft 2020-12, per message) and
`schemas/asyncapi.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from . import __version__
from .api import ENDPOINTS, SERVICE_NAME
from .events import FINAL, LIFECYCLE, Event
from .live import LiveCommand, LiveReply
from .model import MAX_ID_BYTES, RunDispatch, RunRecord
from .protocol import (
    CancelReply,
    CancelRequest,
    DeadLettersReply,
    DeadLettersRequest,
    DecideReply,
    DecideRequest,
    ErrorReply,
    EventsReply,
    EventsRequest,
    GetRequest,
    InterruptReply,
    InterruptRequest,
    ListReply,
    ListRequest,
    ReplayReply,
    ReplayRequest,
    RunView,
    SendReply,
    SendRequest,
    StatsReply,
    StatsRequest,
    SubmitReply,
    SubmitRequest,
)
from .signals import _Payload

JSON_SCHEMA = "https://json-schema.org/draft/2020-12/schema"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "schemas"

# The signal payload Struct is private to signals.py; a public twin with the same fields
# (generated from it, so the two cannot drift) gives the schema its name.
SignalPayload = msgspec.defstruct(
    "SignalPayload",
    [(f.name, f.type) for f in msgspec.structs.fields(_Payload)],
    module=__name__,
)
SignalPayload.__doc__ = "A wake-up: thread T has dispatch D (a hint; the store is the truth)."

MESSAGES: dict[str, Any] = {
    # API requests and replies
    "SubmitRequest": SubmitRequest,
    "SubmitReply": SubmitReply,
    "GetRequest": GetRequest,
    "RunView": RunView,
    "ListRequest": ListRequest,
    "ListReply": ListReply,
    "CancelRequest": CancelRequest,
    "CancelReply": CancelReply,
    "InterruptRequest": InterruptRequest,
    "InterruptReply": InterruptReply,
    "DecideRequest": DecideRequest,
    "DecideReply": DecideReply,
    "SendRequest": SendRequest,
    "SendReply": SendReply,
    "DeadLettersRequest": DeadLettersRequest,
    "DeadLettersReply": DeadLettersReply,
    "ReplayRequest": ReplayRequest,
    "ReplayReply": ReplayReply,
    "StatsRequest": StatsRequest,
    "StatsReply": StatsReply,
    "EventsRequest": EventsRequest,
    "EventsReply": EventsReply,
    "ErrorReply": ErrorReply,
    # records and the other subjects
    "Event": Event,
    "RunRecord": RunRecord,
    "RunDispatch": RunDispatch,
    "LiveCommand": LiveCommand,
    "LiveReply": LiveReply,
    "SignalPayload": SignalPayload,
}
GET_REPLY = "GetReply"
"""`get` answers a RunView (by run_id) or a RunDispatch (by dispatch_id)."""

_REPLY_OF = {e.name: e.reply for e in ENDPOINTS}


def _reply_names(endpoint: str) -> list[str]:
    return _REPLY_OF[endpoint].split("|")


# --------------------------------------------------------------------------- JSON Schema


def message_schema(name: str) -> dict[str, Any]:
    """The standalone JSON Schema of one message (`$defs` holds what it refers to)."""
    if name == GET_REPLY:
        parts = [message_schema(n) for n in _reply_names("get")]
        defs: dict[str, Any] = {}
        for p in parts:
            defs.update(p["$defs"])
        return {
            "$schema": JSON_SCHEMA,
            "title": GET_REPLY,
            "description": "The reply of `get`: a RunView for a run_id, the RunDispatch record for a dispatch_id.",
            "anyOf": [{"$ref": p["$ref"]} for p in parts],
            "$defs": dict(sorted(defs.items())),
        }
    schema = msgspec.json.schema(MESSAGES[name])
    out: dict[str, Any] = {"$schema": JSON_SCHEMA, "title": name}
    out.update(schema)
    if "$defs" in out:
        out["$defs"] = dict(sorted(out["$defs"].items()))
    return out


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every message schema by file name stem."""
    names = list(MESSAGES) + [GET_REPLY]
    return {name: message_schema(name) for name in names}


# --------------------------------------------------------------------------- AsyncAPI


def _prefix_param() -> dict[str, Any]:
    return {
        "description": "MAILBOX_PREFIX: every subject, stream and bucket of one mailbox derives from it.",
        "default": "mailbox",
        "examples": ["mailbox"],
    }


def _id_param(what: str) -> dict[str, Any]:
    return {
        "description": (
            f"H({what}): 'h' followed by the lowercase hex of the id's UTF-8 bytes, so ids never inject "
            f"'.', '*', '>' or spaces into subjects (ids are at most {MAX_ID_BYTES} bytes)."
        ),
        "examples": ["h7468726561642d31"],
    }


def _ref_message(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/messages/{name}"}


def _summary(tp: Any) -> str:
    doc = (getattr(tp, "__doc__", None) or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the mailbox: API endpoints, signals, events, live channel."""
    types = list(MESSAGES.values())
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schemas = dict(sorted(components.items()))
    schemas[GET_REPLY] = {
        "title": GET_REPLY,
        "description": "A RunView for a run_id, the RunDispatch record for a dispatch_id.",
        "anyOf": [{"$ref": f"#/components/schemas/{n}"} for n in _reply_names("get")],
    }

    messages: dict[str, Any] = {}
    for name, tp in MESSAGES.items():
        messages[name] = {
            "name": name,
            "title": name,
            "summary": _summary(tp) or name,
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{name}"},
        }
    messages[GET_REPLY] = {
        "name": GET_REPLY,
        "title": GET_REPLY,
        "summary": "A RunView for a run_id, the RunDispatch record for a dispatch_id.",
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{GET_REPLY}"},
    }
    messages["ErrorReply"]["headers"] = {
        "type": "object",
        "properties": {
            "Nats-Service-Error": {"type": "string", "description": "The error message (one line)."},
            "Nats-Service-Error-Code": {"type": "string", "description": "The error code: 400, 404, 409, 500 or 503."},
        },
        "required": ["Nats-Service-Error", "Nats-Service-Error-Code"],
    }
    messages["SignalPayload"]["headers"] = {
        "type": "object",
        "properties": {"Nats-Msg-Id": {"type": "string", "description": "De-duplication id (sweeper republishes)."}},
    }

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    nats_queue = {"nats": {"queue": "q", "bindingVersion": "0.1.0"}}
    for spec in ENDPOINTS:
        request = spec.request.__name__
        reply = GET_REPLY if spec.name == "get" else spec.reply
        channel = f"api_{spec.name}"
        channels[channel] = {
            "address": f"{{prefix}}.api.{spec.name}",
            "title": f"{spec.name} endpoint",
            "description": spec.description,
            "parameters": {"prefix": _prefix_param()},
            "messages": {request: _ref_message(request)},
        }
        channels[f"{channel}_reply"] = {
            "address": None,
            "description": f"The requester's inbox (the NATS reply subject) for `{spec.name}`.",
            "messages": {reply: _ref_message(reply), "ErrorReply": _ref_message("ErrorReply")},
        }
        operations[spec.name] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": spec.description,
            "description": (
                f"Request/reply on `<prefix>.api.{spec.name}`, endpoint `{spec.name}` of the NATS micro service "
                f"`{SERVICE_NAME}` (queue group `q`). Errors answer ErrorReply with the micro error headers."
            ),
            "bindings": nats_queue,
            "messages": [{"$ref": f"#/channels/{channel}/messages/{request}"}],
            "reply": {
                "channel": {"$ref": f"#/channels/{channel}_reply"},
                "messages": [
                    {"$ref": f"#/channels/{channel}_reply/messages/{reply}"},
                    {"$ref": f"#/channels/{channel}_reply/messages/ErrorReply"},
                ],
            },
        }

    channels["signal"] = {
        "address": "{prefix}.signal.{thread}.{dispatch}",
        "title": "Wake-up signals",
        "description": (
            "Stream `<prefix>-signals` (WorkQueue, one pending message per subject, 2 min duplicate window), "
            "consumed by the durable pull consumer `<prefix>-workers` shared by all pods. A hint only: "
            "the state bucket is the truth."
        ),
        "parameters": {"prefix": _prefix_param(), "thread": _id_param("thread_id"), "dispatch": _id_param("dispatch_id")},
        "messages": {"SignalPayload": _ref_message("SignalPayload")},
    }
    channels["events"] = {
        "address": "{prefix}.events.{thread}.{run}",
        "title": "Run events",
        "description": (
            "Stream `<prefix>-events` (limits retention, max_age from MAILBOX_EVENTS_MAX_AGE_MS, direct get on). "
            f"Lifecycle kinds: {', '.join(LIFECYCLE)}; a run has ended after {', '.join(sorted(FINAL))}. "
            "Handlers add their own kinds. Followers read by stream sequence (the API's `events` endpoint, "
            "or direct batch gets with next_by_subj `<prefix>.events.*.{run}`) and re-attach after the last "
            "sequence they saw."
        ),
        "parameters": {"prefix": _prefix_param(), "thread": _id_param("thread_id"), "run": _id_param("run_id")},
        "messages": {"Event": _ref_message("Event")},
    }
    channels["live"] = {
        "address": "{prefix}.live.{thread}",
        "title": "Live commands",
        "description": (
            "Core NATS request/reply to the pod executing the thread's run (subscribed only while a run is "
            "active). No responder or no reply in time means not delivered: the caller falls back to the "
            "durable path."
        ),
        "parameters": {"prefix": _prefix_param(), "thread": _id_param("thread_id")},
        "messages": {"LiveCommand": _ref_message("LiveCommand")},
    }
    channels["live_reply"] = {
        "address": None,
        "description": "The sender's inbox (the NATS reply subject) for a live command.",
        "messages": {"LiveReply": _ref_message("LiveReply")},
    }
    operations["publishSignal"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/signal"},
        "summary": "Wake a pod: published on enqueue, retry, lease reclaim and by the sweeper.",
        "messages": [{"$ref": "#/channels/signal/messages/SignalPayload"}],
    }
    operations["consumeSignal"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/signal"},
        "summary": "Pods pull signals from the shared durable consumer and settle each (ack, nak, nak with delay).",
        "messages": [{"$ref": "#/channels/signal/messages/SignalPayload"}],
    }
    operations["publishEvent"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/events"},
        "summary": "Lifecycle and handler events of a run, durably on the events stream.",
        "messages": [{"$ref": "#/channels/events/messages/Event"}],
    }
    operations["liveCommand"] = {
        "action": "receive",
        "channel": {"$ref": "#/channels/live"},
        "summary": "Cancel, decision or input for the thread's active run; answered once handed to the run.",
        "messages": [{"$ref": "#/channels/live/messages/LiveCommand"}],
        "reply": {
            "channel": {"$ref": "#/channels/live_reply"},
            "messages": [{"$ref": "#/channels/live_reply/messages/LiveReply"}],
        },
    }

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Mailbox service",
            "version": __version__,
            "description": (
                "A durable, per-thread run mailbox on NATS JetStream. The service API is the NATS micro service "
                f"`{SERVICE_NAME}` (discover it with `$SRV.PING|INFO|STATS.{SERVICE_NAME}`; each instance's "
                "metadata names its prefix). Every subject starts with the mailbox prefix (MAILBOX_PREFIX, "
                "default `mailbox`); ids in subjects are encoded as H(id)."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "Any NATS server (>= 2.12) with JetStream; set MAILBOX_NATS_URL.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


# --------------------------------------------------------------------------- files


def render(doc: dict[str, Any]) -> str:
    """Stable text of a document (what is written to disk)."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """Every file of `schemas/`: file name -> text."""
    files = {f"{name}.json": render(schema) for name, schema in all_schemas().items()}
    files["asyncapi.json"] = render(asyncapi())
    return files


def differences(directory: Path) -> list[str]:
    """Files in `directory` that are missing, stale or not generated any more."""
    wanted = generate()
    problems = []
    for name, text in wanted.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"missing: {path}")
        elif path.read_text() != text:
            problems.append(f"out of date: {path}")
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            if path.name not in wanted:
                problems.append(f"not generated any more: {path}")
    return problems


def write(directory: Path) -> list[str]:
    """(Re)write the files; returns the names of the files that changed. JSON files in the
    directory that are not generated any more are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    wanted = generate()
    for name, text in wanted.items():
        path = directory / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed.append(name)
    for path in directory.glob("*.json"):
        if path.name not in wanted:
            path.unlink()
            changed.append(f"{path.name} (removed)")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.schemas",
        description="Regenerate the JSON Schemas and the AsyncAPI document in schemas/ from the code.",
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"output directory (default: {DEFAULT_DIR})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are out of date")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences(args.dir)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run `make schemas` (python -m service.schemas) and commit the result", file=sys.stderr)
        return 1 if problems else 0
    changed = write(args.dir)
    print(f"{len(changed)} file(s) changed in {args.dir}" + (": " + ", ".join(sorted(changed)) if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
