"""A pod in its own OS process, for tests that SIGKILL or SIGTERM one.

    python -m tests.pod_process <nats_url> <prefix> <journal> [key=value settings...]

The handler appends `{"event": "start"|"end", "run", "thread", "attempt", "pod", "t"}` JSON
lines to <journal> (O_APPEND, one write per line, so concurrent pods never interleave) and
sleeps `input["sleep"]` seconds (default 0); `input["fail"] = "transient"|"permanent"` makes
it raise; `input["hang"]` makes it sleep for an hour. SIGTERM drains gracefully, exit 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

from service.app import start_pod
from service.handlers import PermanentError, RunContext, TransientError

from .pods import fast_settings


def main() -> None:
    url, prefix, journal, *rest = sys.argv[1:]
    overrides = {k: int(v) for k, v in (a.split("=", 1) for a in rest)}
    pod_name = f"proc{os.getpid()}"
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(event: str, run: RunContext) -> None:
        line = {"event": event, "run": run.run_id, "thread": run.thread_id, "attempt": run.attempt,
                "pod": pod_name, "t": time.time()}
        os.write(fd, (json.dumps(line) + "\n").encode())

    async def handler(run: RunContext):
        note("start", run)
        spec = run.input if isinstance(run.input, dict) else {}
        if spec.get("hang"):
            await asyncio.sleep(3600)
        await asyncio.sleep(float(spec.get("sleep", 0)))
        if spec.get("fail") == "transient" and run.attempt == 1:
            raise TransientError("injected")
        if spec.get("fail") == "permanent":
            raise PermanentError("injected")
        note("end", run)
        return spec.get("out", "ok")

    async def run() -> None:
        pod = await start_pod(fast_settings(prefix, **overrides), url=url, handler=handler, consumer_id=pod_name)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await pod.stop()

    asyncio.run(run())


if __name__ == "__main__":
    main()
