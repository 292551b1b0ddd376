"""The `mailbox` command as a subprocess (`python -m service ...`) against the session NATS
server: client commands against a pod started in this process, in both output modes, with
their exit codes; and `serve` itself (external NATS, embedded NATS reusing its data,
--print-config, configuration errors, graceful SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from service.app import Pod, start_pod
from service.handlers import PermanentError, RunContext, approval
from service.model import RunStatus

from .conftest import unique_prefix
from .test_api import fast_settings

pytestmark = pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning:nats.micro")

ROOT = Path(__file__).resolve().parent.parent


def cli_env(url: str | None, prefix: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBOX_")}
    if url:
        env["MAILBOX_NATS_URL"] = url
    if prefix:
        env["MAILBOX_PREFIX"] = prefix
    env["MAILBOX_METRICS_PORT"] = "0"  # any free port: tests run servers side by side
    env["MAILBOX_HEALTH_PORT"] = "0"
    env.update(extra)
    return env


async def mailbox(*args: str, env: dict[str, str], stdin: bytes | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """Run `python -m service ARGS`; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=str(ROOT),
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


class Script:
    """{"do": "block"} waits for `release`; {"do": "fail"} raises PermanentError until
    `healed`; text is streamed word by word and returned."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()
        self.healed = False

    async def __call__(self, run: RunContext) -> Any:
        do = run.input.get("do") if isinstance(run.input, dict) else None
        if do == "block":
            self.blocked.set()
            await self.release.wait()
        elif do == "fail" and not self.healed:
            raise PermanentError("broken for good")
        elif isinstance(run.input, str):
            for word in run.input.split():
                await run.emit("delta", word)
        return run.input


@asynccontextmanager
async def pod_and_env(nats_url: str, handler: Any, **overrides: Any) -> AsyncIterator[tuple[Pod, dict[str, str]]]:
    settings = fast_settings(unique_prefix("cli"), **overrides)
    pod = await start_pod(settings, url=nats_url, handler=handler)
    try:
        yield pod, cli_env(nats_url, settings.prefix)
    finally:
        await pod.stop(drain_timeout_ms=1000)


RUN_LINE = re.compile(r"^run (\S+) (queued|running) on thread (\S+) \(dispatch (\S+)\)")


async def until(check: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------- submit and watch


async def test_submit_then_watch_to_completion_human(nats_url):
    async with pod_and_env(nats_url, Script()) as (_, env):
        code, out, err = await mailbox("submit", "t1", "hello big world", env=env)
        assert code == 0, err
        m = RUN_LINE.match(out)
        assert m and m.group(3) == "t1", out
        run_id = m.group(1)
        code, out, err = await mailbox("watch", run_id, env=env)
        assert code == 0, err
        lines = out.splitlines()
        assert re.match(r"^\+0\.000s queued$", lines[0]), lines
        assert re.match(r"^\+\d+\.\d{3}s started \(attempt 1, pod pod-\w+\)$", lines[1]), lines
        assert [line.split(" ", 1)[1] for line in lines[2:]] == ["delta hello", "delta big", "delta world", "finished: hello big world"]


async def test_submit_then_watch_to_completion_json(nats_url):
    async with pod_and_env(nats_url, Script()) as (_, env):
        code, out, err = await mailbox("submit", "t1", '{"n": [1, 2]}', "--json", env=env)
        assert code == 0, err
        reply = json.loads(out)
        assert reply["thread_id"] == "t1" and reply["status"] in ("queued", "running")
        code, out, err = await mailbox("--json", "watch", reply["run_id"], env=env)
        assert code == 0, err
        events = [json.loads(line) for line in out.splitlines()]
        assert [e["kind"] for e in events] == ["queued", "started", "finished"]
        assert all(e["run_id"] == reply["run_id"] for e in events)
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert events[-1]["data"] == {"status": "done", "output": {"n": [1, 2]}}
        # resume a watch after a sequence
        code, out, _ = await mailbox("watch", reply["run_id"], "--after", str(events[0]["seq"]), "--json", env=env)
        assert [json.loads(line)["seq"] for line in out.splitlines()] == [e["seq"] for e in events[1:]]


async def test_submit_watch_and_wait_in_one_go(nats_url):
    async with pod_and_env(nats_url, Script()) as (_, env):
        code, out, err = await mailbox("submit", "t", "one two", "--watch", env=env)
        assert code == 0, err
        assert RUN_LINE.match(out) and out.rstrip().endswith("finished: one two")
        code, out, err = await mailbox("submit", "t", "42", "--wait", "--json", env=env)
        assert code == 0, err
        reply, final = map(json.loads, out.splitlines())
        assert final["run_id"] == reply["run_id"] and final["status"] == "done" and final["output"] == 42
        code, out, _ = await mailbox("submit", "t", "42", "--text", "--wait", env=env)
        assert code == 0 and re.search(r"^output\s+42$", out, re.M) and re.search(r"^status\s+done$", out, re.M)
        code, out, _ = await mailbox("submit", "t", "-", "--json", "--wait", env=env, stdin=b'{"from": "stdin"}\n')
        assert code == 0 and json.loads(out.splitlines()[1])["output"] == {"from": "stdin"}


async def test_get_list_and_stats(nats_url):
    async with pod_and_env(nats_url, Script()) as (pod, env):
        _, out, _ = await mailbox("submit", "t", "hi", "--meta", "team=a", "--priority", "3", "--json", "--wait", env=env)
        run_id = json.loads(out.splitlines()[0])["run_id"]
        code, out, _ = await mailbox("get", run_id, env=env)
        assert code == 0
        assert re.search(rf"^run\s+{run_id}$", out, re.M) and re.search(r"^status\s+done$", out, re.M)
        assert re.search(r'^metadata\s+\{"team":"a"\}$', out, re.M) and "dispatches:" in out
        code, out, _ = await mailbox("get", run_id, "--json", env=env)
        view = json.loads(out)
        assert view["priority"] == 3 and view["dispatches"][0]["status"] == "acked"
        code, out, _ = await mailbox("get", "--dispatch", view["dispatch_id"], "--json", env=env)
        assert code == 0 and json.loads(out)["run_id"] == run_id
        code, out, _ = await mailbox("list", "t", env=env)
        assert code == 0 and out.startswith(run_id) and "output: hi" in out
        code, out, _ = await mailbox("list", "t", "--dispatches", "--json", env=env)
        assert [d["run_id"] for d in json.loads(out)["dispatches"]] == [run_id]
        code, out, _ = await mailbox("list", "nobody", env=env)
        assert code == 0 and "nothing on thread nobody" in out
        code, out, _ = await mailbox("stats", env=env)
        assert code == 0 and re.search(r"^pods\s+1$", out, re.M) and re.search(r"^\s+acked\s+1$", out, re.M)
        code, out, _ = await mailbox("stats", "--json", env=env)
        assert json.loads(out) == {"depth": {"queued": 0, "claimed": 0, "acked": 1, "cancelled": 0, "superseded": 0,
                                             "dead_letter": 0}, "active_runs": 0, "pods": 1}


# ---------------------------------------------------------------------- cancel, interrupt


async def test_cancel_in_both_modes(nats_url):
    script = Script()
    async with pod_and_env(nats_url, script) as (pod, env):
        _, out, _ = await mailbox("submit", "t", '{"do": "block"}', "--json", env=env)
        active = json.loads(out)
        await asyncio.wait_for(script.blocked.wait(), 10)
        _, out, _ = await mailbox("submit", "t", "queued work", "--json", env=env)
        queued = json.loads(out)

        code, out, err = await mailbox("cancel", queued["run_id"], env=env)
        assert code == 0, err
        assert out.strip() == f"cancelled 1 queued dispatch(es): {queued['dispatch_id']}"
        code, out, _ = await mailbox("watch", queued["run_id"], env=env)
        assert code == 1 and "cancelled" in out.splitlines()[-2] and out.rstrip().endswith("did not finish: cancelled")

        code, out, err = await mailbox("cancel", "--thread", "t", "--json", env=env)
        assert code == 0, err
        assert json.loads(out) == {"signalled": [active["run_id"]]}
        code, out, _ = await mailbox("watch", active["run_id"], "--json", env=env)
        assert code == 1 and json.loads(out.splitlines()[-1])["kind"] == "cancelled"

        code, out, err = await mailbox("cancel", "--thread", "t", env=env)
        assert code == 0 and "nothing to cancel" in out
        code, _, err = await mailbox("cancel", env=env)
        assert code == 2 and "exactly one" in err


async def test_interrupt_in_both_modes(nats_url):
    script = Script()
    async with pod_and_env(nats_url, script) as (pod, env):
        _, out, _ = await mailbox("submit", "t", '{"do": "block"}', "--json", env=env)
        active = json.loads(out)
        await asyncio.wait_for(script.blocked.wait(), 10)
        _, out, _ = await mailbox("submit", "t", "stale", "--json", env=env)
        stale = json.loads(out)
        code, out, err = await mailbox("interrupt", "t", env=env)
        assert code == 0, err
        assert out.splitlines() == [
            "thread t is at epoch 1",
            f"superseded 1 queued dispatch(es): {stale['dispatch_id']}",
            f"active run {active['run_id']} cancelled",
        ]
        code, out, _ = await mailbox("watch", active["run_id"], env=env)
        assert code == 1 and "superseded" in out
        code, out, _ = await mailbox("interrupt", "t", "--json", env=env)
        assert code == 0 and json.loads(out) == {"new_dispatch_epoch": 2}
        code, out, err = await mailbox("interrupt", "no-such-thread", env=env)
        assert code == 3 and "has no runs" in err
        # submit with strategy interrupt replaces the work in one step
        code, out, _ = await mailbox("submit", "t", "new", "--strategy", "interrupt", "--wait", env=env)
        assert code == 0 and re.search(r"^output\s+new$", out, re.M)


# ---------------------------------------------------------------------- decide


async def test_decide_in_both_modes(nats_url):
    async with pod_and_env(nats_url, approval) as (pod, env):
        runs = []
        for _ in range(2):
            _, out, _ = await mailbox("submit", "t-" + str(len(runs)), '{"q": "ok?"}', "--json", env=env)
            runs.append(json.loads(out)["run_id"])

        async def waiting() -> bool:
            recs = [await pod.store.load_run(r) for r in runs]
            return all(r is not None and r.status == RunStatus.WAITING for r in recs)

        await until(waiting)
        code, out, _ = await mailbox("get", runs[0], env=env)
        assert re.search(r"^waiting\s+ticket 'approval' \(prompt: \{\"q\":\"ok\?\"\}\)$", out, re.M), out
        assert f"decide with: mailbox decide {runs[0]} approval" in out

        code, out, err = await mailbox("decide", runs[0], "approval", '{"approved": true}', env=env)
        assert code == 0, err
        assert out.strip() == f"decision delivered live to run {runs[0]}"
        code, out, err = await mailbox("decide", runs[1], "approval", "no", "--json", env=env)
        assert code == 0, err
        assert json.loads(out) == {"delivered": "live"}
        code, out, _ = await mailbox("watch", runs[0], env=env)
        assert code == 0 and "suspended: waiting for a decision on ticket 'approval'" in out
        assert out.rstrip().endswith('finished: {"approved":true,"decision":{"approved":true}}')
        code, out, _ = await mailbox("wait", runs[1], "--json", env=env)
        assert code == 0 and json.loads(out)["output"] == {"approved": "no", "decision": "no"}
        code, _, err = await mailbox("decide", runs[0], "approval", env=env)
        assert code == 4 and "is done" in err


# ---------------------------------------------------------------------- dead letters


async def test_dead_letter_list_and_replay_in_both_modes(nats_url):
    script = Script()
    async with pod_and_env(nats_url, script) as (pod, env):
        code, out, _ = await mailbox("submit", "t", '{"do": "fail"}', "--watch", env=env)
        assert code == 1
        assert re.search(r"dead-lettered after 1 attempt\(s\): broken for good$", out, re.M)
        run_id = RUN_LINE.match(out).group(1)
        dispatch_id = RUN_LINE.match(out).group(4)

        code, out, _ = await mailbox("dlq", "list", env=env)
        assert code == 0 and re.match(rf"^{dispatch_id}  thread t  run {run_id}  retry budget 0/5  ", out)
        assert "broken for good" in out and "mailbox dlq replay" in out
        code, out, _ = await mailbox("dlq", "list", "--json", env=env)
        assert [d["dispatch_id"] for d in json.loads(out)["dispatches"]] == [dispatch_id]

        script.healed = True
        code, out, err = await mailbox("dlq", "replay", dispatch_id, env=env)
        assert code == 0, err
        m = re.match(rf"^replayed: run {run_id} on thread t is queued again as dispatch (\S+)$", out.strip())
        assert m
        code, out, _ = await mailbox("wait", run_id, env=env)
        assert code == 0 and re.search(r"^status\s+done$", out, re.M)
        code, out, _ = await mailbox("dlq", "list", "--thread", "other", env=env)
        assert code == 0 and out.strip() == "no dead letters"
        # a second failure, replayed with --json
        script.healed = False
        _, out, _ = await mailbox("submit", "t2", '{"do": "fail"}', "--json", "--wait", env=env)
        failed = json.loads(out.splitlines()[0])
        script.healed = True
        code, out, _ = await mailbox("dlq", "replay", failed["dispatch_id"], "--json", env=env)
        replay = json.loads(out)
        assert code == 0 and replay["run_id"] == failed["run_id"] and replay["dispatch_id"] != failed["dispatch_id"]
        code, _, err = await mailbox("dlq", "replay", failed["dispatch_id"], env=env)
        assert code == 4 and "moved on" in err


# ---------------------------------------------------------------------- exit codes


async def test_exit_codes_scripts_can_rely_on(nats_url):
    script = Script()
    async with pod_and_env(nats_url, script) as (pod, env):
        code, _, err = await mailbox("get", "no-such-run", env=env)
        assert code == 3 and err.strip() == "error: run 'no-such-run' not found"
        code, _, err = await mailbox("get", "no-such-run", "--json", env=env)
        assert code == 3 and json.loads(err) == {"error": {"message": "run 'no-such-run' not found", "code": 404}}
        code, _, err = await mailbox("submit", "   ", "x", env=env)
        assert code == 2 and "thread_id must not be blank" in err and "(field: thread_id)" in err
        code, _, err = await mailbox("submit", "t", "--priority", "999", "--json", env=env)
        assert code == 2 and json.loads(err)["error"]["field"] == "priority"
        code, _, err = await mailbox("submit", "t", "--meta", "novalue", env=env)
        assert code == 2 and "KEY=VALUE" in err
        code, _, err = await mailbox("submit", env=env)  # missing THREAD
        assert code == 2 and "give the thread" in err
        code, out, err = await mailbox("submit", "--thread", "t-opt", "hello", "--json", env=env)
        assert code == 0 and json.loads(out)["thread_id"] == "t-opt", err
        code, _, err = await mailbox("frobnicate", env=env)
        assert code == 2
        _, out, _ = await mailbox("submit", "busy", '{"do": "block"}', "--json", env=env)
        await asyncio.wait_for(script.blocked.wait(), 10)
        code, _, err = await mailbox("submit", "busy", "x", "--strategy", "reject", env=env)
        assert code == 4 and "queued or active" in err
        code, out, _ = await mailbox("send", "--thread", "idle-thread", "hello", env=env)
        assert code == 4 and out.startswith("not delivered:")
        code, _, err = await mailbox("stats", env=cli_env("nats://127.0.0.1:1", "x"))
        assert code == 5 and "cannot connect to NATS" in err
        code, _, err = await mailbox("stats", "--prefix", unique_prefix("nobody"), "--timeout", "1", env=env)
        assert code == 5 and "no mailbox service answers" in err
        code, out, _ = await mailbox("--version", env=env)
        assert code == 0 and out.strip() == "mailbox 0.1.0"
        script.release.set()


async def test_help_texts_teach(nats_url):
    env = cli_env(None, None)
    code, out, _ = await mailbox("--help", env=env)
    assert code == 0
    for word in ("serve", "submit", "watch", "dlq", "exit codes", "MAILBOX_NATS_URL", "examples"):
        assert word in out
    code, out, _ = await mailbox("submit", "--help", env=env)
    assert code == 0 and "latest wins" in out and "--dedupe-key" in out and "--json" in out
    code, out, _ = await mailbox("dlq", "replay", "--help", env=env)
    assert code == 0 and "DISPATCH_ID" in out


# ---------------------------------------------------------------------- serve


async def read_line(stream: asyncio.StreamReader, timeout: float = 20) -> str:
    return (await asyncio.wait_for(stream.readline(), timeout)).decode()


@asynccontextmanager
async def serving(env: dict[str, str], *args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=str(ROOT),
    )
    try:
        assert proc.stdout is not None
        line = await read_line(proc.stdout)
        if not line:
            err = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"serve exited early: {err.decode()[-2000:]}")
        yield proc, line
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 20)


async def test_serve_against_an_external_nats_and_stop_gracefully(nats_url):
    prefix = unique_prefix("serve")
    env = cli_env(nats_url, prefix, MAILBOX_HANDLER="echo", MAILBOX_DRAIN_TIMEOUT_MS="2000")
    async with serving(env) as (proc, line):
        assert line.strip() == (
            f"mailbox 0.1.0 serving the API on {nats_url} with prefix '{prefix}' (subjects {prefix}.api.*); handler echo"
        )
        code, out, err = await mailbox("submit", "t", "served by a subprocess", "--watch", env=env)
        assert code == 0, err
        assert out.rstrip().endswith("finished: served by a subprocess")
        assert await stop(proc) == 0
    # nothing answers any more
    code, _, err = await mailbox("stats", "--timeout", "1", env=env)
    assert code == 5


async def test_serve_json_line_and_sigint(nats_url):
    prefix = unique_prefix("serve")
    env = cli_env(nats_url, prefix)
    async with serving(env, "--json") as (proc, line):
        doc = json.loads(line)
        metrics, health = doc.pop("metrics"), doc.pop("health")
        assert doc == {"event": "serving", "url": nats_url, "prefix": prefix, "version": "0.1.0", "embedded": False,
                       "handler": "echo"}
        assert metrics.startswith("http://127.0.0.1:") and metrics.endswith("/metrics")
        assert health.startswith("http://127.0.0.1:")
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_serve_print_config_masks_secrets_and_bad_config_exits_2(nats_url):
    env = cli_env("nats://user:hunter2@127.0.0.1:4222", "pc", MAILBOX_NATS_PASSWORD="hunter2", MAILBOX_CONCURRENCY="7")
    code, out, err = await mailbox("serve", "--print-config", env=env)
    assert code == 0, err
    assert "hunter2" not in out
    assert "MAILBOX_CONCURRENCY=7" in out.splitlines() and "MAILBOX_NATS_PASSWORD=****" in out.splitlines()
    assert "MAILBOX_NATS_URL=nats://****@127.0.0.1:4222" in out.splitlines()
    code, out, _ = await mailbox("serve", "--print-config", "--json", env=env)
    assert json.loads(out)["MAILBOX_PREFIX"] == "pc"

    code, out, err = await mailbox("serve", env=cli_env(nats_url, "pc", MAILBOX_CONCURRENCY="lots"))
    assert code == 2 and "MAILBOX_CONCURRENCY" in err and out == ""
    code, out, err = await mailbox("serve", env=cli_env(nats_url, "bad prefix!"))
    assert code == 2 and "MAILBOX_PREFIX" in err
    code, out, err = await mailbox("serve", env=cli_env(nats_url, "pc", MAILBOX_HANDLER="no_such_module:handler"))
    assert code == 2 and "no_such_module" in err


def port_open(url: str) -> bool:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


async def test_serve_with_an_embedded_nats_keeps_its_data_across_restarts(tmp_path):
    env = cli_env(None, "embedded", MAILBOX_DATA_DIR=str(tmp_path / "data"))
    async with serving(env) as (proc, line):
        m = re.search(r"serving the API on (nats://[\d.]+:\d+) with prefix 'embedded'", line)
        assert m and "embedded nats-server" in line, line
        url = m.group(1)
        client_env = cli_env(url, "embedded")
        code, out, err = await mailbox("submit", "t", "kept", "--json", "--wait", env=client_env)
        assert code == 0, err
        run_id = json.loads(out.splitlines()[0])["run_id"]
        assert await stop(proc) == 0
    assert not port_open(url)  # the embedded server was stopped too
    assert (tmp_path / "data" / "nats" / "jetstream").is_dir()

    async with serving(env) as (proc, line):
        url = re.search(r"on (nats://[\d.]+:\d+)", line).group(1)
        code, out, err = await mailbox("get", run_id, "--json", env=cli_env(url, "embedded"))
        assert code == 0, err
        assert json.loads(out)["output"] == "kept"
        assert await stop(proc) == 0
    assert not port_open(url)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


async def test_serve_guards_its_data_dir_and_cleans_up_after_a_killed_serve(tmp_path):
    env = cli_env(None, "guarded", MAILBOX_DATA_DIR=str(tmp_path / "data"))
    pid_file = tmp_path / "data" / "nats" / "nats-server.pid"
    orphan = 0
    try:
        async with serving(env) as (proc, line):
            url = re.search(r"on (nats://[\d.]+:\d+)", line).group(1)
            orphan, recorded_url = pid_file.read_text().split()
            orphan = int(orphan)
            assert recorded_url == url
            code, out, err = await mailbox("submit", "t", "survives", "--json", "--wait", env=cli_env(url, "guarded"))
            assert code == 0, err
            run_id = json.loads(out.splitlines()[0])["run_id"]
            # a second serve on the same data directory refuses: two servers must not share a store
            code, out, err = await mailbox("serve", env=env)
            assert code == 2 and "another `mailbox serve` runs on this data directory" in err and url in err
            proc.kill()  # SIGKILL: serve cannot stop its nats-server, which lives on
            await proc.wait()
        assert alive(orphan) and port_open(url)

        async with serving(env) as (proc, line):
            assert not alive(orphan)  # the orphan was stopped before a new server took the store
            url = re.search(r"on (nats://[\d.]+:\d+)", line).group(1)
            code, out, err = await mailbox("get", run_id, "--json", env=cli_env(url, "guarded"))
            assert code == 0 and json.loads(out)["output"] == "survives", err
            assert await stop(proc) == 0
        assert not port_open(url) and not pid_file.exists()
    finally:
        if orphan and alive(orphan):
            os.kill(orphan, signal.SIGKILL)
