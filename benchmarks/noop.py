"""The benchmark's handler: does nothing, returns nothing."""

from service.handlers import RunContext


async def handle(run: RunContext) -> None:
    return None
