"""Backoff arithmetic (pure)."""

from __future__ import annotations


def retry_delay_ms(attempt_count: int, base_ms: int, cap_ms: int) -> int:
    """Delay before retrying a dispatch that failed transiently, from its attempt count
    *before* this failure: base · 2^min(max(n-1, 0), 6), capped. Defaults give 250, 250,
    500, 1000, 2000 ms (spec/worker-manager.md §3.2)."""
    return min(base_ms * 2 ** min(max(attempt_count - 1, 0), 6), cap_ms)
