"""Proven under faults: the 3-node cluster fixture, the invariant checker on hand-made
journals, a bounded chaos run (every kind of fault, incl. stream-leader kills), and load
across stream-leader kills. `CHAOS_SEED=n` re-runs the chaos tests with another seed.
See docs/reliability.md."""

from __future__ import annotations

import asyncio
import os

import nats
import nats.errors
import pytest

from service.app import start_pod
from service.model import RunRecord, RunStatus, Termination, TerminationKind
from service.protocol import SubmitRequest

from .chaos import ChaosConfig, DecideFact, Facts, PodLife, SubmitFact, check, run_chaos
from .cluster import cluster_settings, nats_cluster, signals_stream, state_stream  # noqa: F401
from .conftest import unique_prefix
from .pods import wait_runs

SEED = int(os.environ.get("CHAOS_SEED", "20261129"))

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------- the cluster


async def test_the_cluster_forms_a_jetstream_meta_group_and_fails_over(nats_cluster):
    c = nats_cluster
    nc = await nats.connect(c.urls)  # nats-py takes the list; start_pod takes c.url
    try:
        js = nc.jetstream()
        await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
        for i in range(20):
            await js.publish("r3.x", str(i).encode())
        await c.wait_stream_current("R3")
        info = await c.stream_info("R3")
        assert info["config"]["num_replicas"] == 3 and len(info["cluster"]["replicas"]) == 2
        leader = await c.stream_leader("R3")
        assert leader in c.names

        # a hung follower (not the node this client talks to): the other two still make a quorum
        connected = f"nats://{nc.connected_url.hostname}:{nc.connected_url.port}"
        follower = next(n.name for n in c.nodes if n.name != leader and n.url != connected)
        c.pause_node(follower)
        await js.publish("r3.x", b"while paused", timeout=5)
        c.resume_node(follower)

        c.kill_node(leader)
        new = leader
        for _ in range(150):
            new = await c.stream_leader("R3")
            if new != leader:
                break
            await asyncio.sleep(0.2)
        assert new != leader and new in c.names
        for _ in range(50):  # the client may be reconnecting from the killed node
            try:
                await js.publish("r3.x", b"after failover", timeout=2)
                break
            except nats.errors.Error:
                await asyncio.sleep(0.2)
        c.start_node(leader)
        await c.wait_stream_current("R3")
        assert (await js.stream_info("R3")).state.messages == 22
    finally:
        await nc.close()


async def test_pods_on_the_cluster_use_r3_and_survive_a_state_leader_kill(nats_cluster):
    prefix = unique_prefix("r3")
    settings = cluster_settings(prefix)
    pod = await start_pod(settings, url=nats_cluster.url, handler="echo", start_api=False)
    try:
        for stream in (state_stream(prefix), signals_stream(prefix), f"{prefix}-events"):
            assert (await nats_cluster.stream_info(stream))["config"]["num_replicas"] == 3
        before = [(await pod.mailbox.submit(SubmitRequest(thread_id=f"t{i % 3}", input=i))).run_id for i in range(9)]
        leader = await nats_cluster.stream_leader(state_stream(prefix))
        nats_cluster.kill_node(leader)
        after = [(await pod.mailbox.submit(SubmitRequest(thread_id=f"t{i % 3}", input=i))).run_id for i in range(9)]
        await wait_runs(pod, before + after, timeout=60)
        nats_cluster.start_node(leader)
        await nats_cluster.wait_stream_current(state_stream(prefix))
    finally:
        await pod.stop(drain_timeout_ms=1000)


# ---------------------------------------------------------------------------- the checker


def _run(run_id: str, thread: str, status: RunStatus = RunStatus.DONE, **kw) -> RunRecord:
    return RunRecord(run_id=run_id, thread_id=thread, status=status, dispatch_id=f"d-{run_id}", created_at=1,
                     updated_at=1, **kw)


def _facts(journal: list[dict], submits: list[SubmitFact], runs: dict, dispatches: dict | None = None,
           pods: list[PodLife] | None = None) -> Facts:
    return Facts(submits=submits, decides=[], faults=[], pods=pods or [], journal=journal, runs=runs,
                 dispatches=dispatches or {})


def _exec(pod: str, thread: str, run: str, attempt: int, t0: float, t1: float | None, settle: object = True,
          token: str | None = None) -> list[dict]:
    """Journal lines of one execution: claim, begin, start, exit (if t1), settle (if settle)."""
    token = token or f"{pod}-{run}-{attempt}"
    d = f"d-{run}"
    lines = [
        {"event": "claim", "pod": pod, "t": t0 - 0.01, "thread": thread, "run": run, "dispatch": d, "attempt": attempt,
         "token": token, "t0": t0 - 0.02, "t1": t0 - 0.01},
        {"event": "begin", "pod": pod, "t": t0 - 0.005, "dispatch": d, "token": token, "instance": token, "ok": True},
        {"event": "start", "pod": pod, "t": t0, "run": run, "thread": thread, "dispatch": d, "attempt": attempt},
    ]
    if t1 is not None:
        lines.append({"event": "exit", "pod": pod, "t": t1, "how": "ok", "run": run, "thread": thread, "dispatch": d,
                      "attempt": attempt})
        if settle is not None:
            lines.append({"event": "settle", "pod": pod, "t": t1 + 0.01, "op": "complete", "dispatch": d,
                          "token": token, "ok": settle, "t0": t1 + 0.005, "t1": t1 + 0.01})
    return lines


def _sub(i: int, run: str, thread: str, t_ack: float | None = 0.5, prio: int = 128) -> SubmitFact:
    return SubmitFact(index=i, thread=thread, priority=prio, strategy="enqueue", decide=False, fail=False,
                      run_id=run, dispatch_id=f"d-{run}", t_first=0.4, t_ack=t_ack)


def test_checker_counts_nothing_on_a_clean_history():
    journal = _exec("p1", "t", "a", 1, 1.0, 2.0) + _exec("p2", "t", "b", 1, 2.1, 3.0)
    figures, info, _ = check(_facts(journal, [_sub(0, "a", "t"), _sub(1, "b", "t")], {"a": _run("a", "t"), "b": _run("b", "t")}))
    assert all(v == 0 for k, v in figures.items() if k != "runs submitted") and figures["runs submitted"] == 2


def test_checker_flags_an_overlap_whose_result_the_store_accepted():
    journal = _exec("p1", "t", "a", 1, 1.0, 3.0) + _exec("p2", "t", "b", 1, 2.0, 4.0)
    figures, _, examples = check(_facts(journal, [_sub(0, "a", "t"), _sub(1, "b", "t")],
                                        {"a": _run("a", "t"), "b": _run("b", "t")}))
    assert figures["overlaps within a thread"] == 1, examples


def test_checker_tolerates_a_fenced_overlap_but_not_its_late_run_write():
    # p1 is paused with run a; its lease lapses, p2 re-runs it (attempt 2); p1's result is rejected
    journal = _exec("p1", "t", "a", 1, 1.0, 6.0, settle="conflict") + _exec("p2", "t", "a", 2, 4.5, 5.0)
    pods = [PodLife("p1", 1, 0.0, pauses=[(1.5, 5.9)]), PodLife("p2", 2, 0.0)]
    figures, info, _ = check(_facts(journal, [_sub(0, "a", "t")], {"a": _run("a", "t")}, pods=pods))
    assert figures["overlaps within a thread"] == 0
    assert info["overlaps with a fenced (paused/killed/cut-off) execution"] == 1
    late = {"event": "run_write", "pod": "p1", "t": 6.01, "run": "a", "dispatch": "d-a", "token": "p1-a-1",
            "status": "done", "term": "natural_end", "error": None, "t0": 6.0, "t1": 6.01}
    figures, _, _ = check(_facts(journal + [late], [_sub(0, "a", "t")], {"a": _run("a", "t")}, pods=pods))
    assert figures["stale writes accepted"] == 1


def test_checker_flags_duplicate_attempts_lost_and_unfinished_runs():
    journal = _exec("p1", "t", "a", 1, 1.0, 2.0) + _exec("p2", "t", "a", 1, 2.5, 3.0)
    subs = [_sub(0, "a", "t"), _sub(1, "gone", "t"), _sub(2, "stuck", "u"), _sub(3, "never", "u", t_ack=None),
            _sub(4, "dead", "v")]
    runs = {"a": _run("a", "t"), "gone": None, "stuck": _run("stuck", "u", RunStatus.RUNNING),
            "dead": _run("dead", "v", error="run 'dead' not found", termination=Termination(TerminationKind.ERROR))}
    dispatches = {"d-stuck": {"status": "superseded", "priority": 128, "created_at": 1, "run": "stuck"}}
    figures, _, _ = check(_facts(journal, subs, runs, dispatches))
    assert figures["duplicate executions of a dispatch attempt"] == 1
    assert figures["runs lost"] == 2  # no record; running with nothing left to finish it
    assert figures["runs not terminal after quiescence"] == 1
    assert figures["submits not acknowledged"] == 1
    assert figures["runs dead-lettered"] == 1


def test_checker_flags_a_run_started_ahead_of_a_queued_higher_priority_run():
    # both acknowledged before the first claim; the prio-255 run is claimed first
    journal = _exec("p1", "t", "low", 1, 1.0, 1.5) + _exec("p1", "t", "high", 1, 2.0, 2.5)
    subs = [_sub(0, "high", "t", prio=0), _sub(1, "low", "t", prio=255)]
    dispatches = {"d-high": {"status": "acked", "priority": 0, "created_at": 10, "run": "high"},
                  "d-low": {"status": "acked", "priority": 255, "created_at": 5, "run": "low"}}
    runs = {"high": _run("high", "t"), "low": _run("low", "t")}
    figures, _, examples = check(_facts(journal, subs, runs, dispatches))
    assert figures["order violations within a thread"] == 1, examples
    # acknowledged only after the first claim began: not queued together, no violation
    late = [_sub(0, "high", "t", prio=0, t_ack=0.99), subs[1]]
    assert check(_facts(journal, late, runs, dispatches))[0]["order violations within a thread"] == 0


def test_checker_counts_decisions_asked_again_after_an_acknowledged_decide():
    ask = {"event": "ask", "pod": "p2", "t": 5.0, "run": "a", "thread": "t", "dispatch": "d-a", "attempt": 2,
           "stored": False}
    facts = _facts(_exec("p1", "t", "a", 1, 1.0, 2.0) + [ask], [_sub(0, "a", "t")],
                   {"a": _run("a", "t", termination=Termination(TerminationKind.NATURAL_END))})
    facts.decides = [DecideFact("a", "tok", 1.5, 1.6, "live")]
    assert check(facts)[1]["decisions asked again after an acknowledged decide"] == 1


# ---------------------------------------------------------------------------- chaos


async def test_bounded_chaos_run_keeps_every_invariant():
    """300 runs over 40 threads on 3 pod processes and a 3-node cluster, with one fault of
    each kind: pod SIGKILL, pod SIGSTOP, NATS node restart, and SIGKILL of the stream leader
    of the state bucket and of the signals stream."""
    report = await run_chaos(ChaosConfig(runs=300, threads=40, seed=SEED, load_seconds=16, faults=5,
                                         quiesce_timeout=75))
    print(report.table())
    kinds = {f.kind for f in report.faults}
    assert {"state_leader_kill", "signals_leader_kill", "pod_kill", "pod_pause", "nats_restart"} <= kinds
    assert report.ok, report.table()


async def test_stream_leader_kills_during_load_lose_no_acknowledged_submit_and_keep_threads_serial():
    """The leader of the state bucket's stream and then of the signals stream is SIGKILLed
    while runs are submitted; afterwards every acknowledged run is done and no two
    executions of a thread overlapped."""
    report = await run_chaos(ChaosConfig(runs=200, threads=20, seed=SEED + 1, load_seconds=12, faults=2,
                                         kinds=("state_leader_kill", "signals_leader_kill"), quiesce_timeout=75))
    print(report.table())
    assert sorted(f.kind for f in report.faults) == ["signals_leader_kill", "state_leader_kill"]
    assert all("elected" in f.detail and "none elected" not in f.detail for f in report.faults)
    f = report.figures
    assert f["submits not acknowledged"] == 0 and f["runs lost"] == 0, report.table()
    assert f["overlaps within a thread"] == 0 and f["duplicate executions of a dispatch attempt"] == 0, report.table()
    assert f["stale writes accepted"] == 0 and f["runs not terminal after quiescence"] == 0, report.table()
