"""PolicyWatcher: keeps an inference replica on each run's latest weights, and never mixes runs.

It watches the KV `relayrl-policy` and streams each needed version from the object store,
checks size and sha256, converts the tensors to the engine's device and dtype in a worker
thread, and hands them to `TorchEngine.swap_weights` for that run's weight set.

Two ways to run a replica (run isolation, issue 9):

- **Pinned** (`--run-id X`): one weight set, X's. Requests of X and requests naming no run are
  served with it; a request of another run is refused (409 `wrong_run`). Memory: the model
  once. A fleet of pinned replicas needs the workers pointed at the right ones.
- **Following** (the default): the replica serves every run, each with its own weights. It
  keeps the weights of the run that published last loaded (requests naming no run get those,
  as before) and loads another run's on its first request (the request waits up to
  `version_wait_s`, else 503 `run_loading`, which the capture client retries). A run that has
  published no weights yet is served with the checkpoint's own weights: they are its version 0.
  Up to `max_runs` runs are held; memory: one more copy of the weights per held run.

Weights must be signed (`shared.weights.verify_weights`, key `RELAYRL_WEIGHTS_KEY`): a version
that is unsigned or whose signature does not match is refused before a byte of it is read,
with the reason logged (`policy version refused`) and kept in `/readyz`'s `policy_last_error`.
The replica keeps serving what it holds for that run (the previous version, or the
checkpoint's weights when it holds none) and does not try that version again: only a new,
correctly signed version of the run replaces it.

Failures never stick. A version that cannot be read or swapped in (missing object, bad
digest, NATS down mid-read) is retried with bounded exponential backoff for as long as it is
still the run's latest; the replica keeps serving what it has for that run meanwhile. The KV
watch is re-created when it fails or the connection has reconnected (a NATS restart can take
the watch's consumer with it), and a new watch replays every run's latest entry, so nothing
published during the outage is missed. A replica counts as synced once it has tried the
versions that existed when it started watching, so one started late serves the latest weights
from its first ready request.

Each replica also advertises what it serves (model, served name, pinned run) in the KV
`relayrl-leases` under `inference.<replica>`, renewed every few seconds and expiring with the
bucket's TTL when the replica dies: the gateway checks a new run's `model` against it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import structlog
import torch

from services.inference.engine import Key, TorchEngine
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings, require_secret
from shared.faults import is_transient
from shared.messages import DecodeError, PolicyVersion
from shared.redact import redact_url
from shared.weights import WeightsSignatureError, load_state_dict, read_weights, verify_weights

log = structlog.get_logger("inference")

RETRY_FIRST_S = 0.5  # a failed version is tried again after this, doubling each time...
RETRY_MAX_S = 30.0  # ...up to this, for as long as it is its run's latest
RESYNC_S = 2.0  # how often an idle watch checks that the connection has not been replaced
DEMAND_TTL_S = 60.0  # a run nobody has asked for in this long is no longer loaded on demand
ADVERT_ROLE = "inference"  # KV relayrl-leases key `inference.<replica>`: what the replica serves
ADVERT_EVERY_S = 3.0  # well inside the bucket's TTL (subjects.LEASE_TTL_S)


class PolicySyncError(RuntimeError):
    """The replica cannot follow policy weights (NATS unreachable): it must not serve stale ones."""


class WrongRun(RuntimeError):
    """Permanent for this replica: it is pinned to another run (the API answers 409 `wrong_run`)."""

    code = "wrong_run"


class RunLoading(RuntimeError):
    """Transient: the run's weights are not loaded yet, or failed to load (503 `run_loading`)."""

    code = "run_loading"


@dataclass(frozen=True)
class Applied:
    """The version of a run the engine holds."""

    run_id: str
    version: int
    sha256: str
    step: int | None = None


@dataclass
class _Failure:
    ident: tuple[int, str, str, str | None]  # (version, object, sha256, signature): the failed PolicyVersion
    attempts: int
    next_at: float


class PolicyWatcher:
    """Follows the KV for one pinned run (`run_id`), or for every run (`run_id=None`)."""

    def __init__(self, settings: ServiceSettings, run_id: str | None, initial_version: int = 0) -> None:
        self.settings = settings
        self.run_id = subjects.check_token(run_id) if run_id else None
        self.initial_version = initial_version
        self.weights_key = require_secret(settings.weights_key, "weights_key", "the trainer's weights signing key")
        self.replica_id = f"{uuid.uuid4().hex[:16]}"
        self.bus: Bus | None = None
        self.engine: TorchEngine | None = None
        self.latest: dict[str, PolicyVersion] = {}  # each run's latest PolicyVersion seen in the KV
        self.last_run: str | None = None  # following: the run that published last (the default)
        self.applied: dict[str, Applied] = {}  # what the engine holds, per run
        self.swaps = 0
        self.rejected = 0  # versions that failed at least once
        self.refused = 0  # versions refused for a missing or wrong signature (never retried)
        self.retries = 0  # further attempts at failed versions
        self.watches = 0  # KV watches created (more than one: re-created after a failure/reconnect)
        self.last_error: str | None = None
        self.last_swap_s: float | None = None
        self.error: str | None = None  # set when the watcher itself died
        self._failures: dict[str, _Failure] = {}
        self._demand: dict[str, float] = {}  # run -> when a request last asked for it
        self._tried: set[str] = set()  # runs whose latest has been tried at least once
        self._changed = asyncio.Event()
        self._initial_seen = asyncio.Event()
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._kv_watch: Any = None
        self._advert: Callable[[], dict[str, Any] | None] = lambda: None

    # --- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and make sure the buckets exist; raises `PolicySyncError` when NATS is unreachable."""
        s = self.settings
        # Bounded here: with reconnects enabled nats-py retries an unreachable server forever
        # inside one `nats.connect` call, so Bus.connect's attempt count alone never ends it.
        budget_s = s.nats_connect_attempts * (s.nats_connect_timeout_s + 1.0)
        try:
            self.bus = await asyncio.wait_for(Bus.connect(s, "inference-policy"), budget_s)
            await self.bus.bind_topology()
        except (ConnectionError, OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
            if self.bus is not None:
                await self.bus.close()
                self.bus = None
            reason = str(exc) or f"no connection within {budget_s:.0f}s"
            raise PolicySyncError(
                f"watch_policy is on but NATS at {redact_url(s.nats_url)} is unreachable ({reason}); "
                "start NATS, point --nats-url at it, or pass --no-watch-policy to serve fixed weights"
            ) from exc

    def start(
        self,
        engine: Callable[[], Awaitable[TorchEngine | None]],
        advert: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        """Begin watching now; apply versions once `engine()` returns the loaded engine.

        The KV watch starts at once so the latest versions are known while the model loads.
        `advert()` says what this replica serves (None until it knows)."""
        if advert is not None:
            self._advert = advert
        self._tasks = [
            asyncio.create_task(self._guard(self._watch(), "policy watch")),
            asyncio.create_task(self._guard(self._apply_loop(engine), "policy loader")),
            asyncio.create_task(self._guard(self._advertise(), "model advert")),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop_watch()
        if self.bus is not None:
            try:  # gone at once rather than after the TTL: a gateway must not count a stopped replica
                kv = await self.bus.kv(subjects.KV_LEASES, ttl_s=subjects.LEASE_TTL_S)
                await asyncio.wait_for(kv.delete(self._advert_key()), self.settings.request_timeout_s)
            except (nats.errors.Error, asyncio.TimeoutError, OSError):
                pass
            await self.bus.close()

    # --- state for the API -------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self, timeout_s: float | None = None) -> None:
        await asyncio.wait_for(self._synced.wait(), timeout_s)

    def key(self, run: str) -> Key:
        """The engine's weight set for `run`: a pinned replica has one set, the checkpoint's slot."""
        return None if self.run_id is not None else run

    def default_run(self) -> str | None:
        """The run whose weights serve requests that name none (None: the checkpoint's)."""
        if self.run_id is not None:
            return self.run_id if self.run_id in self.applied else None
        run = self.last_run
        engine = self.engine
        return run if run is not None and run in self.applied and engine is not None and engine.holds(run) else None

    def served(self, key: Key) -> Applied | None:
        """What a weight set holds: None for the checkpoint's own weights."""
        run = self.run_id if self.run_id is not None else key
        return self.applied.get(run) if run is not None else None

    def status(self) -> dict[str, Any]:
        default = self.default_run()
        current = self.applied.get(default) if default else None
        engine = self.engine
        held = {
            run: {"version": a.version, "sha256": a.sha256, "step": a.step}
            for run, a in self.applied.items()
            if engine is not None and engine.holds(self.key(run))
        }
        return {
            "policy_run_id": default,
            "policy_version": current.version if current else (engine.versions.get(None) if engine else None),
            "policy_step": current.step if current else None,
            "policy_sha256": current.sha256 if current else None,
            "policy_follows": self.run_id or "*",
            "policy_runs": held,
            "policy_synced": self.synced,
            "policy_nats_connected": bool(self.bus and self.bus.nc.is_connected),
            "policy_swaps": self.swaps,
            "policy_rejected": self.rejected,
            "policy_refused_signature": self.refused,
            "policy_retries": self.retries,
            "policy_watches": self.watches,
            "policy_last_error": self.last_error,
            "policy_last_swap_s": self.last_swap_s,
            "replica_id": self.replica_id,
        }

    async def resolve(self, engine: TorchEngine, run: str | None, min_version: int | None, wait_s: float) -> Key:
        """The weight set that serves a request of `run`, waiting (up to `wait_s`) for it to be
        loaded and to reach `min_version`. Raises `WrongRun` or `RunLoading`.

        After the wait a set below `min_version` still serves: its tokens are stamped with
        the version that produced them, and the trainer judges staleness from those."""
        deadline = time.monotonic() + wait_s
        if self.run_id is not None:
            if run is not None and run != self.run_id:
                raise WrongRun(
                    f"this inference replica serves run {self.run_id!r} only, not run {run!r}: "
                    f"send run {run!r} to a replica that follows it (or one started without --run-id)"
                )
            key: Key = None
        elif run is None:
            default = self.default_run()
            key = default if default is not None else None
        else:
            key = await self._run_key(engine, run, min_version or 0, deadline)
        while min_version and engine.versions.get(key, -1) < min_version and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return key

    async def _run_key(self, engine: TorchEngine, run: str, min_version: int, deadline: float) -> Key:
        while True:
            pv = self.latest.get(run)
            if pv is None and self._initial_seen.is_set() and min_version == 0:
                return None  # the run has published nothing: the checkpoint's weights are its version 0
            if pv is not None:
                self._demand[run] = time.monotonic()
                if engine.holds(run) and run in self.applied:
                    return run
                self._changed.set()
            if time.monotonic() >= deadline:
                if pv is None:
                    return None  # still nothing published: the checkpoint's weights, stamped as such
                failure = self._failures.get(run)
                why = f"; last failure: {self.last_error}" if failure is not None and self.last_error else ""
                raise RunLoading(f"the weights of run {run!r} (version {pv.version}) are not loaded on this replica "
                                 f"yet{why}; retry shortly")  # fmt: skip
            await asyncio.sleep(0.01)

    # --- watching ------------------------------------------------------------------------------

    async def _guard(self, work: Awaitable[None], what: str) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - /healthz reports it so the replica gets restarted
            self.error = f"{what} failed: {type(exc).__name__}: {exc}"
            log.exception("policy watcher failed", what=what)

    async def _watch(self) -> None:
        """Watch until cancelled: a failed or stale watch is re-created with bounded backoff."""
        delay = RETRY_FIRST_S
        while True:
            try:
                await self._watch_once()
                delay = RETRY_FIRST_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - anything here is retried; transient ones quietly
                level = log.info if is_transient(exc) else log.warning
                level("policy watch lost; watching again", error=f"{type(exc).__name__}: {exc}", retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            finally:
                await self._stop_watch()

    async def _watch_once(self) -> None:
        assert self.bus is not None
        nc = self.bus.nc
        reconnects = nc.stats["reconnects"]
        kv = await self.bus.kv(subjects.KV_POLICY)
        # "*" is one subject token: every run's PolicyVersion key, never "<run>.progress".
        key = subjects.policy_key(self.run_id) if self.run_id else "*"
        self._kv_watch = watch = await kv.watch(key)
        self.watches += 1
        if self.watches > 1:
            log.info("policy watch re-created", watches=self.watches)
        while True:
            try:
                entry = await watch.updates(timeout=RESYNC_S)
            except nats.errors.TimeoutError:
                if nc.stats["reconnects"] != reconnects:
                    return  # the server restarted under us: its consumer may be gone; watch anew
                if nc.is_closed:
                    raise nats.errors.ConnectionClosedError
                continue
            if entry is None:  # end of the values that existed when the watch started
                self._initial_seen.set()
                self._changed.set()
                continue
            if not hasattr(entry, "key"):
                return  # the watch was stopped
            pv = self._policy_of(entry)
            if pv is not None:
                self.latest[pv.run_id] = pv
                self.last_run = pv.run_id
                if self.engine is not None and self.run_id is None:
                    self.engine.protected = {pv.run_id}  # the default run's weights are never dropped
                self._changed.set()

    async def _stop_watch(self) -> None:
        watch, self._kv_watch = self._kv_watch, None
        if watch is not None:
            try:
                await asyncio.wait_for(watch.stop(), self.settings.request_timeout_s)
            except (nats.errors.Error, asyncio.TimeoutError, OSError):
                pass

    def _policy_of(self, entry: Any) -> PolicyVersion | None:
        if entry.operation is not None or not entry.value or entry.key.endswith(".progress"):
            return None  # deletes and purges leave the replica on what it has
        try:
            pv = PolicyVersion.decode(entry.value)
        except DecodeError as exc:
            log.warning("policy KV entry ignored", entry=entry.key, reason=str(exc))
            return None
        if pv.run_id != entry.key:
            log.warning("policy KV entry ignored", entry=entry.key, reason=f"it names run {pv.run_id!r}")
            return None
        return pv

    async def _advertise(self) -> None:
        """Say what this replica serves, in the leases bucket (its TTL drops a dead replica)."""
        assert self.bus is not None
        key = self._advert_key()
        while True:
            info = self._advert()
            if info is not None:
                try:
                    kv = await self.bus.kv(subjects.KV_LEASES, ttl_s=subjects.LEASE_TTL_S)
                    body = {**info, "replica": self.replica_id, "run_id": self.run_id, "at": time.time()}
                    await asyncio.wait_for(kv.put(key, json.dumps(body).encode()), self.settings.request_timeout_s)
                except (nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
                    log.debug("model advert not written; next round", error=str(exc))
            await asyncio.sleep(ADVERT_EVERY_S)

    def _advert_key(self) -> str:
        return subjects.lease_key(ADVERT_ROLE, self.replica_id)

    # --- applying --------------------------------------------------------------------------------

    async def _apply_loop(self, engine_ready: Callable[[], Awaitable[TorchEngine | None]]) -> None:
        engine = await engine_ready()
        if engine is None:
            return  # the model failed to load; /healthz already says so
        self.engine = engine
        if self.run_id is None and self.last_run is not None:
            engine.protected = {self.last_run}
        while True:
            timeout = self._next_retry_in()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._changed.clear()
            initial_done = self._initial_seen.is_set()
            for run in self._wanted_runs(engine):
                pv = self.latest.get(run)
                if pv is None or self._is_current(engine, pv) or not self._due(pv):
                    continue
                await self._apply(engine, pv)
                self._tried.add(run)
            if initial_done and not self._synced.is_set() and self._default_tried():
                self._synced.set()
                log.info("policy synced", version=engine.versions.get(None), run_id=self.default_run())

    def _wanted_runs(self, engine: TorchEngine) -> list[str]:
        """Runs whose latest weights this replica keeps loaded: the pinned run, or the default
        run first, then every held run, then runs requests asked for recently."""
        if self.run_id is not None:
            return [self.run_id]
        now = time.monotonic()
        for run, at in list(self._demand.items()):
            if now - at > DEMAND_TTL_S and not engine.holds(run):
                del self._demand[run]
        runs = [self.last_run] if self.last_run else []
        runs += [r for r in engine.versions if r is not None]
        runs += list(self._demand)
        return list(dict.fromkeys(runs))

    def _default_tried(self) -> bool:
        run = self.run_id or self.last_run
        return run is None or run not in self.latest or run in self._tried

    def _is_current(self, engine: TorchEngine, pv: PolicyVersion) -> bool:
        held = self.applied.get(pv.run_id)
        key = self.key(pv.run_id)
        return (
            held is not None
            and (held.version, held.sha256) == (pv.version, pv.sha256)
            and engine.versions.get(key) == pv.version
        )

    def _due(self, pv: PolicyVersion) -> bool:
        failure = self._failures.get(pv.run_id)
        if failure is None or failure.ident != _ident(pv):
            return True
        return time.monotonic() >= failure.next_at

    def _next_retry_in(self) -> float | None:
        pending = [
            f.next_at for run, f in self._failures.items()
            if (pv := self.latest.get(run)) is not None and f.ident == _ident(pv)
        ]  # fmt: skip
        pending = [at for at in pending if at != math.inf]  # refused for good: nothing to wake for
        return max(0.0, min(pending) - time.monotonic()) if pending else None

    async def _apply(self, engine: TorchEngine, pv: PolicyVersion) -> bool:
        assert self.bus is not None
        started = time.monotonic()
        fields = {"run_id": pv.run_id, "version": pv.version, "step": pv.step, "size": pv.size}
        try:
            # First: forged weights are refused before they cost a read, and never reach the engine.
            verify_weights(self.weights_key, pv)
            data = await read_weights(self.bus, pv)
            # Parsing and dtype/device conversion are CPU work: off the event loop.
            swapped = await asyncio.to_thread(_prepare_and_swap, engine, data, pv.version, self.key(pv.run_id))
            await asyncio.wrap_future(swapped)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: keep serving, retry while it is the latest
            self._failed(pv, exc)
            return False
        self._failures.pop(pv.run_id, None)
        self.applied[pv.run_id] = Applied(run_id=pv.run_id, version=pv.version, sha256=pv.sha256, step=pv.step)
        self.swaps += 1
        self.last_swap_s = round(time.monotonic() - started, 4)
        log.info("policy weights loaded", load_s=self.last_swap_s, lag_s=round(time.time() - pv.created_at, 3), **fields)
        return True

    def _failed(self, pv: PolicyVersion, exc: Exception) -> None:
        if isinstance(exc, WeightsSignatureError):
            self._refused(pv, exc)
            return
        previous = self._failures.get(pv.run_id)
        attempts = previous.attempts + 1 if previous is not None and previous.ident == _ident(pv) else 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (attempts - 1))
        self._failures[pv.run_id] = _Failure(ident=_ident(pv), attempts=attempts, next_at=time.monotonic() + delay)
        self.last_error = f"{pv.run_id}/{pv.version}: {type(exc).__name__}: {exc}"
        held = self.applied.get(pv.run_id)
        serving = held.version if held is not None else None
        if attempts == 1:
            self.rejected += 1
            log.error("policy version failed; still serving the previous weights, retrying while it is the latest",
                      reason=str(exc), serving=serving, retry_s=delay, run_id=pv.run_id, version=pv.version)  # fmt: skip
        else:
            self.retries += 1
            log.warning("policy version failed again", reason=str(exc), attempts=attempts, retry_s=delay,
                        run_id=pv.run_id, version=pv.version)  # fmt: skip


    def _refused(self, pv: PolicyVersion, exc: WeightsSignatureError) -> None:
        """A version whose signature fails is refused for good: the same entry can never pass."""
        self._failures[pv.run_id] = _Failure(ident=_ident(pv), attempts=1, next_at=math.inf)
        self.last_error = f"{pv.run_id}/{pv.version}: refused: {exc}"
        self.refused += 1
        held = self.applied.get(pv.run_id)
        log.error("policy version refused: bad signature; still serving the previous weights", reason=str(exc),
                  serving=held.version if held is not None else None, run_id=pv.run_id, version=pv.version)  # fmt: skip


def _ident(pv: PolicyVersion) -> tuple[int, str, str, str | None]:
    # The signature too: a forged entry refused for good must not block the genuine one it copies.
    return (pv.version, pv.object, pv.sha256, pv.signature)


def _prepare_and_swap(engine: TorchEngine, data: bytes, version: int, run: Key) -> Any:
    """Parse, convert to each target tensor's device and dtype, then schedule the swap.

    Converting here means the engine's worker only copies like into like between two decode
    steps, which keeps the pause of in-flight requests short."""
    state = load_state_dict(data)
    targets = engine.model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        target = targets.get(name)
        converted[name] = tensor if target is None else tensor.to(device=target.device, dtype=target.dtype)
    return engine.swap_weights(converted, version, run)  # checks names and shapes; raises ValueError
