"""What only the NATS store must prove: pods on separate connections, lost replies, history
independence, big threads, server restarts, markers."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import msgspec
import nats
import nats.errors
import pytest

from service.model import (
    AlreadyExistsError,
    DispatchStatus,
    RunDispatch,
    RunDispatchResult,
    RunRecord,
    RunStatus,
    StoreError,
    StoreUnavailableError,
)
from service.store import NatsDispatchStore
from service.store import keys

from .conftest import unique_prefix

LEASE = 30_000


def q(dispatch_id: str, thread_id: str = "t1", created_at: int = 1000, **kw) -> RunDispatch:
    return RunDispatch.queued(dispatch_id, thread_id, f"run-{dispatch_id}", created_at, **kw)


async def raw_put(store: NatsDispatchStore, records: list[RunDispatch]) -> None:
    """Write records straight into the bucket (fast bulk set-up, no store logic)."""
    for d in records:
        await store.nc.publish(f"$KV.{store.bucket}.{keys.dispatch_key(d.thread_id, d.dispatch_id)}", msgspec.json.encode(d))
        await store.nc.publish(f"$KV.{store.bucket}.{keys.dispatch_alias_key(d.dispatch_id)}", d.thread_id.encode())
    await store.nc.flush()


@pytest.fixture
async def pods(nats_url):
    """Two stores on separate connections sharing one bucket: two pods."""
    prefix = unique_prefix("pods")
    a = await NatsDispatchStore.connect(nats_url, prefix=prefix)
    b = await NatsDispatchStore.connect(nats_url, prefix=prefix)
    yield a, b
    await a.close()
    await b.close()


async def test_a_pod_runs_work_another_pod_submitted_without_reading_its_ids(pods):
    """In a deployment most runs are executed by a pod other than the one that took their
    submit: the claim read the dispatch from its thread, so settling it and writing its run
    need no lookup of which thread the dispatch and run ids belong to."""
    a, b = pods
    run = RunRecord(run_id="r1", thread_id="t1", created_at=1000, updated_at=1000)
    await a.create_run(run, RunDispatch.queued("d1", "t1", "r1", 1000))
    gets = b.stats.gets
    [d] = await b.claim("t1", "pod-b", LEASE, 2000, start="attempt-1")
    assert await b.extend_lease(d.dispatch_id, d.claim_token, LEASE, 2500)
    await b.update_run("r1", lambda r: msgspec.structs.replace(r, status=RunStatus.RUNNING, updated_at=2500))
    await b.complete(d.dispatch_id, d.claim_token, RunDispatchResult("r1", "attempt-1", RunStatus.DONE), 3000)
    await b.update_run("r1", lambda r: msgspec.structs.replace(r, status=RunStatus.DONE, updated_at=3000))
    assert b.stats.gets == gets + 1  # the run's record, once: its first write here needs its revision
    assert (await a.load_dispatch("d1")).status == DispatchStatus.ACKED
    assert (await a.load_run("r1")).status == RunStatus.DONE


async def test_two_pods_racing_on_one_thread_never_both_hold_a_claim(pods):
    a, b = pods
    now = 1000
    for round_ in range(25):
        await a.enqueue(q(f"x{round_}", created_at=now))
        await b.enqueue(q(f"y{round_}", created_at=now))
        results = await asyncio.gather(
            *(s.claim("t1", f"{name}{i}", LEASE, now, 1) for i in range(4) for name, s in (("a", a), ("b", b)))
        )
        winners = [d for r in results for d in r]
        assert len(winners) == 1, winners
        claimed = await b.list_dispatches("t1", [DispatchStatus.CLAIMED])
        assert claimed == winners
        # both pods race to claim the other dispatch by id: the thread is busy, nobody gets it
        other = f"y{round_}" if winners[0].dispatch_id.startswith("x") else f"x{round_}"
        got = await asyncio.gather(a.claim_dispatch(other, "a", LEASE, now), b.claim_dispatch(other, "b", LEASE, now))
        assert got == [None, None]
        await a.ack(winners[0].dispatch_id, winners[0].claim_token, now)
        [second] = await b.claim("t1", "b", LEASE, now, 1)
        await a.ack(second.dispatch_id, second.claim_token, now)
        now += 10


async def test_interrupt_racing_enqueues_across_pods(pods):
    a, b = pods
    await a.enqueue(q("first"))
    await b.claim("t1", "b", LEASE, 1000, 1)
    tasks = [a.enqueue(q(f"a{i}", created_at=1001 + i)) for i in range(8)]
    tasks += [b.enqueue(q(f"b{i}", created_at=1001 + i)) for i in range(8)]
    tasks += [b.interrupt("t1", 2000), a.interrupt("t1", 2000)]
    await asyncio.gather(*tasks)
    epoch = await a.current_dispatch_epoch("t1")
    assert epoch == 2
    queued = await b.list_dispatches("t1", [DispatchStatus.QUEUED])
    assert all(d.dispatch_epoch == epoch for d in queued)
    superseded = await b.list_dispatches("t1", [DispatchStatus.SUPERSEDED])
    assert len(queued) + len(superseded) == 16


class LostReplies:
    """Wraps the store's transport: the server gets the request, the caller gets a timeout."""

    def __init__(self, store: NatsDispatchStore, times: int = 1, deliver: bool = True) -> None:
        self.store = store
        self.left = times
        self.deliver = deliver
        self.real = store._request

    async def __call__(self, subject: str, data: bytes, headers: dict[str, str]):
        if self.left > 0:
            self.left -= 1
            if self.deliver:
                await self.real(subject, data, headers)  # the server stores it...
            raise nats.errors.TimeoutError  # ...and the reply is lost
        return await self.real(subject, data, headers)


async def test_a_lost_ack_reply_is_detected_by_rereading(nats_store):
    s = nats_store
    await s.enqueue(q("d1"))
    [d] = await s.claim("t1", "w", LEASE, 1000, 1)
    s._request = LostReplies(s)
    before = s.stats.publishes
    await s.ack("d1", d.claim_token, 2000)
    acked = await s.load_dispatch("d1")
    assert acked.status == DispatchStatus.ACKED and acked.completed_at == 2000
    assert s.stats.lost_replies_recovered == 1
    assert s.stats.publishes == before  # nothing re-sent, nothing compensated


async def test_a_lost_claim_reply_still_returns_the_claim(nats_store):
    s = nats_store
    await s.enqueue(q("d1"))
    s._request = LostReplies(s)
    [d] = await s.claim("t1", "w", LEASE, 1000, 1)
    assert (await s.load_dispatch("d1")) == d and d.status == DispatchStatus.CLAIMED
    assert await s.claim("t1", "other", LEASE, 1000, 1) == []  # no second owner
    assert s.stats.lost_replies_recovered == 1


async def test_a_request_lost_before_the_server_is_retried(nats_store):
    s = nats_store
    await s.enqueue(q("d1"))
    s._request = LostReplies(s, deliver=False)
    [d] = await s.claim("t1", "w", LEASE, 1000, 1)
    assert (await s.load_dispatch("d1")).claim_token == d.claim_token
    assert s.stats.lost_replies_recovered == 0


async def test_a_lost_interrupt_batch_reply_is_detected(nats_store):
    s = nats_store
    for i in range(3):
        await s.enqueue(q(f"d{i}", created_at=1000 + i))
    s._request = LostReplies(s)
    result = await s.interrupt("t1", 2000)
    assert result.new_dispatch_epoch == 1 and len(result.superseded) == 3
    assert await s.current_dispatch_epoch("t1") == 1
    assert await s.list_dispatches("t1", [DispatchStatus.QUEUED]) == []


async def test_claim_reads_only_its_thread_whatever_the_history(nats_store):
    s = nats_store
    history = []
    for i in range(10_000):
        d = q(f"old{i}", thread_id=f"other{i % 500}")
        history.append(msgspec.structs.replace(d, status=DispatchStatus.ACKED, completed_at=1000))
    await raw_put(s, history)
    await s.enqueue(q("mine", thread_id="hot"))
    before = dict(vars(s.stats))
    [d] = await s.claim("hot", "w", LEASE, 2000, 1)
    after = vars(s.stats)
    assert d.dispatch_id == "mine"
    assert after["snapshots"] - before["snapshots"] <= 1  # at most one round trip to read the thread
    assert after["publishes"] - before["publishes"] == 1  # one guarded write
    assert after["scanned_keys"] == before["scanned_keys"]  # no global scan
    state = await s.read_thread("hot")
    assert list(state.dispatches) == ["mine"]
    assert await s.count_dispatches_by_status(DispatchStatus.ACKED) == 10_000  # the history is there


async def test_maintenance_passes_hold_one_page_not_the_history(nats_store):
    """A sweep's survey and a GC pass stream the bucket: their peak memory is bounded by a
    page and the live work, not by the terminal history (which grows until GC)."""
    s = nats_store
    payload = "x" * 400
    history = [
        msgspec.structs.replace(
            q(f"old{i}", thread_id=f"other{i % 500}"), status=DispatchStatus.ACKED, completed_at=1000, last_error=payload
        )
        for i in range(20_000)
    ]
    await raw_put(s, history)
    del history
    await s.enqueue(q("live", thread_id="hot", created_at=5000))
    await s.survey(now=6000)  # warm up decoders and connection buffers

    tracemalloc.start()
    try:
        survey = await s.survey(now=6000, want={"old7"})
        _, survey_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert await s.purge_terminal(older_than=0) == 0  # nothing old enough: a full pass, no deletes
        _, gc_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert survey.counts[DispatchStatus.ACKED] == 20_000 and [d.dispatch_id for d in survey.queued] == ["live"]
    assert list(survey.wanted) == ["old7"]
    # measured: ~6 MB (a page of 2,000 records as messages, entries and decoded records);
    # holding the whole history, as a list of records, peaks at ~36 MB here
    assert survey_peak < 12_000_000, survey_peak
    assert gc_peak < 12_000_000, gc_peak


async def test_between_sweeps_the_view_holds_the_backlog_as_stored_bytes(nats_store):
    """The sweep's incremental view lives between sweeps and holds every open run and live
    dispatch: it keeps them as the stored bytes, not as decoded records (a decoded input
    is several times its JSON), yet hands the sweep whole records."""
    s = nats_store
    n = 2_000
    runs = [
        RunRecord(run_id=f"r{i}", thread_id=f"t{i % 100}", input={f"field{k}": f"value-{i}-{k}" for k in range(20)},
                  dispatch_id=f"d{i}", created_at=1000, updated_at=1000)
        for i in range(n)
    ]
    stored = 0
    for r in runs:
        data = msgspec.json.encode(r)
        stored += len(data) + len(keys.run_key(r.thread_id, r.run_id))
        await s.nc.publish(f"$KV.{s.bucket}.{keys.run_key(r.thread_id, r.run_id)}", data)
    await raw_put(s, [RunDispatch.queued(r.dispatch_id, r.thread_id, r.run_id, 1000) for r in runs])
    del runs
    await s.sweep_view(now=6000, expired_limit=10)  # warm up decoders and connection buffers
    s._sweep_index = None  # the next sweep builds the view from scratch

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        open_runs, survey = await s.sweep_view(now=6000, expired_limit=10)
        assert len(open_runs) == n and open_runs[0].input["field3"] == "value-0-3"
        assert len(survey.queued) == n
        del open_runs, survey
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # measured: 1.6x the runs' stored bytes and keys (the dispatches' bytes come on top);
    # holding decoded records it was 4.5x
    assert held - before < 3 * stored, (held - before, stored)

async def test_gc_does_not_read_the_history_it_cannot_purge_yet(nats_store):
    """With `written_before`, GC reads in write order and stops at the first record written
    after the cutoff: a pass over a young history costs a page per key space, not the history."""
    s = nats_store
    now = int(time.time() * 1000)
    young = [
        msgspec.structs.replace(
            q(f"h{i}", thread_id=f"o{i % 100}", created_at=now), status=DispatchStatus.ACKED, completed_at=now,
            updated_at=now,
        )
        for i in range(10_000)
    ]
    await raw_put(s, young)
    older_than = now - 3_600_000  # a TTL of an hour: nothing is old enough

    before = s.stats.scanned_keys
    assert await s.purge_terminal(older_than, written_before=older_than + 60_000) == 0
    bounded = s.stats.scanned_keys - before
    before = s.stats.scanned_keys
    assert await s.purge_terminal(older_than) == 0
    unbounded = s.stats.scanned_keys - before
    assert unbounded >= 10_000  # every dispatch
    assert bounded <= 3 * 1_000  # at most the first page of each key space read
    # what was written before the cutoff is still read and purged
    later = now + 1_000
    assert await s.purge_terminal(later, written_before=later + 60_000) == 10_000
    assert await s.count_dispatches_by_status(DispatchStatus.ACKED) == 0


async def test_the_sweep_reads_only_what_changed_since_the_last_sweep(nats_store):
    s = nats_store
    history = [
        msgspec.structs.replace(q(f"old{i}", thread_id=f"o{i % 100}"), status=DispatchStatus.ACKED, completed_at=1000)
        for i in range(5000)
    ]
    await raw_put(s, history)
    runs, survey = await s.sweep_view(now=10_000, expired_limit=100)
    assert runs == [] and survey.counts[DispatchStatus.ACKED] == 5000

    # what happens between two sweeps: a claim whose lease lapses, a run whose dispatch an
    # interrupt superseded, new queued work, a finished run
    await s.enqueue(q("a", thread_id="ta"))
    await s.claim("ta", "w", 1000, 1000, 1)  # leased until 2000
    await s.create_run(
        RunRecord(run_id="r-b", thread_id="tb", created_at=1000, updated_at=1000, dispatch_id="b"),
        RunDispatch.queued("b", "tb", "r-b", 1000),
    )
    await s.interrupt("tb", 1500)
    await s.enqueue(q("c", thread_id="tc"))
    await s.create_run(
        RunRecord(run_id="r-d", thread_id="td", created_at=1000, updated_at=1000, dispatch_id="d"),
        RunDispatch.queued("d", "td", "r-d", 1000),
    )
    [d] = await s.claim("td", "w", LEASE, 1000, 1)
    await s.update_run("r-d", lambda r: msgspec.structs.replace(r, status=RunStatus.DONE, updated_at=1100))
    await s.ack("d", d.claim_token, 1100)

    before = s.stats.scanned_keys
    runs, survey = await s.sweep_view(now=10_000, expired_limit=100)
    assert s.stats.scanned_keys - before < 50  # the changes, not the 5,000 records of history
    assert [d.dispatch_id for d in survey.expired] == ["a"]
    assert [d.dispatch_id for d in survey.queued] == ["c"]
    assert [r.run_id for r in runs] == ["r-b"] and survey.wanted["b"].status == DispatchStatus.SUPERSEDED
    full = await s.survey(now=10_000, want={"b"}, expired_limit=100)
    assert survey.counts == full.counts  # nothing was purged in between: exact
    assert survey.counts[DispatchStatus.ACKED] == 5001 and survey.counts[DispatchStatus.SUPERSEDED] == 1


async def test_a_run_that_appears_mid_sweep_with_its_dispatch_already_ended_is_still_seen(nats_store):
    """The sweep reads the runs, then the dispatches. A run written in between, whose dispatch
    ended before the dispatches are read, is not dropped from the view."""
    s = nats_store
    await s.sweep_view(now=5000, expired_limit=100)
    scan_pages = s._scan_pages

    async def runs_then_a_late_run(subject_filter, *args, **kwargs):
        if subject_filter.endswith(".t.>"):  # the runs have been read: now the late run lands
            await s.create_run(
                RunRecord(run_id="late", thread_id="tl", created_at=5000, updated_at=5000, dispatch_id="dl"),
                RunDispatch.queued("dl", "tl", "late", 5000),
            )
            await s.interrupt("tl", 5100)  # its dispatch is superseded before the dispatches are read
        async for page in scan_pages(subject_filter, *args, **kwargs):
            yield page

    s._scan_pages = runs_then_a_late_run
    await s.sweep_view(now=6000, expired_limit=100)
    s._scan_pages = scan_pages
    runs, survey = await s.sweep_view(now=7000, expired_limit=100)
    assert [r.run_id for r in runs] == ["late"]
    assert survey.wanted["dl"].status == DispatchStatus.SUPERSEDED


async def test_a_thread_with_more_keys_than_one_batch_read_still_works(nats_store):
    s = nats_store
    await raw_put(s, [q(f"d{i:04d}", created_at=2000 + i) for i in range(1100)])
    await s.enqueue(q("urgent", created_at=5000, priority=0))
    [d] = await s.claim("t1", "w", LEASE, 10_000, 1)
    assert d.dispatch_id == "urgent"
    assert len(await s.list_dispatches("t1")) == 1101


async def test_interrupt_of_more_than_one_batch_supersedes_everything(nats_store):
    s = nats_store
    await raw_put(s, [q(f"d{i:04d}", created_at=2000 + i) for i in range(1200)])
    result = await s.interrupt("t1", 9000)
    assert result.new_dispatch_epoch == 1 and len(result.superseded) == 1200
    assert await s.count_dispatches_by_status(DispatchStatus.QUEUED) == 0
    assert await s.count_dispatches_by_status(DispatchStatus.SUPERSEDED) == 1200


async def test_data_survives_a_server_restart_and_the_store_reconnects(nats_server):
    s = await NatsDispatchStore.connect(nats_server.url, prefix="restart", max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        await s.enqueue(q("d1"))
        [d] = await s.claim("t1", "w", LEASE, 1000, 1)
        nats_server.restart()
        await s.ack("d1", d.claim_token, 2000)  # retried until the server is back
        assert (await s.load_dispatch("d1")).status == DispatchStatus.ACKED
    finally:
        await s.close()


async def test_an_unreachable_server_gives_store_unavailable(nats_server):
    s = await NatsDispatchStore.connect(
        nats_server.url, prefix="down", unavailable_after=1.0, request_timeout=0.5, max_reconnect_attempts=-1
    )
    try:
        await s.enqueue(q("d1"))
        nats_server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await s.enqueue(q("d2"))
        assert time.monotonic() - started < 10
    finally:
        await s.close()


async def test_purge_leaves_markers_that_expire(nats_store):
    s = nats_store
    await s.enqueue(q("d1"))
    await s.cancel("d1", 2000)
    assert await s.purge_terminal(3000) == 1
    msg = await s.nc.request(f"$JS.API.DIRECT.GET.{s.stream}.$KV.{s.bucket}.{keys.dispatch_key('t1', 'd1')}", b"")
    assert msg.headers["KV-Operation"] == "PURGE"
    assert msg.headers["Nats-TTL"] == "900"
    assert await s.load_dispatch("d1") is None


async def test_an_incompatible_existing_bucket_fails_loudly(nats_url):
    prefix = unique_prefix("bad")
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=f"KV_{prefix}-state", subjects=[f"$KV.{prefix}-state.>"], max_msgs_per_subject=5)
        with pytest.raises(StoreError, match="incompatible"):
            await NatsDispatchStore.connect(nc, prefix=prefix)
    finally:
        await nc.close()


async def test_gc_purges_aliases_whose_record_never_came(nats_store):
    s = nats_store
    await s.enqueue(q("live"))
    await s.enqueue(q("dup", dedupe_key="k"))
    with pytest.raises(AlreadyExistsError):
        await s.enqueue(q("refused", dedupe_key="k"))  # its aliases were written, the record was not
    assert await s._thread_of("dispatch", "refused") == "t1"
    await s.purge_terminal(older_than=int(time.time() * 1000) + 60_000)
    s._alias_cache.clear()
    assert await s._thread_of("dispatch", "refused") is None
    assert await s._thread_of("run", "run-refused") is None
    assert await s._thread_of("dispatch", "live") == "t1"  # live ids keep theirs
    assert await s._thread_of("run", "run-live") == "t1"


async def test_a_dispatch_id_ending_in_hash_1_stored_with_its_own_alias_is_still_found(nats_store):
    """Before "#1" was reserved for a run's first dispatch, a caller could name any dispatch
    so; such a record kept its alias, and is found by it when no run of that name exists."""
    s = nats_store
    await raw_put(s, [q("legacy#1")])  # run "run-legacy#1": the id does not name its run
    assert (await s.load_dispatch("legacy#1")).run_id == "run-legacy#1"
    await s.cancel("legacy#1", 2000)
    assert (await s.load_dispatch("legacy#1")).status == DispatchStatus.CANCELLED
