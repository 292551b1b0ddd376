"""The service process's allocator and collector set-up (service/tuning.py)."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys
import weakref

import pytest

from service.tuning import fix_mmap_threshold, freeze_startup_objects, raise_young_threshold

# In a fresh process: free a 1 MiB block (glibc then raises its threshold to 1 MiB), allocate
# 200 KB, and print whether that block got a mapping of its own.
PROBE = """
import ctypes, sys
from service.tuning import fix_mmap_threshold, freeze_startup_objects
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
big = bytearray(1 << 20)
del big
before = libc.mallinfo2().hblkhd
block = bytearray(200_000)
print(libc.mallinfo2().hblkhd - before >= 200_000)
"""


def own_mapping(mode: str) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_big_blocks_keep_their_own_mappings_once_the_threshold_is_fixed() -> None:
    assert not own_mapping("default")  # glibc adapted its threshold: the block is in the heap
    assert own_mapping("fixed")


def test_an_operator_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert not fix_mmap_threshold()


def test_objects_alive_at_startup_are_frozen_and_garbage_is_not() -> None:
    class Node:
        pass

    kept, cycle = Node(), Node()
    cycle.self = cycle  # garbage only the collector can free
    gone = weakref.ref(cycle)
    del cycle
    try:
        assert freeze_startup_objects() > 0
        assert gone() is None
        assert not any(o is kept for o in gc.get_objects())  # frozen: no collection walks it
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())


def test_the_young_generation_waits_for_more_objects_and_the_older_ones_keep_theirs() -> None:
    before = gc.get_threshold()
    try:
        assert raise_young_threshold(12_345) == before[0]
        assert gc.get_threshold() == (12_345, before[1], before[2])
    finally:
        gc.set_threshold(*before)
