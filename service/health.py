"""`/healthz`, `/readyz` and `/metrics` over a minimal asyncio HTTP server.

- `/healthz`: the process is alive (the event loop answers).
- `/readyz`: NATS connected, streams and bucket verified, worker loop running.
- `/metrics`: Prometheus exposition (served on the metrics port).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("mailbox.http")

Route = Callable[[], Awaitable[tuple[int, str, bytes]]]


class HttpEndpoints:
    """A tiny GET-only HTTP/1.1 server: routes map a path to (status, content type, body)."""

    def __init__(self, routes: dict[str, Route], host: str = "0.0.0.0", port: int = 0) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> HttpEndpoints:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = request.split(b" ", 2)
            path = parts[1].decode(errors="replace").split("?", 1)[0] if len(parts) > 1 else "/"
            route = self.routes.get(path)
            if parts[0] != b"GET":
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif route is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            else:
                status, ctype, body = await route()
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}.get(status, "")
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("event=http_error")
        finally:
            writer.close()


def text(status: int, body: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", body.encode()
