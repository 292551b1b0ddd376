"""How the `mailbox serve` process sets up its allocator and its garbage collector (the
library and the tests leave both alone): a fixed mmap threshold, the start-up objects frozen,
and a larger young generation.

glibc's malloc is told to keep big blocks out of its heap. It raises its mmap threshold each
time a big block is freed (up to 32 MiB on 64-bit), so later big blocks (socket reads, dict
tables, a sweep's pages) come from the main heap, which then fragments: over a 100,000-run
soak the service's resident memory kept rising by ~10% after warm-up while its live objects
stayed flat. A fixed threshold keeps such blocks in mappings of their own, unmapped when
freed: the soak's growth halved, throughput unchanged (docs/performance.md). Nothing to do
off glibc, or when the operator set the threshold through glibc's own
`MALLOC_MMAP_THRESHOLD_`.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform

MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold (which also stops it adapting); False when not applied."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def freeze_startup_objects() -> int:
    """Move every object alive now (modules, functions, settings, clients) out of the
    collector's reach; returns how many. Call once the pod has started.

    The garbage collector took 15–18% of the service's CPU under load, and every full
    collection walked these objects again although they live as long as the process:
    frozen, they are never traversed (throughput +5% and +6%, CPU per run −7% and −6%,
    in two A/B runs of three pairs; the hot-thread p99 unchanged; docs/performance.md)."""
    gc.collect()  # what start-up left behind is freed, not frozen
    gc.freeze()
    return gc.get_freeze_count()


YOUNG_THRESHOLD = 20_000


def raise_young_threshold(threshold: int = YOUNG_THRESHOLD) -> int:
    """Let the collector's youngest generation grow to `threshold` objects before a
    collection (Python's default is 2,000); returns the threshold it had.

    A busy pod holds ~100 tracked objects per run in flight (futures, messages, frames): at
    256 runs in flight, every young collection found thousands of them alive, walked them and
    promoted them, to walk them again in the older generations. With runs that leave no
    cycles behind, nearly all of them die by reference counting before a collection at this
    threshold sees them (docs/performance.md)."""
    young, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)
    return young
