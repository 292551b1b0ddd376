"""Dispatch stores: one contract (`base.ThreadStore`), two implementations."""

from .base import ThreadStore as DispatchStore
from .memory import MemoryDispatchStore

__all__ = ["DispatchStore", "MemoryDispatchStore", "NatsDispatchStore"]


def __getattr__(name: str):  # the NATS store imports nats-py; load it on first use
    if name == "NatsDispatchStore":
        from .nats import NatsDispatchStore

        return NatsDispatchStore
    raise AttributeError(name)
