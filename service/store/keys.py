"""Key and subject encoding (DESIGN.md §2).

`H(x)` = "h" + lowercase hex of the UTF-8 bytes of x, so user ids can never inject `.`,
`*`, `>` or spaces into a NATS subject or KV key, and the mapping is reversible.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4096)
def H(value: str) -> str:
    # cached: a run's ids are encoded into a dozen keys and subjects
    return "h" + value.encode().hex()


def unH(token: str) -> str:
    if not token.startswith("h"):
        raise ValueError(f"not an encoded id: {token!r}")
    return bytes.fromhex(token[1:]).decode()


def bucket_name(prefix: str) -> str:
    return f"{prefix}-state"


def stream_of_bucket(bucket: str) -> str:
    return f"KV_{bucket}"


def thread_prefix(thread_id: str) -> str:
    """Key prefix of everything stored under a thread (its subtree)."""
    return f"t.{H(thread_id)}"


def epoch_key(thread_id: str) -> str:
    return f"{thread_prefix(thread_id)}.epoch"


def dispatch_key(thread_id: str, dispatch_id: str) -> str:
    return f"{thread_prefix(thread_id)}.d.{H(dispatch_id)}"


def run_key(thread_id: str, run_id: str) -> str:
    """A run record: beside its thread's queue state, not inside it (no claim reads runs)."""
    return f"{runs_prefix(thread_id)}.{H(run_id)}"


def runs_prefix(thread_id: str) -> str:
    return f"r.{H(thread_id)}"


def dispatch_alias_key(dispatch_id: str) -> str:
    return f"id.{H(dispatch_id)}"


def run_alias_key(run_id: str) -> str:
    return f"run.{H(run_id)}"


def signal_subject(prefix: str, thread_id: str, dispatch_id: str) -> str:
    return f"{prefix}.signal.{H(thread_id)}.{H(dispatch_id)}"


def events_subject(prefix: str, thread_id: str, run_id: str) -> str:
    return f"{prefix}.events.{H(thread_id)}.{H(run_id)}"


def live_thread_subject(prefix: str, thread_id: str) -> str:
    return f"{prefix}.live.{H(thread_id)}"


def live_run_subject(prefix: str, run_id: str) -> str:
    return f"{prefix}.live.run.{H(run_id)}"
