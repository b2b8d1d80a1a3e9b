"""The trainer process: claim a run, turn its GRPO groups into optimizer steps, publish weights.

One step, in order (each line durable before the next, so a SIGKILL anywhere loses nothing
and trains nothing twice):
  collect `batch_size` usable groups (stale and zero-variance ones are dropped and counted)
  -> optimizer step -> checkpoint (weights, optimizer, RNG, consumed group ids, the step's
  metrics) -> metrics to METRICS -> weights to the object store + PolicyVersion to the KV
  -> progress to the KV (unblocks pacing) -> ack the step's groups.
A restarted trainer loads the newest checkpoint, re-sends that step's metrics and weights
(both idempotent), and skips redelivered groups the checkpoint already covers.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from shared import subjects
from shared.bus import Bus
from shared.lease import Lease
from shared.messages import Group, RunView, StepMetrics, TrainerProgress
from shared.models import resolve_model
from shared.weights import latest_policy, publish_weights
from services.trainer import checkpoint
from services.trainer.feed import GroupFeed
from services.trainer.credit import has_signal
from services.trainer.learner import Learner
from services.trainer.progress import StoreError, get_run, publish_metrics, put_progress, runs_to_train, set_state
from services.trainer.samples import group_min_version, merge_mismatches
from services.trainer.settings import TrainerSettings

log = structlog.get_logger("trainer")

# Consumed group ids remembered in checkpoints: enough to recognise any redelivery (only the
# groups of steps after the last ack can come back), bounded so checkpoints stay small.
_REMEMBERED_STEPS = 64


@dataclass
class Counters:
    step: int = 0
    version: int = 0
    groups_consumed: int = 0
    groups_trained: int = 0
    groups_dropped: int = 0
    # group id -> the step that consumed it (trained or dropped)
    seen: dict[str, int] = field(default_factory=dict)

    def forget_old(self) -> None:
        horizon = self.step - _REMEMBERED_STEPS
        self.seen = {g: s for g, s in self.seen.items() if s > horizon}

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "version": self.version,
            "groups_consumed": self.groups_consumed,
            "groups_trained": self.groups_trained,
            "groups_dropped": self.groups_dropped,
            "seen": self.seen,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Counters:
        return cls(**{k: data[k] for k in ("step", "version", "groups_consumed", "groups_trained", "groups_dropped", "seen")})


@dataclass
class Batch:
    kept: list[Group] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    rewards: list[float] = field(default_factory=list)  # every consumed trajectory: the policy's score


class RunTrainer:
    """Trains one run until it finishes, is cancelled, or the service stops."""

    def __init__(self, bus: Bus, settings: TrainerSettings, run: RunView, stop: asyncio.Event) -> None:
        self.bus = bus
        self.settings = settings
        self.run = run
        self.cfg = run.config
        self.train_cfg = run.config.training
        self.stop = stop
        self.ckpt_dir = settings.checkpoint_dir / run.run_id
        self.roles = re.compile(run.config.trained_roles)
        self.replay = run.config.mode == "replay"
        self.total_groups = run.rows * self.train_cfg.epochs
        self.counters = Counters()
        self.feed = GroupFeed(bus, run.run_id, settings.ack_wait_s, settings.fetch_batch)
        self.learner: Learner | None = None
        self._last_progress = 0.0
        self._last_state_check = time.monotonic()
        self._last_group_at = time.monotonic()
        self.cancelled = False
        # Kept groups waiting for the next step: not reported as consumed until that step's
        # weights are out, or pacing would admit requests sampled by the version they will be
        # trained against plus one (stale by one more than max_staleness allows).
        self._unsettled = 0

    # --- lifecycle ---------------------------------------------------------------------

    async def train(self) -> None:
        log.info("training run", run_id=self.run.run_id, mode=self.cfg.mode, planned_steps=self.run.total_steps)
        await asyncio.to_thread(self._load)
        await self._publish_current_weights()
        await self._put_progress(force=True)
        await self.feed.start()
        try:
            while not self._finished():
                batch = await self._collect()
                if self.stop.is_set() or self.cancelled:
                    break
                if batch.kept:
                    await self._step(batch)
                elif batch.dropped:  # nothing trainable: still record that these were consumed
                    await self._save(None)
                    await self.feed.ack_held()
                    await self._put_progress(force=True)
            if self._finished() and not self.stop.is_set():
                if self.counters.version != self.counters.step:  # the last steps fell between syncs
                    self.counters.version = self.counters.step
                    await self._publish_weights(self.counters.step)
                await self._put_progress(force=True, finished=True)
                await set_state(self.bus, self.run.run_id, "finished", self.settings.store_timeout_s)
                log.info("run finished", run_id=self.run.run_id, step=self.counters.step)
        finally:
            await self.feed.close()

    def _load(self) -> None:
        path = resolve_model(self.cfg.model, self.settings.model_dir)
        self.learner = Learner.from_pretrained(
            path,
            self.train_cfg,
            seed=self.cfg.seed,
            device=self.settings.device,
            trained_roles=self.roles,
            air_rules=self.cfg.runtime.air_values(),
        )
        found = checkpoint.latest_checkpoint(self.ckpt_dir)
        if found is not None:
            step, state, extra = found
            self.learner.load_state_dict(state)
            self.counters = Counters.from_json(extra["counters"])
            self._resent_metrics = extra.get("metrics")
            log.info("resumed from checkpoint", run_id=self.run.run_id, step=step)
        else:
            self._resent_metrics = None

    async def _publish_current_weights(self) -> None:
        """Make the KV name the weights this trainer starts from (fresh run, or a checkpoint
        newer or older than the last broadcast), and re-send the last step's metrics."""
        if self._resent_metrics is not None:
            await publish_metrics(self.bus, StepMetrics.model_validate(self._resent_metrics))
        latest = await latest_policy(self.bus, self.run.run_id)
        if latest is None or latest.version != self.counters.version or latest.step != self.counters.step:
            await self._publish_weights(self.counters.step)

    # --- collecting groups -------------------------------------------------------------

    def _finished(self) -> bool:
        c = self.counters
        if self.train_cfg.max_steps is not None and c.step >= self.train_cfg.max_steps:
            return True
        if self.replay:
            return time.monotonic() - self._last_group_at > self.settings.replay_idle_s and c.step > 0
        return c.groups_consumed >= self.total_groups

    async def _collect(self) -> Batch:
        batch = Batch()
        while len(batch.kept) < self.train_cfg.batch_size and not self._finished():
            if self.stop.is_set() or self.cancelled:
                return batch
            item = await self.feed.next(timeout_s=min(self.settings.poll_s, 1.0))
            if item is None:
                await self._idle()
                continue
            msg, group = item
            self._last_group_at = time.monotonic()
            if group.group_id in self.counters.seen:  # covered by the checkpoint we resumed from
                await self.feed.ack(msg)
                continue
            self.feed.hold(msg)
            self._consume(group, batch)
            await self._put_progress()
        return batch

    def _consume(self, group: Group, batch: Batch) -> None:
        c = self.counters
        c.groups_consumed += 1
        c.seen[group.group_id] = c.step + 1
        batch.rewards.extend(t.reward for t in group.trajectories)
        reason = self._drop_reason(group)
        if reason is not None:
            c.groups_dropped += 1
            batch.dropped[group.group_id] = reason
            return
        batch.kept.append(group)
        self._unsettled += 1

    def _drop_reason(self, group: Group) -> str | None:
        oldest = group_min_version(group, self.roles)
        if oldest is None:
            return "no trainable tokens"
        if not self.replay and self.counters.step - oldest > self.cfg.max_staleness:
            return f"stale: sampled by version {oldest}, trainer at step {self.counters.step}, max_staleness {self.cfg.max_staleness}"
        # Zero variance in final rewards still carries signal when intermediate rewards count.
        if self.train_cfg.drop_zero_variance and not has_signal(group, self.train_cfg.credit, self.cfg.runtime.air_values()):
            return "zero variance: every member has the same reward"
        return None

    async def _idle(self) -> None:
        await self._put_progress()
        if time.monotonic() - self._last_state_check < self.settings.poll_s:
            return
        self._last_state_check = time.monotonic()
        run = await get_run(self.bus, self.run.run_id, self.settings.store_timeout_s)
        if run.state in ("cancelled", "failed", "finished"):
            log.info("run ended elsewhere; stopping", run_id=self.run.run_id, state=run.state)
            self.cancelled = True

    # --- one step ----------------------------------------------------------------------

    async def _step(self, batch: Batch) -> None:
        assert self.learner is not None
        started = time.perf_counter()
        result = await asyncio.to_thread(self.learner.step, batch.kept)
        elapsed = time.perf_counter() - started
        c = self.counters
        c.step += 1
        c.groups_trained += len(batch.kept)
        self._unsettled = 0
        sync = c.step % self.train_cfg.sync_every == 0 or self._finished()
        if sync:
            c.version = c.step
        metrics = StepMetrics(
            run_id=self.run.run_id,
            step=c.step,
            version=c.version,
            group_ids=[g.group_id for g in batch.kept],
            dropped=batch.dropped,
            values=self._values(result, batch, elapsed),
            # Steps between the policy that sampled each sample and the weights that trained it.
            staleness=result.staleness(c.step - 1),
            trainer_id=self.settings.trainer_id,
        )
        c.forget_old()
        if c.step % self.train_cfg.checkpoint_every == 0 or self._finished():
            await self._save(metrics)
        await publish_metrics(self.bus, metrics)
        if sync:
            await self._publish_weights(c.step)
        await self._put_progress(force=True)
        if c.step % self.train_cfg.checkpoint_every == 0 or self._finished():
            await self.feed.ack_held()
        log.info(
            "step",
            run_id=self.run.run_id,
            step=c.step,
            version=c.version,
            reward=round(metrics.values["reward_mean"], 4),
            loss=round(metrics.values.get("policy_loss", math.nan), 5),
            dropped=len(batch.dropped),
            seconds=round(elapsed, 3),
        )

    def _values(self, result: Any, batch: Batch, elapsed: float) -> dict[str, float]:
        values = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        rewards = batch.rewards or [0.0]
        values["reward_mean"] = sum(rewards) / len(rewards)
        values["reward_max"] = max(rewards)
        values["pass_rate"] = sum(r >= 1.0 - 1e-6 for r in rewards) / len(rewards)
        values["trajectories"] = float(len(batch.rewards))
        values["groups_trained"] = float(len(batch.kept))
        values["groups_dropped"] = float(len(batch.dropped))
        values["groups_dropped_stale"] = float(sum(r.startswith("stale") for r in batch.dropped.values()))
        values["groups_dropped_zero_variance"] = float(sum(r.startswith("zero variance") for r in batch.dropped.values()))
        mismatches, continuing = merge_mismatches(batch.kept)
        values["merge_mismatches"] = float(mismatches)
        values["merge_mismatch_rate"] = mismatches / continuing if continuing else 0.0
        values["step_time_s"] = elapsed
        tokens = values.get("tokens", 0.0)
        values["tokens_per_s"] = tokens / elapsed if elapsed > 0 else 0.0
        return values

    async def _save(self, metrics: StepMetrics | None) -> None:
        assert self.learner is not None
        extra = {"counters": self.counters.to_json(), "metrics": metrics.model_dump() if metrics else self._resent_metrics}
        if metrics is not None:
            self._resent_metrics = extra["metrics"]
        state = self.learner.state_dict()
        await asyncio.to_thread(
            checkpoint.save_checkpoint, self.ckpt_dir, self.counters.step, state, extra, self.settings.keep_checkpoints
        )

    async def _publish_weights(self, step: int) -> None:
        assert self.learner is not None
        weights = await asyncio.to_thread(self.learner.policy_state)
        pv = await publish_weights(self.bus, self.run.run_id, step, step, weights, keep=self.train_cfg.keep_versions)
        log.info("weights published", run_id=self.run.run_id, version=pv.version, size=pv.size)

    async def _put_progress(self, force: bool = False, finished: bool = False) -> None:
        # Pacing reads this: update it as groups are consumed, not only at steps, or a run whose
        # groups are all dropped would never be sent more work.
        if not force and time.monotonic() - self._last_progress < 0.2:
            return
        self._last_progress = time.monotonic()
        c = self.counters
        await put_progress(
            self.bus,
            TrainerProgress(
                run_id=self.run.run_id,
                step=c.step,
                version=c.version,
                groups_consumed=c.groups_consumed - self._unsettled,
                groups_trained=c.groups_trained,
                groups_dropped=c.groups_dropped,
                total_steps=self.run.total_steps,
                finished=finished,
                trainer_id=self.settings.trainer_id,
            ),
        )


class Trainer:
    """The service: claims one run at a time (a KV lease per run) and trains it."""

    def __init__(self, bus: Bus, settings: TrainerSettings) -> None:
        self.bus = bus
        self.settings = settings

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                claimed = await self._claim()
            except (TimeoutError, StoreError) as exc:  # the store restarting: look again shortly
                log.warning("cannot list runs; retrying", error=str(exc))
                claimed = None
            if claimed is None:
                await _sleep(stop, self.settings.poll_s)
                continue
            run, lease = claimed
            try:
                await self._train_holding(run, lease, stop)
            except Exception as exc:
                log.exception("run failed", run_id=run.run_id)
                await set_state(self.bus, run.run_id, "failed", self.settings.store_timeout_s, error=f"{type(exc).__name__}: {exc}")
            finally:
                await lease.release()
            if self.settings.exit_when_done and self.settings.run_id:
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

    async def _train_holding(self, run: RunView, lease: Lease, stop: asyncio.Event) -> None:
        """Train while renewing the lease; losing it (another trainer took over) stops training."""
        lost = asyncio.Event()
        run_stop = asyncio.Event()

        async def renew() -> None:
            while not run_stop.is_set():
                await _sleep(run_stop, subjects.LEASE_TTL_S / 4)
                if not await lease.renew():
                    log.error("lost the run's lease; stopping", run_id=run.run_id)
                    lost.set()
                    run_stop.set()

        async def forward_stop() -> None:
            await stop.wait()
            run_stop.set()

        helpers = [asyncio.create_task(renew()), asyncio.create_task(forward_stop())]
        try:
            await RunTrainer(self.bus, self.settings, run, run_stop).train()
        finally:
            run_stop.set()
            for h in helpers:
                h.cancel()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
