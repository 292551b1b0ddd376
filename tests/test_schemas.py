"""The checked-in `schemas/` match what the code generates, are valid JSON Schemas, accept
real messages, and the AsyncAPI document covers every subject."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from service import schemas
from service.api import ENDPOINTS
from service.events import Event
from service.live import LiveCommand, LiveReply
from service.model import RunDispatch, RunRecord, WaitingTicket
from service.protocol import (
    ErrorBody,
    ErrorReply,
    EventsReply,
    RunView,
    SubmitReply,
    SubmitRequest,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def load(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def test_checked_in_files_match_the_code():
    problems = schemas.differences(SCHEMAS)
    assert not problems, "schemas/ is out of date; run `make schemas` (python -m service.schemas):\n" + "\n".join(problems)


def test_check_mode_reports_a_stale_file(tmp_path):
    schemas.write(tmp_path)
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "SubmitRequest.json").write_text("{}\n")
    (tmp_path / "Leftover.json").write_text("{}\n")
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 1
    assert sorted(schemas.write(tmp_path)) == ["Leftover.json (removed)", "SubmitRequest.json"]
    assert schemas.differences(tmp_path) == []


def test_there_is_a_schema_per_request_reply_and_record():
    names = {p.stem for p in SCHEMAS.glob("*.json")} - {"asyncapi"}
    for e in ENDPOINTS:
        assert e.request.__name__ in names
        assert all(r in names for r in e.reply.split("|"))
    assert {"Event", "ErrorReply", "RunRecord", "RunDispatch", "LiveCommand", "LiveReply", "SignalPayload", "GetReply"} <= names


@pytest.mark.parametrize("path", sorted(p.name for p in SCHEMAS.glob("*.json") if p.name != "asyncapi.json"))
def test_every_file_is_a_valid_json_schema(path):
    schema = json.loads((SCHEMAS / path).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == schemas.JSON_SCHEMA and schema["title"] == path.removesuffix(".json")


def validate(name: str, value: Any) -> None:
    jsonschema.validate(json.loads(msgspec.json.encode(value)), load(name), cls=jsonschema.Draft202012Validator)


def test_real_messages_validate_and_bad_ones_do_not():
    run = RunRecord(run_id="r", thread_id="t", input={"a": 1}, waiting=WaitingTicket(ticket="approval"),
                    created_at=1, updated_at=2)
    d = RunDispatch.queued("d", "t", "r", 1)
    validate("RunView", RunView.of(run, [d]))
    validate("GetReply", RunView.of(run, [d]))
    validate("GetReply", d)
    validate("SubmitRequest", SubmitRequest(thread_id="t", input=[1, "x"], strategy="interrupt", metadata={"k": "v"}))
    validate("SubmitReply", SubmitReply(run_id="r", dispatch_id="d", thread_id="t", status="queued"))
    validate("EventsReply", EventsReply(events=[Event(kind="queued", run_id="r", dispatch_id="d", thread_id="t",
                                                      attempt=1, ts_ms=5, seq=3)], last_seq=3))
    validate("ErrorReply", ErrorReply(ErrorBody(code=400, message="bad", field="thread_id")))
    validate("LiveCommand", LiveCommand(command="decision", run_id="r", ticket="approval", data=True))
    validate("LiveReply", LiveReply(delivered=False, reason="no run"))
    validate("SignalPayload", {"thread_id": "t", "dispatch_id": "d"})
    for bad in (
        {"thread_id": "t", "bogus": 1},
        {"thread_id": ""},
        {"thread_id": "t", "strategy": "sideways"},
        {"thread_id": "t", "priority": 300},
        {},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, load("SubmitRequest"), cls=jsonschema.Draft202012Validator)


def test_asyncapi_describes_every_subject_and_its_references_resolve():
    doc = json.loads((SCHEMAS / "asyncapi.json").read_text())
    assert doc["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in doc["channels"].values() if c["address"]}
    assert {f"{{prefix}}.api.{e.name}" for e in ENDPOINTS} <= addresses
    assert {"{prefix}.signal.{thread}.{dispatch}", "{prefix}.events.{thread}.{run}", "{prefix}.live.{thread}"} <= addresses
    for e in ENDPOINTS:
        op = doc["operations"][e.name]
        assert op["action"] == "receive" and op["reply"]["channel"]["$ref"] == f"#/channels/api_{e.name}_reply"
    for channel in doc["channels"].values():  # every {parameter} in an address is declared
        if channel["address"]:
            names = {p.strip("{}") for p in channel["address"].split(".") if p.startswith("{")}
            assert names == set(channel.get("parameters", {}))

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert target is not None, ref
    # the component schemas are valid JSON Schema too
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
