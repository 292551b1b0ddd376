"""Did a change make a scenario faster? Runs one `benchmarks.run --only` scenario alternately
on another revision (checked out in a temporary git worktree) and on this tree, pair after
pair, and prints each pair and the means.

    python -m benchmarks.ab BASE [--scenario throughput] [--pairs 3]

Alternating matters on a shared machine: its speed drifts by ±15% over minutes, so two
results taken ten minutes apart compare the machine, not the code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# the figures worth comparing per scenario (higher is better for the first of each list)
FIGURES = {
    "throughput": ["runs_per_s", "cpu_us_per_run", "start_p99_ms"],
    "idle": ["start_p50_ms", "start_p99_ms"],
    "history": ["claim_p50_ms", "submit_p50_ms"],
    "hot": ["others_start_p99_ms", "others_p99_ratio"],
    "soak": ["growth_pct"],
    "two_pods": ["runs_per_s", "cpu_us_per_run", "nats_requests_per_run"],
    "waiting_handler": ["runs_per_s", "cpu_us_per_run", "start_p99_ms"],
}


def run_scenario(tree: Path, scenario: str) -> dict[str, Any]:
    """One run of the scenario with the code of `tree` (the service process starts from there)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", scenario],
                         cwd=tree, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])[scenario]


def figures(result: Any, names: list[str]) -> dict[str, float]:
    """The named figures, from a result or (for paired scenarios, and history's levels) its
    last element; for the hot-thread pair also the ratio of its p99s (with / without)."""
    if isinstance(result, list):
        if len(result) == 2 and all("others_start_p99_ms" in r for r in result):
            ratio = result[1]["others_start_p99_ms"] / result[0]["others_start_p99_ms"]
            result = {**result[-1], "others_p99_ratio": ratio}
        else:
            result = result[-1]
    return {n: float(result[n]) for n in names if n in result}


def main(base: str, scenario: str, pairs: int) -> None:
    names = FIGURES[scenario]
    rows: list[tuple[dict[str, float], dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="mailbox-ab-") as tmp:
        old = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(old), base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for n in range(pairs):
                a = figures(run_scenario(old, scenario), names)
                b = figures(run_scenario(ROOT, scenario), names)
                rows.append((a, b))
                print(f"pair {n + 1}: " + ", ".join(f"{k} {a[k]:.1f} -> {b[k]:.1f}" for k in a), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False,
                           capture_output=True)
    print(f"\nmeans over {pairs} pairs ({base} -> this tree):")
    for k in names:
        if all(k in a for a, _ in rows):
            before = statistics.mean(a[k] for a, _ in rows)
            after = statistics.mean(b[k] for _, b in rows)
            print(f"  {k:20} {before:10.1f} -> {after:10.1f}  ({100 * (after - before) / before:+.1f}%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the revision to compare with (a commit, branch or tag)")
    parser.add_argument("--scenario", choices=sorted(FIGURES), default="throughput")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    main(args.base, args.scenario, args.pairs)
