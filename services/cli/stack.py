"""The embedded stack: nats-server plus every service as its own process on this machine.

Used by `relayrl up`, `relayrl demo` and the end-to-end tests, so all three run the same
processes the same way. Each service logs to `<state_dir>/logs/<name>.log`; readiness is its
HTTP `/readyz` where it has one, else its "ready" log line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.cli.nats_server import NatsServer, free_port


@dataclass
class Service:
    name: str
    module: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    ready_url: str | None = None
    ready_line: str | None = None
    proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args], stdout=log, stderr=subprocess.STDOUT, env=env
        )

    def is_ready(self) -> bool:
        if self.ready_url:
            try:
                return httpx.get(self.ready_url, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False
        if self.ready_line:
            try:
                return self.ready_line.encode() in self.log_path.read_bytes()
            except FileNotFoundError:
                return False
        return True

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@dataclass
class StackConfig:
    state_dir: Path = Path(".relayrl")
    nats_url: str | None = None  # use this server instead of starting one
    gateway_port: int = 8000  # 0 = any free port
    inference_port: int = 0
    rollout_replicas: int = 1
    rollout_concurrency: int = 64
    rollout_ack_wait_s: float = 30.0
    inference_replicas: int = 1
    trainers: int = 1  # trainer processes; each claims one running run at a time
    trainer_device: str = "auto"
    # torch CPU threads of inference and trainer: together no more than the cores (oversubscribed
    # OpenMP threads spin against each other; measured several times slower on 2 cores).
    torch_threads: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))
    model: str = "tiny"
    database_url: str | None = None
    log_format: str = "json"
    extra_env: dict[str, str] = field(default_factory=dict)


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir.resolve()
        self.logs = self.state_dir / "logs"
        self.nats: NatsServer | None = None
        self.nats_url = config.nats_url or ""
        self.services: list[Service] = []
        self.gateway_url = ""
        self.inference_urls: list[str] = []

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = 180.0) -> Stack:
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.nats_url:
            self.nats = NatsServer(store_dir=self.state_dir / "nats").start(log_file=self.logs / "nats.log")
            self.nats_url = self.nats.url
        try:
            self._start_services(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.write_state()
        return self

    def _start_services(self, timeout_s: float) -> None:
        c = self.config
        for i in range(c.inference_replicas):
            port = c.inference_port + i if c.inference_port else free_port()
            url = f"http://127.0.0.1:{port}"
            self.inference_urls.append(url)
            self.add(
                f"inference-{i + 1}" if c.inference_replicas > 1 else "inference",
                "services.inference",
                ["--port", str(port), "--model", c.model, "--model-dir", str(self.state_dir / "models"),
                 "--threads", str(c.torch_threads)],  # fmt: skip
                ready_url=f"{url}/readyz",
            )
        # With no inference replica, workers run model-free agents only (e.g. `null`).
        store_args = ["--database-url", c.database_url or f"sqlite+aiosqlite:///{self.state_dir / 'relayrl.db'}"]
        self.add("store", "services.store", store_args, ready_line="store ready")
        # Store and inference first: gateway readiness needs the store; rollouts need inference.
        self._wait_ready(timeout_s)
        for i in range(c.rollout_replicas):
            self.add_rollout(f"rollout-{i + 1}")
        for i in range(c.trainers):
            self.add_trainer(f"trainer-{i + 1}" if c.trainers > 1 else "trainer")
        gw_port = c.gateway_port or free_port()
        self.gateway_url = f"http://127.0.0.1:{gw_port}"
        self.add("gateway", "services.gateway", ["--port", str(gw_port)], ready_url=f"{self.gateway_url}/readyz")
        self._wait_ready(timeout_s)

    def add(self, name: str, module: str, args: list[str], ready_url: str | None = None, ready_line: str | None = None) -> Service:
        env = {
            "NATS_URL": self.nats_url,
            "RELAYRL_LOG_FORMAT": self.config.log_format,
            "PYTHONUNBUFFERED": "1",
            **self.config.extra_env,
        }
        svc = Service(name, module, args, env, self.logs / f"{name}.log", ready_url, ready_line)
        svc.start()
        self.services.append(svc)
        return svc

    def add_rollout(self, name: str) -> Service:
        c = self.config
        args = [
            "--worker-id", name,
            "--inference-urls", ",".join(self.inference_urls),
            "--concurrency", str(c.rollout_concurrency),
            "--ack-wait-s", str(c.rollout_ack_wait_s),
        ]  # fmt: skip
        return self.add(name, "services.rollout", args, ready_line="rollout worker ready")

    def add_trainer(self, name: str) -> Service:
        args = [
            "--trainer-id", name,
            "--device", self.config.trainer_device,
            "--threads", str(self.config.torch_threads),
            "--model-dir", str(self.state_dir / "models"),
            "--checkpoint-dir", str(self.state_dir / "checkpoints"),
        ]  # fmt: skip
        return self.add(name, "services.trainer", args, ready_line="trainer ready")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.services)  # a service that died since its start is reported, not skipped
        while pending:
            for svc in list(pending):
                if not svc.alive:
                    raise RuntimeError(f"{svc.name} exited during start-up:\n{svc.tail()}")
                if svc.is_ready():
                    pending.remove(svc)
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise TimeoutError(f"not ready after {timeout_s}s: {names}\n" + "\n".join(s.tail(10) for s in pending))
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM in reverse start order (gateway first, NATS last) so each one drains."""
        for svc in reversed(self.services):
            svc.signal(signal.SIGTERM)
            if not svc.wait(timeout_s):
                svc.signal(signal.SIGKILL)
                svc.wait(5)
        if self.nats is not None:
            self.nats.stop()
        state = self.state_dir / "stack.json"
        if state.exists():
            state.unlink()

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def failed(self) -> list[Service]:
        return [s for s in self.services if not s.alive]

    # --- state file --------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        pids = {s.name: s.proc.pid for s in self.services if s.proc}
        if self.nats and self.nats.proc:
            pids["nats"] = self.nats.proc.pid
        return {
            "nats_url": self.nats_url,
            "gateway_url": self.gateway_url,
            "inference_urls": self.inference_urls,
            "pids": pids,
            "logs": str(self.logs),
        }

    def write_state(self) -> Path:
        path = self.state_dir / "stack.json"
        path.write_text(json.dumps(self.state(), indent=2))
        return path


def read_state(state_dir: Path = Path(".relayrl")) -> dict[str, object] | None:
    path = state_dir / "stack.json"
    return json.loads(path.read_text()) if path.exists() else None
