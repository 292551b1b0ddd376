"""Property: whatever bytes or JSON arrive at any endpoint, the service answers (a reply or a
structured 400/404/409 error, never a 500), keeps answering, and writes nothing."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api import ENDPOINTS
from service.app import start_pod

from .conftest import unique_prefix
from .test_api import assert_nothing_written, echo, fast_settings

pytestmark = pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning:nats.micro")

MAX_PAYLOAD = 4096
FIELDS = {e.name: list(e.request.__struct_fields__) for e in ENDPOINTS}

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["", " ", "\t\n", "x" * 300, "é" * 200, "a.b.*.>", "queued", "done", "enqueue", "steer"]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def structured(endpoint: str) -> st.SearchStrategy[dict[str, Any]]:
    """Objects made of the endpoint's own field names with random values (and sometimes a
    stray key). A submit never gets a usable thread_id, so no valid submit slips through."""
    base = st.dictionaries(st.sampled_from(FIELDS[endpoint] or ["x"]), json_values, max_size=5)
    extra = st.dictionaries(st.text(max_size=8), json_values, max_size=1)
    objects = st.builds(lambda a, b: {**a, **b}, base, extra)
    if endpoint == "submit":
        bad_thread = st.one_of(
            st.just(None), st.integers(), st.sampled_from(["", "   ", "x" * 257, "é" * 200]), st.lists(st.text(), max_size=2)
        )
        return st.builds(
            lambda obj, bad, drop: {k: v for k, v in obj.items() if k != "thread_id"} | ({} if drop else {"thread_id": bad}),
            objects,
            bad_thread,
            st.booleans(),
        )
    return objects


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    endpoint = draw(st.sampled_from([e.name for e in ENDPOINTS]))
    kind = draw(st.sampled_from(["bytes", "json", "structured"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    else:
        body = json.dumps(draw(structured(endpoint))).encode()
    return endpoint, body


@pytest_asyncio.fixture(scope="module")
async def fuzz_pod(nats_url):
    pod = await start_pod(
        fast_settings(unique_prefix("fuzz"), max_payload=MAX_PAYLOAD), url=nats_url, handler=echo
    )
    yield pod
    await pod.stop(drain_timeout_ms=1000)


@settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
async def test_random_input_never_breaks_the_service_nor_writes(fuzz_pod, request):
    endpoint, body = request
    msg = await fuzz_pod.nc.request(f"{fuzz_pod.settings.prefix}.api.{endpoint}", body, timeout=10)
    headers = msg.headers or {}
    reply = msgspec.json.decode(msg.data)
    if "Nats-Service-Error-Code" in headers:
        code = headers["Nats-Service-Error-Code"]
        assert code in ("400", "404", "409"), (endpoint, body[:200], code, reply)
        assert reply["error"]["code"] == int(code) and reply["error"]["message"]
        assert headers["Nats-Service-Error"] and "\n" not in headers["Nats-Service-Error"]
    else:
        assert isinstance(reply, dict) and "error" not in reply
    await assert_nothing_written(fuzz_pod)


async def test_after_the_fuzzing_the_service_still_answers_and_stats_saw_no_internal_error(fuzz_pod):
    stats = json.loads((await fuzz_pod.nc.request(f"$SRV.STATS.mailbox.{fuzz_pod.api.id}", b"", timeout=5)).data)
    assert sum(e["num_requests"] for e in stats["endpoints"]) >= 400
    assert not any((e["last_error"] or "").startswith("500") for e in stats["endpoints"])
    ping = json.loads((await fuzz_pod.nc.request(f"$SRV.PING.mailbox.{fuzz_pod.api.id}", b"", timeout=5)).data)
    assert ping["name"] == "mailbox"
    await assert_nothing_written(fuzz_pod)
