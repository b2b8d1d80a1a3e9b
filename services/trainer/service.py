"""The trainer process: claim a run (a KV lease per run), train it with the trainer its
algorithm names, and fail it only for a reason that recurs.

Faults, by type (shared/faults.py): a transient one (NATS reconnecting, a JetStream 503, the
store restarting, a timeout) never changes the run's state: the run is resumed from its
checkpoint after a bounded backoff. Losing the lease stops writes and sends the trainer back to
claiming. A `PermanentRunError`, or the same unexpected error `max_unexpected_failures` times
without progress, marks the run failed with the reason. The step order itself is written once
per algorithm: services/trainer/run.py (GRPO) and services/trainer/sft_run.py (SFT).
"""

from __future__ import annotations

import asyncio

import structlog

from shared.bus import Bus
from shared.faults import LeaseLost, NotFound, PermanentRunError, Rejected, is_transient
from shared.lease import Lease
from shared.messages import Algorithm, RunView
from shared.weights import PolicyFence
from services.trainer.progress import runs_to_train, set_state
from services.trainer.run import RunTrainer
from services.trainer.settings import TrainerSettings
from services.trainer.sft_run import SftRunTrainer

log = structlog.get_logger("trainer")

# The trainer of each algorithm (shared.messages.ALGORITHMS lists them; a test checks both agree).
TRAINERS: dict[Algorithm, type[RunTrainer]] = {"grpo": RunTrainer, "sft": SftRunTrainer}


class Trainer:
    """The service: claims one run at a time (a KV lease per run) and trains it."""

    def __init__(self, bus: Bus, settings: TrainerSettings) -> None:
        self.bus = bus
        self.settings = settings

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                claimed = await self._claim()
            except Exception as exc:  # never exit the service over a lookup: look again shortly
                log.warning("cannot claim a run; retrying", error=f"{type(exc).__name__}: {exc}", transient=is_transient(exc))
                claimed = None
            if claimed is None:
                await _sleep(stop, self.settings.poll_s)
                continue
            run, lease = claimed
            try:
                ended = await self._train_holding(run, lease, stop)
            finally:
                await lease.release()
            if ended and self.settings.exit_when_done and self.settings.run_id:
                return

    async def _claim(self) -> tuple[RunView, Lease] | None:
        runs = await runs_to_train(self.bus, self.settings.store_timeout_s)
        for run in runs:
            if self.settings.run_id and run.run_id != self.settings.run_id:
                continue
            lease = await Lease.open(self.bus, "train", run.run_id, self.settings.trainer_id)
            if await lease.acquire():
                return run, lease
        return None

    async def _train_holding(self, run: RunView, lease: Lease, stop: asyncio.Event) -> bool:
        """Train `run` while holding its lease, through any number of transient faults.

        Returns True when the run reached an end state, False when this trainer stopped
        (service stopping, lease lost) and the run is left for whoever holds it next."""
        run_stop = asyncio.Event()
        helpers = [asyncio.create_task(self._keep_lease(run, lease, run_stop)), asyncio.create_task(_forward(stop, run_stop))]
        delay = self.settings.retry_initial_s
        strikes: tuple[int, int] = (-1, 0)  # (step of the last unexpected failure, failures there in a row)
        last_fault_step = -1
        try:
            while not run_stop.is_set():
                trainer: RunTrainer | None = None
                try:
                    fence = await PolicyFence.read(self.bus, run.run_id)
                    trainer = TRAINERS[run.config.algorithm](self.bus, self.settings, run, run_stop, lease, fence)
                    await trainer.train()
                    return trainer.ended
                except LeaseLost as exc:
                    log.warning("cannot prove the run's lease; stopping writes", run_id=run.run_id, reason=str(exc))
                    return False
                except PermanentRunError as exc:
                    await self._fail(run, lease, str(exc), stop)
                    return True
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    step = trainer.counters.step if trainer is not None else -1
                    if step > last_fault_step:  # it trained since the last fault: start the backoff over
                        delay = self.settings.retry_initial_s
                    last_fault_step = max(last_fault_step, step)
                    if is_transient(exc):
                        log.warning("transient fault; waiting, then resuming from the checkpoint",
                                    run_id=run.run_id, waiting_for=_waiting_for(exc), error=reason, retry_in_s=delay)  # fmt: skip
                    else:
                        strikes = (step, strikes[1] + 1 if strikes[0] == step else 1)
                        if strikes[1] >= self.settings.max_unexpected_failures:
                            await self._fail(run, lease, f"{reason} ({strikes[1]} times in a row at step {step})", stop)
                            return True
                        log.exception("unexpected error; resuming from the checkpoint", run_id=run.run_id,
                                      failures=strikes[1], retry_in_s=delay)  # fmt: skip
                    await _sleep(run_stop, delay)
                    delay = min(delay * 2, self.settings.retry_max_s)
            return False
        finally:
            run_stop.set()
            for h in helpers:
                h.cancel()

    async def _keep_lease(self, run: RunView, lease: Lease, run_stop: asyncio.Event) -> None:
        """Renew every TTL/4. A renewal that fails (NATS reconnecting) is retried; meanwhile the
        lease's fence stops writes. Only a lease someone else holds ends the run here."""
        while not run_stop.is_set():
            await _sleep(run_stop, lease.ttl_s / 4)
            if run_stop.is_set():
                return
            try:
                if not await lease.renew():
                    log.error("another trainer holds the run's lease; stopping", run_id=run.run_id)
                    run_stop.set()
                    return
            except Exception as exc:
                log.warning("cannot renew the run's lease; retrying", run_id=run.run_id, error=f"{type(exc).__name__}: {exc}")

    async def _fail(self, run: RunView, lease: Lease, reason: str, stop: asyncio.Event) -> None:
        """Mark the run failed with `reason`, waiting out transient faults; only the lease holder may."""
        log.error("run failed", run_id=run.run_id, reason=reason)
        delay = self.settings.retry_initial_s
        while not stop.is_set():
            try:
                lease.check()
                await set_state(self.bus, run.run_id, "failed", self.settings.store_timeout_s, error=reason)
                return
            except (NotFound, Rejected, LeaseLost) as exc:
                log.warning("could not mark the run failed", run_id=run.run_id, error=str(exc))
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("waiting to mark the run failed", run_id=run.run_id, waiting_for=_waiting_for(exc), error=str(exc))
                await _sleep(stop, delay)
                delay = min(delay * 2, self.settings.retry_max_s)
                try:  # keep the lease alive while waiting (its keeper stopped with the run)
                    await lease.renew()
                except Exception:
                    pass


def _waiting_for(exc: BaseException) -> str:
    """What a transient fault says the trainer is waiting for, for the log."""
    text = f"{type(exc).__name__} {exc}".lower()
    if "store" in text:
        return "store"
    return "nats"


async def _forward(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
