"""PolicyWatcher: keeps an inference replica on the trainer's latest weights.

It watches the KV `relayrl-policy` (one run's key, or every run's key when no run is set:
then it follows whichever run published last), streams each new version from the object
store, checks size and sha256, converts the tensors to the engine's device and dtype in a
worker thread, and hands them to `TorchEngine.swap_weights`, which applies them between two
decode steps. Versions that arrive while one is loading are coalesced: only the newest is
loaded next. A version that cannot be used (bad digest, wrong shapes, unreadable) is logged
with the reason and skipped; the replica keeps serving what it has.

A replica counts as synced once it has applied (or rejected) every version that existed when
it started watching, so a replica started late serves the latest weights from its first
ready request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import structlog
import torch

from services.inference.engine import TorchEngine
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import DecodeError, PolicyVersion
from shared.weights import WeightsError, load_state_dict, read_weights

log = structlog.get_logger("inference")

_RETRIES = 3  # reads that fail for transport reasons (timeouts, reconnects) are retried
_RETRY_DELAY_S = 1.0


class PolicySyncError(RuntimeError):
    """The replica cannot follow policy weights (NATS unreachable): it must not serve stale ones."""


@dataclass(frozen=True)
class _Applied:
    run_id: str | None
    version: int
    sha256: str | None
    step: int | None = None


class PolicyWatcher:
    """Follows the KV for one run (`run_id`) or for the latest-publishing run (`run_id=None`)."""

    def __init__(self, settings: ServiceSettings, run_id: str | None, initial_version: int = 0) -> None:
        self.settings = settings
        self.run_id = subjects.check_token(run_id) if run_id else None
        self.bus: Bus | None = None
        self.current = _Applied(run_id=None, version=initial_version, sha256=None)
        self.swaps = 0
        self.rejected = 0
        self.last_error: str | None = None
        self.last_swap_s: float | None = None
        self.error: str | None = None  # set when the watcher itself died
        self._wanted: PolicyVersion | None = None
        self._changed = asyncio.Event()
        self._initial_seen = False
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._kv_watch: Any = None

    # --- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and make sure the buckets exist; raises `PolicySyncError` when NATS is unreachable."""
        s = self.settings
        # Bounded here: with reconnects enabled nats-py retries an unreachable server forever
        # inside one `nats.connect` call, so Bus.connect's attempt count alone never ends it.
        budget_s = s.nats_connect_attempts * (s.nats_connect_timeout_s + 1.0)
        try:
            self.bus = await asyncio.wait_for(Bus.connect(s, "inference-policy"), budget_s)
            await self.bus.ensure_topology()
        except (ConnectionError, OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
            if self.bus is not None:
                await self.bus.close()
                self.bus = None
            reason = str(exc) or f"no connection within {budget_s:.0f}s"
            raise PolicySyncError(
                f"watch_policy is on but NATS at {s.nats_url} is unreachable ({reason}); "
                "start NATS, point --nats-url at it, or pass --no-watch-policy to serve fixed weights"
            ) from exc

    def start(self, engine: Callable[[], Awaitable[TorchEngine | None]]) -> None:
        """Begin watching now; apply versions once `engine()` returns the loaded engine.

        The KV watch starts at once so the latest version is known while the model loads."""
        self._tasks = [
            asyncio.create_task(self._guard(self._watch(), "policy watch")),
            asyncio.create_task(self._guard(self._apply_loop(engine), "policy loader")),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._kv_watch is not None:
            try:
                await self._kv_watch.stop()
            except nats.errors.Error:
                pass
        if self.bus is not None:
            await self.bus.close()

    # --- state for the API -------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self, timeout_s: float | None = None) -> None:
        await asyncio.wait_for(self._synced.wait(), timeout_s)

    def status(self) -> dict[str, Any]:
        return {
            "policy_run_id": self.current.run_id,
            "policy_step": self.current.step,
            "policy_sha256": self.current.sha256,
            "policy_follows": self.run_id or "*",
            "policy_synced": self.synced,
            "policy_nats_connected": bool(self.bus and self.bus.nc.is_connected),
            "policy_swaps": self.swaps,
            "policy_rejected": self.rejected,
            "policy_last_error": self.last_error,
            "policy_last_swap_s": self.last_swap_s,
        }

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
        assert self.bus is not None
        kv = await self.bus.kv(subjects.KV_POLICY)
        # "*" is one subject token: every run's PolicyVersion key, never "<run>.progress".
        key = subjects.policy_key(self.run_id) if self.run_id else "*"
        self._kv_watch = await kv.watch(key)
        async for entry in self._kv_watch:
            if entry is None:  # end of the values that existed when the watch started
                self._initial_seen = True
                self._changed.set()
                continue
            pv = self._policy_of(entry)
            if pv is not None:
                self._wanted = pv
                self._changed.set()

    def _policy_of(self, entry: Any) -> PolicyVersion | None:
        if entry.operation is not None or not entry.value or entry.key.endswith(".progress"):
            return None  # deletes and purges leave the replica on what it has
        try:
            pv = PolicyVersion.decode(entry.value)
        except DecodeError as exc:
            log.warning("policy KV entry ignored", key=entry.key, reason=str(exc))
            return None
        if pv.run_id != entry.key:
            log.warning("policy KV entry ignored", key=entry.key, reason=f"it names run {pv.run_id!r}")
            return None
        return pv

    # --- applying --------------------------------------------------------------------------------

    async def _apply_loop(self, engine_ready: Callable[[], Awaitable[TorchEngine | None]]) -> None:
        engine = await engine_ready()
        if engine is None:
            return  # the model failed to load; /healthz already says so
        while True:
            await self._changed.wait()
            self._changed.clear()
            initial_done = self._initial_seen
            pv = self._wanted
            if pv is not None and not self._is_current(pv):
                await self._apply(engine, pv)
            if initial_done and not self._synced.is_set():
                self._synced.set()
                log.info("policy synced", version=engine.version, run_id=self.current.run_id)

    def _is_current(self, pv: PolicyVersion) -> bool:
        return (pv.run_id, pv.version, pv.sha256) == (self.current.run_id, self.current.version, self.current.sha256)

    async def _apply(self, engine: TorchEngine, pv: PolicyVersion) -> None:
        started = time.monotonic()
        fields = {"run_id": pv.run_id, "version": pv.version, "step": pv.step, "size": pv.size}
        try:
            data = await self._read(pv)
            # Parsing and dtype/device conversion are CPU work: off the event loop.
            swapped = await asyncio.to_thread(_prepare_and_swap, engine, data, pv.version)
            await asyncio.wrap_future(swapped)
        except (WeightsError, ValueError, RuntimeError, TypeError) as exc:
            self.rejected += 1
            self.last_error = f"{pv.run_id}/{pv.version}: {exc}"
            log.error("policy version rejected; still serving the previous weights",
                      reason=str(exc), serving=engine.version, **fields)  # fmt: skip
            return
        self.current = _Applied(run_id=pv.run_id, version=pv.version, sha256=pv.sha256, step=pv.step)
        self.swaps += 1
        self.last_swap_s = round(time.monotonic() - started, 4)
        log.info("policy weights loaded", load_s=self.last_swap_s, lag_s=round(time.time() - pv.created_at, 3), **fields)

    async def _read(self, pv: PolicyVersion) -> bytes:
        """Read with retries for transport hiccups; integrity failures are not retried."""
        assert self.bus is not None
        for attempt in range(1, _RETRIES + 1):
            try:
                return await read_weights(self.bus, pv)
            except (asyncio.TimeoutError, nats.errors.Error) as exc:
                if attempt == _RETRIES:
                    raise WeightsError(f"could not read {pv.object}: {type(exc).__name__}: {exc}") from exc
                log.warning("weights read failed; retrying", object=pv.object, attempt=attempt, error=str(exc))
                await asyncio.sleep(_RETRY_DELAY_S * attempt)
        raise AssertionError("unreachable")


def _prepare_and_swap(engine: TorchEngine, data: bytes, version: int) -> Any:
    """Parse, convert to each target tensor's device and dtype, then schedule the swap.

    Converting here means the engine's worker only copies like into like between two decode
    steps, which keeps the pause of in-flight requests short."""
    state = load_state_dict(data)
    targets = engine.model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        target = targets.get(name)
        converted[name] = tensor if target is None else tensor.to(device=target.device, dtype=target.dtype)
    return engine.swap_weights(converted, version)  # checks names and shapes; raises ValueError
