"""The benchmark's handlers: they do nothing and return nothing. `handle` returns without
waiting; `handle_waiting` waits once (one loop turn), as a handler that awaits I/O does."""

import asyncio

from service.handlers import RunContext


async def handle(run: RunContext) -> None:
    return None


async def handle_waiting(run: RunContext) -> None:
    await asyncio.sleep(0)
