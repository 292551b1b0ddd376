"""Checking existing JetStream resources against the configuration we want."""

from __future__ import annotations

from typing import Any


def differences(have: Any, wanted: Any, fields: tuple[str, ...]) -> list[str]:
    """`field=have (want wanted)` for each field where an existing config differs."""
    return [
        f"{name}={getattr(have, name)!r} (want {getattr(wanted, name)!r})"
        for name in fields
        if getattr(have, name) != getattr(wanted, name)
    ]
