"""A dict that keeps only its most recently written entries: the pod's memories (its last
commits, the threads of ids, the dispatches it completed) must not grow with traffic."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Bounded(OrderedDict[K, V]):
    """Insertion-ordered; `put` makes an entry the newest and drops the oldest past `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: K, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)
