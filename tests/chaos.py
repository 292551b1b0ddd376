"""Chaos runner: the mailbox on a 3-node JetStream cluster (R3), 3 pods as OS processes,
load from this process, seeded faults, then an invariant check over the journal and the store.

    python -m tests.chaos --runs 2000 --threads 200 --seed 7

Exit status 0 when every invariant holds, 1 when one is broken (the table says which), 2 when
the run itself could not be carried out. The same seed gives the same load (threads,
priorities, strategies, handler behaviour, submit times) and the same fault schedule (kinds,
times, down times, targets); what the processes do in between is up to the machine, so a
failure is re-run with its seed, not replayed. docs/reliability.md defines every figure.

Importable: `await run_chaos(ChaosConfig(...))` returns a `ChaosReport`; `check(...)` is the
pure invariant checker over recorded facts (tests feed it hand-made journals).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.app import Pod, start_pod
from service.embedded import NatsCluster
from service.mailbox import ConflictError
from service.model import RUN_SUPERSEDED, DispatchStatus, RunRecord, RunStatus, TerminationKind
from service.protocol import SubmitRequest
from service.store import keys

from .pods import fast_settings

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("chaos")

POD_FAULTS = ("pod_kill", "pod_pause")
NATS_FAULTS = ("nats_restart", "state_leader_kill", "signals_leader_kill")
FAULT_KINDS = POD_FAULTS + NATS_FAULTS
FAULT_NAMES = {
    "pod_kill": "service pod SIGKILL, restarted",
    "pod_pause": "service pod SIGSTOP, SIGCONT later",
    "nats_restart": "NATS node restart (SIGTERM or SIGKILL)",
    "state_leader_kill": "SIGKILL of the state bucket's stream leader",
    "signals_leader_kill": "SIGKILL of the signals stream's leader",
}

# the pods' settings (the runner's control connection uses the same: stream and consumer
# configs are verified against each other at start)
POD_SETTINGS = dict(
    replicas=3,
    concurrency=16,
    lease_ms=3000,
    lease_renewal_ms=500,
    suspended_lease_ms=6000,
    decision_wait_ms=1500,
)
MAX_ATTEMPTS = 20
"""Per run: a run whose pod is killed or paused several times is retried, not dead-lettered."""


# ---------------------------------------------------------------------------- the plan


@dataclass
class ChaosConfig:
    runs: int = 2000
    threads: int = 200
    seed: int = 1
    pods: int = 3
    load_seconds: float | None = None
    """Window over which the runs are submitted (default: max(15, runs / 30))."""
    faults: int | None = None
    """Faults injected during the load (default: one per ~5 s of load, at least 5)."""
    kinds: tuple[str, ...] = FAULT_KINDS
    quiesce_timeout: float = 240.0
    workdir: str | None = None
    keep_workdir: bool = False
    pod_settings: dict[str, int] = field(default_factory=lambda: dict(POD_SETTINGS))
    decide_fraction: float = 0.08
    fail_fraction: float = 0.10
    interrupt_fraction: float = 0.04
    long_fraction: float = 0.08

    @property
    def load(self) -> float:
        return self.load_seconds if self.load_seconds is not None else max(15.0, self.runs / 30)

    @property
    def n_faults(self) -> int:
        return self.faults if self.faults is not None else max(5, int(self.load / 5))


@dataclass
class PlannedRun:
    index: int
    thread: str
    priority: int
    strategy: str
    sleep: float
    fail: bool
    decide: bool
    at: float  # seconds after the load starts


@dataclass
class PlannedFault:
    at: float
    kind: str
    down: float  # seconds down / paused
    pick: float  # chooses the target among those eligible when the fault fires
    graceful: bool = False  # nats_restart: SIGTERM instead of SIGKILL


def plan_runs(cfg: ChaosConfig) -> list[PlannedRun]:
    """Threads get their runs in bursts (so runs queue up together and order matters)."""
    rng = random.Random(f"{cfg.seed}:runs")
    bursts = 2
    burst_at = [[rng.uniform(0, cfg.load * 0.92) for _ in range(bursts)] for _ in range(cfg.threads)]
    out = []
    for i in range(cfg.runs):
        t = rng.randrange(cfg.threads)
        at = burst_at[t][rng.randrange(bursts)] + rng.uniform(0, 0.5)
        r = rng.random()
        decide = r < cfg.decide_fraction
        fail = cfg.decide_fraction <= r < cfg.decide_fraction + cfg.fail_fraction
        long = rng.random() < cfg.long_fraction
        out.append(
            PlannedRun(
                index=i,
                thread=f"t{t}",
                priority=rng.choice([0, 64, 128, 128, 128, 255]),
                strategy="interrupt" if rng.random() < cfg.interrupt_fraction else "enqueue",
                sleep=round(rng.uniform(0.5, 2.0) if long else rng.uniform(0.0, 0.15), 3),
                fail=fail,
                decide=decide,
                at=at,
            )
        )
    out.sort(key=lambda p: p.at)
    return out


def plan_faults(cfg: ChaosConfig) -> list[PlannedFault]:
    """Every kind at least once (when there are enough faults), the rest at random."""
    rng = random.Random(f"{cfg.seed}:faults")
    n = cfg.n_faults
    kinds = list(cfg.kinds[:n]) + [rng.choice(cfg.kinds) for _ in range(max(0, n - len(cfg.kinds)))]
    rng.shuffle(kinds)
    times = sorted(rng.uniform(0.08 * cfg.load, 0.95 * cfg.load) for _ in kinds)
    out = []
    for at, kind in zip(times, kinds):
        if kind == "pod_kill":
            down = rng.uniform(0.3, 3.0)
        elif kind == "pod_pause":
            down = rng.uniform(1.0, 7.0)  # past the 3 s lease about half of the time
        else:
            down = rng.uniform(0.5, 4.0)
        out.append(PlannedFault(at=round(at, 3), kind=kind, down=round(down, 3), pick=rng.random(),
                                graceful=rng.random() < 0.5))
    return out


def decide_delay(seed: int, index: int, episode: int) -> float:
    """How long the "human" takes to answer a waiting run (some answer in-run, some later)."""
    return random.Random(f"{seed}:decide:{index}:{episode}").uniform(0.0, 3.0)


# ---------------------------------------------------------------------------- facts recorded


@dataclass
class SubmitFact:
    index: int
    thread: str
    priority: int
    strategy: str
    decide: bool
    fail: bool
    run_id: str = ""
    dispatch_id: str = ""
    t_first: float = 0.0  # first attempt started
    t_ack: float | None = None  # the submit returned (acknowledged)
    tries: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class DecideFact:
    run_id: str
    token: str
    t0: float
    t1: float
    result: str  # live | durable | conflict: ... | error: ...


@dataclass
class FaultFact:
    kind: str
    target: str
    t0: float
    t1: float  # healed (restarted, resumed, cluster current again)
    detail: str = ""


@dataclass
class PodLife:
    name: str
    pid: int
    up: float
    down: float | None = None  # killed or stopped at
    killed: bool = False
    pauses: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Facts:
    submits: list[SubmitFact]
    decides: list[DecideFact]
    faults: list[FaultFact]
    pods: list[PodLife]
    journal: list[dict[str, Any]]
    runs: dict[str, RunRecord | None]
    dispatches: dict[str, dict[str, Any]]  # dispatch id -> record fields (status, priority, created_at, run)
    lease_ms: int = 3000


# ---------------------------------------------------------------------------- the checker


@dataclass
class Execution:
    pod: str
    thread: str
    run: str
    dispatch: str
    attempt: int
    start: float
    end: float
    exit: str | None  # how the handler ended (None: the process died under it)
    token: str | None
    claim_t1: float | None
    accepted: bool  # the store accepted this execution's settle (complete/nack/dead_letter/supersede)
    settles: list[dict[str, Any]]


@dataclass
class ChaosReport:
    seed: int
    config: dict[str, Any]
    figures: dict[str, int]
    info: dict[str, Any]
    examples: dict[str, list[str]]
    faults: list[FaultFact]
    elapsed: float = 0.0
    workdir: str = ""

    VIOLATIONS = (
        "submits not acknowledged",
        "runs lost",
        "runs dead-lettered",
        "duplicate executions of a dispatch attempt",
        "overlaps within a thread",
        "stale writes accepted",
        "order violations within a thread",
        "runs not terminal after quiescence",
    )

    @property
    def ok(self) -> bool:
        return all(self.figures.get(k, 0) == 0 for k in self.VIOLATIONS)

    def table(self) -> str:
        c = self.config
        lines = [
            f"chaos seed={self.seed} runs={c['runs']} threads={c['threads']} pods={c['pods']} "
            f"nats=3 nodes (R3) load={c['load']:.0f}s faults={len(self.faults)} elapsed={self.elapsed:.0f}s",
            "",
            "| invariant | count |",
            "|---|---:|",
            f"| runs submitted | {self.figures['runs submitted']} |",
        ]
        for k in self.VIOLATIONS:
            lines.append(f"| {k} | {self.figures[k]} |")
        lines += ["", "| faults injected | count |", "|---|---:|"]
        by_kind = Counter(f.kind for f in self.faults)
        for k in FAULT_KINDS:
            lines.append(f"| {FAULT_NAMES[k]} | {by_kind.get(k, 0)} |")
        t0 = self.config.get("t0", 0.0)
        for f in sorted(self.faults, key=lambda f: f.t0):
            lines.append(f"  at +{f.t0 - t0:5.1f}s {f.kind} {f.target}: {f.detail}; healed after {f.t1 - f.t0:.1f}s")
        lines += ["", "| observed (not invariants) | count |", "|---|---:|"]
        for k, v in self.info.items():
            lines.append(f"| {k} | {v} |")
        bad = [k for k in self.VIOLATIONS if self.figures[k]]
        if bad:
            lines.append("")
            for k in bad:
                lines.append(f"{k}:")
                for e in self.examples.get(k, [])[:10]:
                    lines.append(f"  - {e}")
        lines.append("")
        if self.workdir:
            lines.append(f"journal, logs and facts kept in {self.workdir}")
        lines.append(f"result: {'OK' if self.ok else 'VIOLATIONS'} (seed {self.seed}; re-run: "
                     f"python -m tests.chaos --runs {c['runs']} --threads {c['threads']} --seed {self.seed})")
        return "\n".join(lines)


def _executions(facts: Facts) -> tuple[list[Execution], list[str]]:
    """One Execution per handler start, joined with its claim, exit and settle lines."""
    anomalies: list[str] = []
    claims: dict[tuple[str, str, int], dict[str, Any]] = {}
    begins: dict[tuple[str, str], dict[str, Any]] = {}
    exits: dict[tuple[str, str, int], dict[str, Any]] = {}
    settles: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in facts.journal:
        ev = line["event"]
        if ev == "claim":
            claims[(line["pod"], line["dispatch"], line["attempt"])] = line
        elif ev == "exit":
            exits[(line["pod"], line["dispatch"], line["attempt"])] = line
        elif ev == "begin" or (ev == "claim" and line.get("instance")):
            begins[(line["dispatch"], line["token"])] = line
        elif ev == "settle":
            settles[(line["dispatch"], line["token"])].append(line)
    death = {p.name: p.down for p in facts.pods}
    out = []
    for line in facts.journal:
        if line["event"] != "start":
            continue
        key = (line["pod"], line["dispatch"], line["attempt"])
        claim = claims.get(key)
        if claim is None:
            anomalies.append(f"start without a journaled claim: {key}")
        token = claim["token"] if claim else None
        ex = exits.get(key)
        mine = settles.get((line["dispatch"], token), []) if token else []
        end = ex["t"] if ex else (death.get(line["pod"]) or math.inf)
        accepted = any(s["ok"] is True for s in mine)
        if not accepted and mine:  # an outcome we do not know (cancelled midway, error): ask the store
            final = facts.dispatches.get(line["dispatch"]) or {}
            instance = (begins.get((line["dispatch"], token)) or {}).get("instance")
            accepted = bool(instance) and final.get("instance") == instance and final.get("status") == DispatchStatus.ACKED
        out.append(
            Execution(
                pod=line["pod"], thread=line["thread"], run=line["run"], dispatch=line["dispatch"],
                attempt=line["attempt"], start=line["t"], end=end, exit=ex["how"] if ex else None, token=token,
                claim_t1=claim["t1"] if claim else None, accepted=accepted, settles=mine,
            )
        )
    return out, anomalies


def check(facts: Facts) -> tuple[dict[str, int], dict[str, Any], dict[str, list[str]]]:
    """The invariants over what was recorded. Returns (figures, info, examples)."""
    figures: dict[str, int] = {}
    info: dict[str, Any] = {}
    examples: dict[str, list[str]] = defaultdict(list)
    execs, anomalies = _executions(facts)
    acked = [s for s in facts.submits if s.t_ack is not None]
    figures["runs submitted"] = len(facts.submits)
    figures["submits not acknowledged"] = len(facts.submits) - len(acked)
    for s in facts.submits:
        if s.t_ack is None:
            examples["submits not acknowledged"].append(f"run #{s.index} on {s.thread}: {s.errors[-1:]}")

    # lost / not terminal
    live_of_run: dict[str, list[str]] = defaultdict(list)
    for d in facts.dispatches.values():
        if d["status"] in (DispatchStatus.QUEUED, DispatchStatus.CLAIMED):
            live_of_run[d["run"]].append(d["status"])
    lost = not_terminal = 0
    for s in acked:
        rec = facts.runs.get(s.run_id)
        if rec is None:
            lost += 1
            examples["runs lost"].append(f"{s.run_id} on {s.thread}: acknowledged, no run record")
            continue
        if rec.status != RunStatus.DONE:
            not_terminal += 1
            examples["runs not terminal after quiescence"].append(
                f"{s.run_id} on {s.thread}: {rec.status}, dispatch {rec.dispatch_id} "
                f"({(facts.dispatches.get(rec.dispatch_id or '') or {}).get('status')})"
            )
            decided = rec.waiting is not None and rec.waiting.ticket in rec.decisions
            if (rec.status != RunStatus.WAITING or decided) and not live_of_run.get(s.run_id):
                lost += 1  # stranded: nothing queued or claimed will ever finish it
                examples["runs lost"].append(
                    f"{s.run_id} on {s.thread}: {rec.status} but no queued or claimed dispatch carries it "
                    f"(its dispatch {rec.dispatch_id} is "
                    f"{(facts.dispatches.get(rec.dispatch_id or '') or {}).get('status', 'missing')})"
                )
    figures["runs lost"] = lost

    # dead letters: this load never fails permanently and retries transient failures once;
    # a run dead-letters only if the service gave up on it (20 attempts would take 19 takeovers)
    dead = 0
    for s in acked:
        rec = facts.runs.get(s.run_id)
        if rec is not None and rec.is_done and rec.termination is not None and rec.termination.type == TerminationKind.ERROR:
            dead += 1
            examples["runs dead-lettered"].append(f"{s.run_id} on {s.thread}: {rec.error}")
    figures["runs dead-lettered"] = dead

    # duplicate executions of one dispatch attempt
    starts = Counter((e.dispatch, e.attempt) for e in execs)
    figures["duplicate executions of a dispatch attempt"] = sum(n - 1 for n in starts.values() if n > 1)
    for (d, a), n in starts.items():
        if n > 1:
            pods = [e.pod for e in execs if e.dispatch == d and e.attempt == a]
            examples["duplicate executions of a dispatch attempt"].append(f"dispatch {d} attempt {a} started {n}x on {pods}")

    # overlaps: B starts while an execution A of the same thread runs whose result the store
    # accepted. (If A's result was rejected, A was fenced: its overlap is tolerated, and its
    # late writes are checked below.)
    by_thread: dict[str, list[Execution]] = defaultdict(list)
    for e in execs:
        by_thread[e.thread].append(e)
    overlaps = fenced_overlaps = 0
    fenced_with_overlap: list[Execution] = []
    for thread, rows in by_thread.items():
        rows.sort(key=lambda e: e.start)
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                if b.start >= a.end:
                    break
                if a.accepted:
                    overlaps += 1
                    examples["overlaps within a thread"].append(
                        f"{thread}: {b.pod} started {b.dispatch}#{b.attempt} at {b.start:.3f} while {a.pod} ran "
                        f"{a.dispatch}#{a.attempt} ({a.start:.3f}-{a.end:.3f}), whose result the store accepted"
                    )
                else:
                    fenced_overlaps += 1
                    fenced_with_overlap.append(a)
    figures["overlaps within a thread"] = overlaps
    info["overlaps with a fenced (paused/killed/cut-off) execution"] = fenced_overlaps

    # stale writes: a run-record write by an execution whose claim another claim on the
    # thread had already replaced, and whose own settle the store did not accept
    claims_by_thread: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in facts.journal:
        if line["event"] == "claim":
            claims_by_thread[line["thread"]].append(line)
    for rows in claims_by_thread.values():
        rows.sort(key=lambda c: c["t1"])
    exec_by_token = {(e.dispatch, e.token): e for e in execs if e.token}
    claim_by_token = {(c["dispatch"], c["token"]): c for rows in claims_by_thread.values() for c in rows}
    stale = 0
    for line in facts.journal:
        if line["event"] != "run_write" or not line.get("token"):
            continue
        claim = claim_by_token.get((line["dispatch"], line["token"]))
        if claim is None:
            continue
        e = exec_by_token.get((line["dispatch"], line["token"]))
        if e is not None and e.accepted:
            continue
        if line["status"] == RunStatus.DONE and line.get("error") == RUN_SUPERSEDED:
            continue  # mirrors the store: the dispatch was superseded
        takeover = next(
            (c for c in claims_by_thread[claim["thread"]] if c["t1"] > claim["t1"] and c["token"] != claim["token"]),
            None,
        )
        if takeover is not None and line["t0"] > takeover["t1"]:
            stale += 1
            examples["stale writes accepted"].append(
                f"{line['pod']} wrote run {line['run']} -> {line['status']}/{line.get('term')} at {line['t0']:.3f} "
                f"for {line['dispatch']} (its claim was taken over by {takeover['pod']} "
                f"{takeover['dispatch']}#{takeover['attempt']} at {takeover['t1']:.3f}; its own settle was not accepted)"
            )
    figures["stale writes accepted"] = stale

    # order: among runs queued together on a thread, first claims follow (priority, created_at, id)
    first_claim: dict[str, dict[str, Any]] = {}
    for line in facts.journal:
        if line["event"] == "claim" and line["attempt"] == 1:
            first_claim.setdefault(line["dispatch"], line)
    order = 0
    subs_by_thread: dict[str, list[SubmitFact]] = defaultdict(list)
    for s in acked:
        if s.dispatch_id in facts.dispatches:
            subs_by_thread[s.thread].append(s)
    for thread, subs in subs_by_thread.items():
        def key(s: SubmitFact) -> tuple[int, int, str]:
            d = facts.dispatches[s.dispatch_id]
            return (d["priority"], d["created_at"], s.dispatch_id)

        for y in subs:
            cy = first_claim.get(y.dispatch_id)
            if cy is None:
                continue
            for x in subs:
                if x is y or x.t_ack is None or x.t_ack >= cy["t0"] or key(x) >= key(y):
                    continue
                cx = first_claim.get(x.dispatch_id)
                if cx is None or cx["t0"] <= cy["t1"]:
                    continue  # x never started (superseded/cancelled) or may have been claimed first
                order += 1
                examples["order violations within a thread"].append(
                    f"{thread}: {y.run_id} (prio {key(y)[0]}) claimed at {cy['t0']:.3f} before {x.run_id} "
                    f"(prio {key(x)[0]}, acknowledged at {x.t_ack:.3f} after {x.tries} tries"
                    f"{', first error ' + x.errors[0] if x.errors else ''}, claimed at {cx['t0']:.3f})"
                )
                break
    figures["order violations within a thread"] = order
    figures["runs not terminal after quiescence"] = not_terminal

    # observations
    done = [facts.runs.get(s.run_id) for s in acked]
    done = [r for r in done if r is not None and r.status == RunStatus.DONE]
    info["handler executions"] = len(execs)
    info["re-executions after a takeover (attempt > 1, not a retry)"] = sum(
        1 for e in execs if e.attempt > 1 and not _retried(facts, e)
    )
    info["transient failures retried"] = sum(1 for e in execs if e.exit == "fail")
    info["executions cut off by a SIGKILL"] = sum(1 for e in execs if e.exit is None)
    info["fenced executions (result rejected by the store)"] = sum(
        1 for e in execs if e.settles and not e.accepted
    )
    info["runs superseded or cancelled by an interrupt"] = sum(
        1 for r in done if r.termination is not None and r.termination.type == TerminationKind.CANCELLED
    )
    info["decisions delivered live / durably"] = (
        f"{sum(1 for d in facts.decides if d.result == 'live')} / "
        f"{sum(1 for d in facts.decides if d.result == 'durable')}"
    )
    reasks = _decisions_asked_again(facts)
    info["decisions asked again after an acknowledged decide"] = reasks
    info["journal anomalies"] = len(anomalies)
    examples["journal anomalies"] = anomalies[:10]
    return figures, info, dict(examples)


def _retried(facts: Facts, e: Execution) -> bool:
    prev = [x for x in facts.journal if x["event"] == "exit" and x["dispatch"] == e.dispatch and x["attempt"] == e.attempt - 1]
    return any(x["how"] == "fail" for x in prev)


def _decisions_asked_again(facts: Facts) -> int:
    """Handler waits for a decision (not stored) after a decide for its run was acknowledged."""
    acked: dict[str, float] = {}
    for d in facts.decides:
        if d.result in ("live", "durable"):
            acked[d.run_id] = min(acked.get(d.run_id, math.inf), d.t1)
    return sum(
        1
        for line in facts.journal
        if line["event"] == "ask" and not line["stored"] and line["t"] > acked.get(line["run"], math.inf)
    )


# ---------------------------------------------------------------------------- processes


class PodProcess:
    def __init__(self, urls: list[str], prefix: str, journal: Path, log_path: Path, settings: dict[str, int]) -> None:
        args = [f"{k}={v}" for k, v in settings.items()]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos_pod", ",".join(urls), prefix, str(journal), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,
        )
        self.name = f"proc{self.proc.pid}"
        self.life = PodLife(name=self.name, pid=self.proc.pid, up=time.time())
        self.paused_since: float | None = None

    async def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if line.strip() != b"ready":
            raise RuntimeError(f"pod {self.name} did not start: {line!r} (exit {self.proc.poll()})")
        self.life.up = time.time()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait()
            self.life.down, self.life.killed = time.time(), True
        elif self.life.down is None:
            self.life.down = time.time()  # it exited by itself
        self.log.close()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused_since = time.time()

    def resume(self) -> None:
        if self.alive:
            os.kill(self.proc.pid, signal.SIGCONT)
        if self.paused_since is not None:
            self.life.pauses.append((self.paused_since, time.time()))
            self.paused_since = None

    async def terminate(self, timeout: float = 30) -> int:
        if self.paused_since is not None:
            self.resume()
        if not self.alive:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = await asyncio.to_thread(self.proc.wait)
        self.life.down = time.time()
        self.log.close()
        return code


# ---------------------------------------------------------------------------- the run


class Chaos:
    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix=f"chaos-{cfg.seed}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.journal = self.workdir / "journal.jsonl"
        self.prefix = f"chaos{cfg.seed}x{os.getpid()}"
        self.cluster = NatsCluster(log_dir=str(self.workdir))
        self.pods: list[PodProcess] = []
        self.retired: list[PodProcess] = []
        self.control: Pod | None = None
        self.submits: list[SubmitFact] = []
        self.decides: list[DecideFact] = []
        self.faults: list[FaultFact] = []
        self.t0 = 0.0
        self._bg: set[asyncio.Task[Any]] = set()
        self._nats_busy = asyncio.Lock()

    @property
    def streams(self) -> list[str]:
        return [keys.stream_of_bucket(keys.bucket_name(self.prefix)), f"{self.prefix}-signals", f"{self.prefix}-events"]

    def _settings(self):  # type: ignore[no-untyped-def]
        return fast_settings(self.prefix, **self.cfg.pod_settings)

    def _spawn_pod(self) -> PodProcess:
        n = len(self.pods) + len(self.retired)
        p = PodProcess(self.cluster.urls, self.prefix, self.journal, self.workdir / f"pod{n}.log", self.cfg.pod_settings)
        self.pods.append(p)
        return p

    async def run(self) -> ChaosReport:
        started = time.monotonic()
        cfg = self.cfg
        report: ChaosReport | None = None
        try:
            self.cluster.start()
            await self.cluster.wait_jetstream()
            self.control = await start_pod(self._settings(), url=self.cluster.url, handler="echo",
                                           start_worker=False, start_api=False)
            if os.environ.get("MAILBOX_CHAOS_TRACE") == "1":
                from .chaos_pod import Journal, trace_writes

                trace_writes(self.control.store, Journal(str(self.journal), "runner"))
            for s in self.streams:
                await self.cluster.wait_stream_current(s)
            for _ in range(cfg.pods):
                self._spawn_pod()
            await asyncio.gather(*(p.wait_ready() for p in self.pods))
            log.info("cluster %s, pods %s, prefix %s", self.cluster.names, [p.name for p in self.pods], self.prefix)

            plan = plan_runs(cfg)
            self.submits = [SubmitFact(p.index, p.thread, p.priority, p.strategy, p.decide, p.fail) for p in plan]
            by_index = {s.index: s for s in self.submits}
            self.t0 = time.time()
            stop_deciding = asyncio.Event()
            decider = asyncio.create_task(self._decider(by_index, stop_deciding))
            faults = asyncio.create_task(self._inject(plan_faults(cfg)))
            await asyncio.gather(*(self._submit(p, by_index[p.index]) for p in plan))
            log.info("all %d submits done after %.1fs", len(plan), time.time() - self.t0)
            await faults
            await self._heal()
            quiet = await self._quiesce()
            log.info("quiescent=%s after %.1fs", quiet, time.time() - self.t0)
            stop_deciding.set()
            await decider
            for p in self.pods:
                await p.terminate()
            facts = await self._facts()
            figures, info, examples = check(facts)
            info["quiescent before the timeout"] = "yes" if quiet else "no"
            keep = cfg.keep_workdir or not all(figures.get(k, 0) == 0 for k in ChaosReport.VIOLATIONS)
            report = ChaosReport(
                seed=cfg.seed,
                config={"runs": cfg.runs, "threads": cfg.threads, "pods": cfg.pods, "load": cfg.load, "t0": self.t0},
                figures=figures, info=info, examples=examples, faults=self.faults,
                elapsed=time.monotonic() - started, workdir=str(self.workdir) if keep else "",
            )
            (self.workdir / "report.txt").write_text(report.table() + "\n")
            (self.workdir / "facts.json").write_text(json.dumps(
                {"submits": [asdict(s) for s in self.submits], "decides": [asdict(d) for d in self.decides],
                 "faults": [asdict(f) for f in self.faults], "pods": [asdict(p.life) for p in self.pods + self.retired]},
                indent=1))
            return report
        finally:
            for t in self._bg:
                t.cancel()
            for p in self.pods + self.retired:
                if p.paused_since is not None:
                    p.resume()
                p.kill()
            if self.control is not None:
                await self.control.kill()
            self.cluster.cleanup()  # the nodes' logs are in the workdir
            if report is None or not report.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------

    async def _submit(self, p: PlannedRun, fact: SubmitFact) -> None:
        assert self.control is not None
        mailbox = self.control.mailbox
        await asyncio.sleep(max(0.0, self.t0 + p.at - time.time()))
        fact.run_id, fact.dispatch_id = mailbox.new_id(), mailbox.new_id()
        req = SubmitRequest(
            thread_id=p.thread,
            input={"i": p.index, "sleep": p.sleep, "fail": p.fail, "decide": p.decide},
            priority=p.priority,
            strategy=p.strategy,
            run_id=fact.run_id,
            dispatch_id=fact.dispatch_id,
            max_attempts=MAX_ATTEMPTS,
        )
        fact.t_first = time.time()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            fact.tries += 1
            try:
                reply = await mailbox.submit(req)
            except Exception as exc:  # store unavailable during an election, timeouts: retry, same ids
                fact.errors.append(repr(exc)[:300])
                await asyncio.sleep(0.5)
                continue
            if reply.run_id != fact.run_id:
                fact.errors.append(f"reply names run {reply.run_id}")
            fact.t_ack = time.time()
            return

    async def _decider(self, by_index: dict[int, SubmitFact], stop: asyncio.Event) -> None:
        """The "human": answers every waiting episode of a deciding run after a seeded delay."""
        assert self.control is not None
        store, mailbox = self.control.store, self.control.mailbox
        answered: set[tuple[str, int]] = set()
        episodes: Counter[str] = Counter()
        done: set[str] = set()
        pending: set[asyncio.Task[None]] = set()

        async def answer(s: SubmitFact, since: int, delay: float) -> None:
            await asyncio.sleep(delay)
            token = f"{s.index}:{since}"
            t0 = time.time()
            try:
                reply = await mailbox.decide(s.run_id, "approval", {"approved": True, "token": token})
                result = reply.delivered
            except ConflictError as exc:
                result = f"conflict: {exc.message}"
                answered.discard((s.run_id, since))
            except Exception as exc:
                result = f"error: {exc!r}"[:300]
                answered.discard((s.run_id, since))
            self.decides.append(DecideFact(s.run_id, token, t0, time.time(), result))

        while not stop.is_set():
            for s in by_index.values():
                if not s.decide or s.t_ack is None or s.run_id in done:
                    continue
                try:
                    r = await store.load_run(s.run_id)
                except Exception:
                    continue
                if r is None:
                    continue
                if r.is_done:
                    done.add(s.run_id)
                    continue
                if r.status == RunStatus.WAITING and r.waiting is not None:
                    k = (s.run_id, r.waiting.since)
                    if k not in answered:
                        answered.add(k)
                        episodes[s.run_id] += 1
                        t = asyncio.create_task(answer(s, r.waiting.since, decide_delay(self.cfg.seed, s.index, episodes[s.run_id])))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
            await asyncio.sleep(0.3)
        if pending:
            await asyncio.wait(pending, timeout=30)

    # -- faults ----------------------------------------------------------------------------

    async def _inject(self, plan: list[PlannedFault]) -> None:
        for f in plan:
            await asyncio.sleep(max(0.0, self.t0 + f.at - time.time()))
            try:
                if f.kind in POD_FAULTS:
                    self._pod_fault(f)
                else:
                    await self._nats_fault(f)  # one NATS node down at a time: awaited until healed
            except Exception as exc:
                log.warning("fault %s failed: %r", f.kind, exc)
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)

    def _background(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _start_pod(self, timeout: float = 90.0) -> PodProcess:
        """Start a pod like a supervisor would: a pod that cannot start (its start-up calls
        time out while JetStream elects a leader) exits, and is started again."""
        deadline = time.monotonic() + timeout
        while True:
            p = self._spawn_pod()
            try:
                await p.wait_ready()
                return p
            except Exception as exc:
                p.kill()
                self.pods.remove(p)
                self.retired.append(p)
                if time.monotonic() > deadline:
                    raise
                log.info("pod %s did not start (%s); starting another", p.name, exc)
                await asyncio.sleep(1.0)

    def _pod_fault(self, f: PlannedFault) -> None:
        eligible = [p for p in self.pods if p.alive and p.paused_since is None]
        if len(eligible) < 2:  # keep one pod working
            log.info("fault %s skipped: no eligible pod", f.kind)
            return
        pod = eligible[int(f.pick * len(eligible))]
        t0 = time.time()
        if f.kind == "pod_kill":
            pod.kill()
            self.pods.remove(pod)
            self.retired.append(pod)

            async def restart() -> None:
                await asyncio.sleep(f.down)
                new = await self._start_pod()
                self.faults.append(FaultFact(f.kind, pod.name, t0, time.time(), f"restarted as {new.name}"))

            self._background(restart())
        else:
            pod.pause()

            async def resume() -> None:
                await asyncio.sleep(f.down)
                pod.resume()
                self.faults.append(FaultFact(f.kind, pod.name, t0, time.time(), f"paused {f.down:.1f}s"))

            self._background(resume())
        log.info("%s %s (down %.1fs)", f.kind, pod.name, f.down)

    async def _nats_fault(self, f: PlannedFault) -> None:
        async with self._nats_busy:
            t0 = time.time()
            if f.kind == "nats_restart":
                target = self.cluster.names[int(f.pick * len(self.cluster.names))]
                detail = "SIGTERM" if f.graceful else "SIGKILL"
                self.cluster.stop_node(target) if f.graceful else self.cluster.kill_node(target)
            else:
                stream = self.streams[0] if f.kind == "state_leader_kill" else self.streams[1]
                target = await self.cluster.stream_leader(stream)
                self.cluster.kill_node(target)
                elected = await self._new_leader(stream, target)
                detail = f"leader of {stream}; {elected} elected after {time.time() - t0:.1f}s"
            log.info("%s %s (%s, down %.1fs)", f.kind, target, detail, f.down)
            await asyncio.sleep(max(0.0, t0 + f.down - time.time()))
            await asyncio.to_thread(self.cluster.start_node, target)
            for s in self.streams:
                await self.cluster.wait_stream_current(s, timeout=90)
            self.faults.append(FaultFact(f.kind, target, t0, time.time(), detail))

    async def _new_leader(self, stream: str, old: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                leader = await self.cluster.stream_leader(stream, timeout=5)
                if leader != old:
                    return leader
            except Exception:
                pass
            await asyncio.sleep(0.2)
        return "none"

    async def _heal(self) -> None:
        for p in self.pods:
            if p.paused_since is not None:
                p.resume()
        for p in [p for p in self.pods if not p.alive]:
            self.pods.remove(p)
            self.retired.append(p)
        while len(self.pods) < self.cfg.pods:
            await self._start_pod()
        for s in self.streams:
            await self.cluster.wait_stream_current(s, timeout=90)

    async def _quiesce(self) -> bool:
        """Until every acknowledged run is done and nothing is queued or claimed (or timeout)."""
        assert self.control is not None
        store = self.control.store
        pending = {s.run_id for s in self.submits if s.t_ack is not None}
        deadline = time.monotonic() + self.cfg.quiesce_timeout
        while time.monotonic() < deadline:
            for run_id in list(pending):
                try:
                    r = await store.load_run(run_id)
                except Exception:
                    continue
                if r is not None and r.is_done:
                    pending.discard(run_id)
            if not pending:
                counts = await store.count_all_by_status()
                if counts[DispatchStatus.QUEUED] == 0 and counts[DispatchStatus.CLAIMED] == 0:
                    return True
            await asyncio.sleep(1.0)
        return False

    async def _facts(self) -> Facts:
        assert self.control is not None
        store = self.control.store
        for s in self.streams:
            await self.cluster.wait_stream_current(s, timeout=90)
        runs: dict[str, RunRecord | None] = {}
        for s in self.submits:
            if s.run_id:
                runs[s.run_id] = await store.load_run(s.run_id)
        dispatches: dict[str, dict[str, Any]] = {}
        for thread in sorted({s.thread for s in self.submits}):
            state = await store.read_thread(thread)
            for d in state.dispatches.values():
                dispatches[d.dispatch_id] = {"status": d.status, "priority": d.priority, "created_at": d.created_at,
                                             "run": d.run_id, "attempt_count": d.attempt_count,
                                             "instance": d.dispatch_instance_id}
        journal = [json.loads(x) for x in self.journal.read_text().splitlines() if x.strip()] if self.journal.exists() else []
        return Facts(
            submits=self.submits, decides=self.decides, faults=self.faults,
            pods=[p.life for p in self.pods + self.retired], journal=journal, runs=runs, dispatches=dispatches,
            lease_ms=self.cfg.pod_settings.get("lease_ms", 3000),
        )


async def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    return await Chaos(cfg).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--pods", type=int, default=3)
    ap.add_argument("--load-seconds", type=float, default=None, help="submit window (default max(15, runs/30))")
    ap.add_argument("--faults", type=int, default=None, help="faults during the load (default one per ~5 s)")
    ap.add_argument("--kinds", default=",".join(FAULT_KINDS), help="fault kinds, comma-separated")
    ap.add_argument("--quiesce-timeout", type=float, default=240.0)
    ap.add_argument("--workdir", default=None, help="keep journal, logs and report here")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.randrange(1, 1_000_000)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not a.verbose:
        logging.getLogger("chaos").setLevel(logging.INFO)
    kinds = tuple(k for k in a.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        ap.error(f"--kinds: unknown {unknown or 'empty list'}; choose among {', '.join(FAULT_KINDS)}")
    cfg = ChaosConfig(
        runs=a.runs, threads=a.threads, seed=seed, pods=a.pods, load_seconds=a.load_seconds, faults=a.faults,
        kinds=kinds, quiesce_timeout=a.quiesce_timeout, workdir=a.workdir, keep_workdir=a.workdir is not None,
    )
    print(f"chaos: seed {seed}, {cfg.runs} runs over {cfg.threads} threads, {cfg.n_faults} faults in {cfg.load:.0f}s",
          flush=True)
    try:
        report = asyncio.run(run_chaos(cfg))
    except KeyboardInterrupt:
        return 2
    except Exception as exc:  # the run could not be carried out (cluster did not form, ...)
        log.exception("chaos run failed: %r (seed %d)", exc, seed)
        return 2
    print(report.table(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
