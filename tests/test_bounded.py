"""The pod's bounded memories (service/bounded.py)."""

from __future__ import annotations

from service.bounded import Bounded


def test_keeps_the_most_recently_written_entries() -> None:
    memory: Bounded[str, int] = Bounded(3)
    for i, key in enumerate("abcd"):
        memory.put(key, i)
    assert list(memory) == ["b", "c", "d"]
    memory.put("b", 10)  # rewritten: the newest now
    memory.put("e", 4)
    assert list(memory.items()) == [("d", 3), ("b", 10), ("e", 4)]
