"""Does a pod's memory level off or leak? Runs a pod in this process (so its heap can be
inspected) while a separate load process submits bursts of runs, and prints after each burst
the resident memory, the allocated blocks and the live objects, then which object types grew.

    python -m benchmarks.memory [--bursts 10] [--runs 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import sys
from pathlib import Path

from service.app import start_pod
from service.config import Settings
from service.embedded import NatsServer

from .run import rss_mb

ROOT = Path(__file__).resolve().parent.parent

LOAD = """
import asyncio, sys
from benchmarks.run import Load, submit_burst

async def main(url, prefix, bursts, runs):
    async with Load(url, prefix) as load:
        for burst in range(bursts):
            await submit_burst(load, runs, 1000)
            await load.wait_all((burst + 1) * runs)
            print(burst, flush=True)
            await asyncio.sleep(3)  # let settles finish before the pod is inspected

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def main(bursts: int, runs: int) -> None:
    server = NatsServer().start()
    settings = Settings(prefix="mem", handler="benchmarks.noop:handle", concurrency=256, signal_batch=128)
    pod = await start_pod(settings, url=server.url)
    try:
        load = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LOAD, server.url, "mem", str(bursts), str(runs),
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        assert load.stdout is not None
        counts: list[collections.Counter[str]] = []
        while line := await load.stdout.readline():
            await asyncio.sleep(1)
            gc.collect()
            counts.append(collections.Counter(type(o).__name__ for o in gc.get_objects()))
            print(f"after {(int(line) + 1) * runs:>7} runs: rss {rss_mb():6.1f} MB, "
                  f"blocks {sys.getallocatedblocks():>8}, objects {sum(counts[-1].values()):>7}", flush=True)
        await load.wait()
        grown = counts[-1].copy()
        grown.subtract(counts[0])
        print("object types that grew most between the first and the last burst:")
        for name, n in grown.most_common(8):
            print(f"  {name:<24} +{n} ({counts[0][name]} → {counts[-1][name]})")
    finally:
        await pod.stop(drain_timeout_ms=2000)
        server.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--runs", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(main(args.bursts, args.runs))
