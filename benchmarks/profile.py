"""Where the service's CPU goes under the throughput burst: py-spy samples the service
process while the load submits, then the top functions by own time and by inclusive time
are printed (and the raw collapsed stacks kept for flame graphs).

    python -m benchmarks.profile [--runs 20000] [--out /tmp/mailbox.prof.txt]

Needs py-spy (the `bench` extra) and permission to ptrace the service (a child process).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from service.embedded import NatsServer

from .run import Load, Service, submit_burst


def top_functions(collapsed: str, n: int = 25) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(own, inclusive) shares of samples per function, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")" if " (" in f else f
                  for f in stack.split(";")]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    share = lambda c: [(f, 100 * s / total) for f, s in c.most_common(n)]  # noqa: E731
    return share(own), share(inclusive)


async def main(runs: int, out: Path) -> None:
    server = NatsServer().start()
    svc = Service(server.url, f"bp{random.randrange(10**6)}")
    try:
        async with Load(server.url, svc.prefix) as load:
            spy = subprocess.Popen(
                [str(Path(sys.prefix) / "bin" / "py-spy"), "record", "--pid", str(svc.proc.pid),
                 "--format", "raw", "--rate", "200", "--output", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            await asyncio.sleep(1.0)  # py-spy attaches
            await submit_burst(load, runs, 1000)
            await load.wait_all(runs)
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            _, err = spy.communicate(timeout=60)
            if not out.exists():
                raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
    finally:
        svc.stop()
        server.cleanup()
    own, inclusive = top_functions(out.read_text())
    print(f"{runs} runs; samples in {out}\n\nown time:")
    for f, p in own:
        print(f"  {p:5.1f}%  {f}")
    print("\ninclusive time:")
    for f, p in inclusive:
        print(f"  {p:5.1f}%  {f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mailbox.prof.txt"))
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.out))
