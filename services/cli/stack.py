"""The embedded stack: nats-server plus every service as its own process on this machine.

Used by `relayrl up`, `relayrl demo` and the end-to-end tests, so all three run the same
processes the same way. Each service logs to `<state_dir>/logs/<name>.log`; readiness is its
HTTP `/readyz` where it has one, else its "ready" log line.

Once started, a supervisor thread restarts any process that exits on its own (a crash, an
OOM kill, `kill -9` from a shell), nats-server included (same port, same store dir), with
exponential backoff that resets after a stretch of healthy running. Each restart is counted,
reported through `on_event` (and `logs/supervisor.log`) and written to `stack.json`.
What the owner stops on purpose stays stopped: `Stack.stop()`, `Stack.stop_service()` and
`Service.signal()` with a terminating signal. `Stack.kill()` is a fault instead: the
supervisor brings the process back, after a chosen delay if one is given (chaos testing).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Coroutine, Protocol, TypeVar

import httpx
import nats

from services.cli.keyfile import API_KEY_FILE, ensure_api_key
from services.cli.nats_admin import init_topology, load_or_create_credentials
from services.cli.nats_server import NatsServer, free_port
from services.cli.secrets import ensure_secrets, service_env
from shared import nats_auth, retention, subjects
from shared.config import ServiceSettings

T = TypeVar("T")
NATS = "nats"  # the name the supervisor, stack.json and `Stack.kill` use for nats-server
# Signals that pause or resume a process rather than end it: sending one is not a stop.
_NOT_STOPPING = {signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP, 0}


@dataclass
class Supervision:
    """What the supervisor knows about one process: restart count, backoff, pending restart."""

    restarts: int = 0
    started_at: float = field(default_factory=time.monotonic)
    # Consecutive quick deaths: the backoff doubles with each, reset by a healthy stretch.
    streak: int = 0
    last_exit: int | None = None
    restart_at: float | None = None  # set when a death is noticed; the restart happens then
    delay_once: float | None = None  # a delay chosen by `Stack.kill` for the next restart only
    held: bool = False  # stopped on purpose: the supervisor leaves it down


class Supervised(Protocol):
    name: str
    sup: Supervision
    log_path: Path

    @property
    def alive(self) -> bool: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def returncode(self) -> int | None: ...
    def start(self) -> None: ...
    def send(self, sig: int) -> None: ...
    def wait(self, timeout_s: float) -> bool: ...
    def tail(self, lines: int = 30) -> str: ...


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
    sup: Supervision = field(default_factory=Supervision)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.sup.started_at = time.monotonic()

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

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def signal(self, sig: int) -> None:
        """The owner signals the process by hand: if it ends, the supervisor leaves it down."""
        if sig not in _NOT_STOPPING:
            self.sup.held = True
        self.send(sig)

    def send(self, sig: int) -> None:
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
        return _tail(self.log_path, lines)


@dataclass
class NatsProcess:
    """The stack's own nats-server under supervision: restarts keep its port and store dir."""

    server: NatsServer
    log_path: Path
    name: str = NATS
    sup: Supervision = field(default_factory=Supervision)

    def start(self) -> None:
        self.server.start(log_file=self.log_path)  # a set port and store dir are reused
        self.sup.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.server.running

    @property
    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc else None

    @property
    def returncode(self) -> int | None:
        return self.server.proc.poll() if self.server.proc else None

    def send(self, sig: int) -> None:
        if self.alive:
            assert self.server.proc is not None
            self.server.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> bool:
        if self.server.proc is None:
            return True
        try:
            self.server.proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


@dataclass
class StackConfig:
    state_dir: Path = Path(".relayrl")
    nats_url: str | None = None  # use this server instead of starting one
    nats_prof_port: int = 0  # the embedded nats-server's Go pprof endpoint (bench/soak.py); off when 0
    # The embedded nats-server's GOMEMLIMIT. Without one its RSS grew ~10 MiB/min through a
    # 30-minute run while it held ~3 MiB of messages (bench/soak.py): large deliveries
    # (weight chunks) leave their buffers in the server's message pools, and Go's GC, paced
    # by heap growth alone, collects less often as the heap grows. A soft limit makes it
    # collect (and return memory) before RSS passes it. Raise it for weights of many MB.
    nats_memory_limit_mb: int | None = 256
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
    # Supervision: restart what exits on its own, after backoff_s doubling up to backoff_max_s;
    # a process that ran healthy_after_s before dying starts again from backoff_s.
    supervise: bool = True
    backoff_s: float = 0.5
    backoff_max_s: float = retention.SUPERVISOR_BACKOFF_MAX_S  # the GROUPS/TASKS duplicate windows assume it
    healthy_after_s: float = 60.0
    supervise_every_s: float = 0.2
    # A service's log past this size is rotated (copied to .1, older to .2, then truncated in
    # place: the process keeps its append-mode descriptor); 0 never rotates.
    max_log_mb: float = 64.0
    keep_logs: int = 2


class Stack:
    def __init__(self, config: StackConfig, on_event: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.state_dir = config.state_dir.resolve()
        self.logs = self.state_dir / "logs"
        self.nats: NatsServer | None = None
        self.nats_proc: NatsProcess | None = None
        self.nats_url = config.nats_url or ""
        # user -> password of the embedded nats-server's users (shared/nats_auth.py); None with an
        # external server (NATS_URL), whose credentials come from the environment.
        self.nats_credentials: dict[str, str] | None = None
        # The inference token and weights key (services/cli/secrets.py): loaded or generated at start.
        self.secrets: dict[str, str] = {}
        self.services: list[Service] = []
        self.gateway_url = ""
        # The admin API key of `<state_dir>/api_key` (services/cli/keyfile.py), and whether this
        # start made it (then `relayrl up` prints it, once).
        self.api_key = ""
        self.api_key_created = False
        self.inference_urls: list[str] = []
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []  # every exit and restart the supervisor saw
        # One lock for every start, signal and state write: the supervisor thread and the
        # owner (up loop, tests, chaos) act on the same processes.
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = 180.0) -> Stack:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.secrets = ensure_secrets(self.state_dir)
        self.api_key, self.api_key_created = ensure_api_key(self.state_dir)
        if not self.nats_url:
            self.nats_credentials = load_or_create_credentials(self.state_dir)
            self.nats = NatsServer(
                store_dir=self.state_dir / "nats",
                prof_port=self.config.nats_prof_port,
                memory_limit_mb=self.config.nats_memory_limit_mb,
                authorization=nats_auth.authorization_block(self.nats_credentials),
            )
            self.nats_proc = NatsProcess(self.nats, self.logs / "nats.log")
            self.nats_proc.start()
            self.nats_url = self.nats.url
        try:
            self.init_topology()
            self._start_services(timeout_s)
        except BaseException:
            self.stop()
            raise
        if self.config.supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="relayrl-supervisor", daemon=True)
            self._supervisor.start()
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
        rollouts = [self.add_rollout(f"rollout-{i + 1}") for i in range(c.rollout_replicas)]
        for i in range(c.trainers):
            self.add_trainer(f"trainer-{i + 1}" if c.trainers > 1 else "trainer")
        # The gateway refuses runs for agents no worker has registered, and caches what it read
        # for a moment: start it once the workers' agents are in the KV, or a run created right
        # after start-up (`relayrl demo`, tests) can be refused as naming an unknown agent.
        self._wait_ready(timeout_s, rollouts)
        if rollouts:
            self._wait_agents_registered(timeout_s)
        gw_port = c.gateway_port or free_port()
        self.gateway_url = f"http://127.0.0.1:{gw_port}"
        # The gateway installs the stack's admin key in the store at start (hashed); /readyz waits for it.
        gw_args = ["--port", str(gw_port), "--bootstrap-key-file", str(self.state_dir / API_KEY_FILE)]
        self.add("gateway", "services.gateway", gw_args, ready_url=f"{self.gateway_url}/readyz")
        self._wait_ready(timeout_s)

    def admin_settings(self) -> ServiceSettings:
        """Settings that log in as the NATS admin (the environment's credentials with an external server)."""
        if self.nats_credentials is None:
            return ServiceSettings(nats_url=self.nats_url)
        return ServiceSettings(
            nats_url=self.nats_url, nats_user=nats_auth.ADMIN, nats_password=self.nats_credentials[nats_auth.ADMIN]
        )

    @property
    def admin_url(self) -> str:
        """The NATS URL(s) with the admin's credentials in them, for operator tools, benches and
        tests that talk to NATS directly (never passed to a service, never logged)."""
        if self.nats_credentials is None:
            return self.nats_url
        auth = f"{nats_auth.ADMIN}:{self.nats_credentials[nats_auth.ADMIN]}@"
        return ",".join(u.replace("nats://", f"nats://{auth}", 1) for u in self.nats_url.split(","))

    def init_topology(self, timeout_s: float = 60.0) -> list[str]:
        """`relayrl init` against this stack's server: the one step that creates streams and buckets."""
        return _run_sync(init_topology(self.admin_settings(), timeout_s))

    def add(self, name: str, module: str, args: list[str], ready_url: str | None = None, ready_line: str | None = None) -> Service:
        env = {
            "NATS_URL": self.nats_url,
            "RELAYRL_LOG_FORMAT": self.config.log_format,
            "PYTHONUNBUFFERED": "1",
            **service_env(module, self.secrets),  # only the secrets this service's role uses
            **self.config.extra_env,
        }
        user = module.removeprefix("services.")
        if self.nats_credentials is not None and user in nats_auth.SERVICES:
            # Each service logs in as its own NATS user and gets no other user's password
            # (a process that is not a relayrl service gets none).
            env.update(nats_auth.user_env(user, self.nats_credentials[user]))
        svc = Service(name, module, args, env, self.logs / f"{name}.log", ready_url, ready_line)
        with self._lock:
            svc.start()
            self.services.append(svc)
            if self._supervisor is not None:
                self.write_state()
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

    def _wait_agents_registered(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not _run_sync(_agents_registered(self.admin_settings())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no rollout worker registered its agents within {timeout_s}s")
            time.sleep(0.1)

    def _wait_ready(self, timeout_s: float, services: list[Service] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        # A service that died since its start is reported, not skipped.
        pending = list(self.services if services is None else services)
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
        self._stopping.set()  # first: nothing stopped from here on is restarted
        if self._supervisor is not None:
            self._supervisor.join(timeout=30)
        with self._lock:
            for svc in reversed(self.services):
                svc.sup.held = True
                svc.send(signal.SIGTERM)
                svc.send(signal.SIGCONT)  # a paused (SIGSTOPped) process handles the SIGTERM too
                if not svc.wait(timeout_s):
                    svc.send(signal.SIGKILL)
                    svc.wait(5)
            if self.nats_proc is not None:
                self.nats_proc.sup.held = True
                # A stopped (SIGSTOPped) server would ignore SIGTERM.
                self.nats_proc.send(signal.SIGCONT)
                self.nats_proc.server.stop()
            state = self.state_dir / "stack.json"
            if state.exists():
                state.unlink()

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def process(self, name: str) -> Supervised:
        """A service, or `nats` for the nats-server this stack started."""
        if name == NATS:
            if self.nats_proc is None:
                raise KeyError("this stack uses an external NATS server (NATS_URL); it cannot kill it")
            return self.nats_proc
        return self.service(name)

    def processes(self) -> list[Supervised]:
        return ([self.nats_proc] if self.nats_proc else []) + list(self.services)

    def failed(self) -> list[Service]:
        return [s for s in self.services if not s.alive]

    # --- faults and manual control (chaos, tests) -----------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL, restart_after_s: float | None = None) -> int | None:
        """Signal a process as a fault would: if it dies, the supervisor restarts it.

        `restart_after_s` overrides the backoff for this one restart ("restarted 2 s later").
        Returns the pid signalled (None if it was not running).
        """
        with self._lock:
            proc = self.process(name)
            proc.sup.held = False
            proc.sup.delay_once = restart_after_s
            pid = proc.pid if proc.alive else None
            proc.send(sig)
        if sig == signal.SIGKILL and pid is not None:
            proc.wait(10)  # reaped before we return, so `alive` is false right away
        return pid

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Stop a process on purpose (it stays down until `start_service`); SIGKILL if it hangs."""
        with self._lock:
            proc = self.process(name)
            proc.sup.held = True
            proc.sup.restart_at = None
            proc.send(signal.SIGCONT)  # a paused process would never handle the SIGTERM
            proc.send(sig)
        if not proc.wait(timeout_s):
            proc.send(signal.SIGKILL)
            proc.wait(10)
        proc.sup.last_exit = proc.returncode
        self._event("stopped", proc, f"{name} stopped on request ({_exit_text(proc.sup.last_exit)})")
        self.write_state()

    def start_service(self, name: str) -> None:
        """Start a process again now (after `stop_service`, or to skip a pending backoff)."""
        with self._lock:
            proc = self.process(name)
            proc.sup.held = False
            if not proc.alive:
                self._restart(proc, reason="on request")

    # --- supervision -------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping.wait(self.config.supervise_every_s):
            with self._lock:
                if self._stopping.is_set():
                    return
                for proc in self.processes():
                    try:
                        self._check(proc)
                    except Exception as exc:  # noqa: BLE001 - one bad restart must not end supervision
                        proc.sup.restart_at = time.monotonic() + self._backoff(proc)
                        self._event("restart_failed", proc, f"{proc.name} failed to start: {exc!r}")
                    if self.config.max_log_mb:
                        rotate_log(proc.log_path, int(self.config.max_log_mb * 2**20), self.config.keep_logs)

    def _check(self, proc: Supervised) -> None:
        sup = proc.sup
        now = time.monotonic()
        if proc.alive:
            if sup.streak and now - sup.started_at >= self.config.healthy_after_s:
                sup.streak = 0
            return
        if sup.held:
            return
        if sup.restart_at is None:  # a death we have not seen yet
            sup.last_exit = proc.returncode
            if now - sup.started_at >= self.config.healthy_after_s:
                sup.streak = 0
            delay = sup.delay_once if sup.delay_once is not None else self._backoff(proc)
            sup.delay_once = None
            sup.restart_at = now + delay
            self._event("exited", proc, f"{proc.name} exited ({_exit_text(sup.last_exit)}); restart in {delay:.1f}s")
            self.write_state()
        elif now >= sup.restart_at:
            self._restart(proc, reason=f"after exit {_exit_text(sup.last_exit)}")

    def _backoff(self, proc: Supervised) -> float:
        return min(self.config.backoff_max_s, self.config.backoff_s * 2 ** proc.sup.streak)

    def _restart(self, proc: Supervised, reason: str) -> None:
        sup = proc.sup
        sup.restart_at = None
        sup.streak += 1
        sup.restarts += 1
        try:  # a marker in its log, so the lines before and after a restart are told apart
            with open(proc.log_path, "a") as f:
                f.write(f"----- relayrl supervisor: restart #{sup.restarts} of {proc.name} ({reason}) -----\n")
        except OSError:
            pass
        proc.start()
        self._event("restarted", proc, f"{proc.name} restarted ({reason}), restart #{sup.restarts}, pid {proc.pid}")
        if proc is self.nats_proc:
            # A server that lost its store dir has no streams; services wait for the admin step.
            try:
                missing = self.init_topology(timeout_s=30.0)
            except Exception as exc:  # noqa: BLE001 - the services keep waiting; reported, retried on the next restart
                self._event("init_failed", proc, f"relayrl init after the nats restart failed: {exc!r}")
            else:
                if missing:
                    self._event("initialized", proc, f"relayrl init re-created {', '.join(missing)}")
        self.write_state()

    def _event(self, kind: str, proc: Supervised, text: str) -> None:
        event = {"at": time.time(), "kind": kind, "service": proc.name, "exit": proc.sup.last_exit,
                 "restarts": proc.sup.restarts, "pid": proc.pid, "text": text}  # fmt: skip
        self.events.append(event)
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            with open(self.logs / "supervisor.log", "a") as f:
                f.write(json.dumps(event) + "\n")
        except OSError:
            pass  # reporting must never stop supervision
        if self.on_event is not None:
            self.on_event(text)

    # --- state file --------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        with self._lock:
            procs = self.processes()
            return {
                "nats_url": self.nats_url,
                "gateway_url": self.gateway_url,
                "inference_urls": self.inference_urls,
                "pids": {p.name: p.pid for p in procs if p.pid is not None},
                "services": {
                    p.name: {
                        "pid": p.pid,
                        "alive": p.alive,
                        "restarts": p.sup.restarts,
                        "last_exit": p.sup.last_exit,
                        "held": p.sup.held,
                        "log": str(p.log_path),
                    }
                    for p in procs
                },
                "supervisor_pid": os.getpid() if self._supervisor is not None else None,
                "logs": str(self.logs),
                "updated_at": time.time(),
            }

    def write_state(self) -> Path:
        """Rewrite stack.json atomically: a reader never sees half a file."""
        path = self.state_dir / "stack.json"
        if self._stopping.is_set():
            return path
        tmp = path.with_name(f".stack.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        os.replace(tmp, path)
        return path


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, also when called inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:  # a running loop (an async caller): use another thread
        return pool.submit(asyncio.run, coro).result()


def rotate_log(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate `path` when it is past `max_bytes`: `.1` .. `.keep` shift up, the current content
    is copied to `.1`, then the file is truncated in place. Copy-then-truncate because the
    service writes through an append-mode descriptor it keeps (a rename would leave it writing
    to the rotated file); lines written between the copy and the truncate are lost."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
        for i in range(keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{i + 1}"))
        if keep > 0:
            shutil.copyfile(path, path.with_name(f"{path.name}.1"))
        os.truncate(path, 0)
    except OSError:  # a log that vanished or a full disk: try again next round
        return False
    return True


async def _agents_registered(settings: ServiceSettings) -> bool:
    """Whether any rollout worker has put its agents into the agents KV yet."""
    password = settings.nats_password.get_secret_value() if settings.nats_password else None
    try:
        nc = await nats.connect(
            settings.nats_url, user=settings.nats_user, password=password, connect_timeout=2,
            allow_reconnect=False, max_reconnect_attempts=0,
        )
    except Exception:  # noqa: BLE001 - not reachable yet: not registered
        return False
    try:
        kv = await nc.jetstream().key_value(subjects.KV_AGENTS)
        return bool(await asyncio.wait_for(kv.keys(), 5))
    except Exception:  # noqa: BLE001 - no bucket or no keys yet
        return False
    finally:
        await nc.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit ?"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def read_state(state_dir: Path = Path(".relayrl")) -> dict[str, object] | None:
    path = state_dir / "stack.json"
    return json.loads(path.read_text()) if path.exists() else None
