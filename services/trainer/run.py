"""One run's training: turn its GRPO groups into optimizer steps, publish weights.

`RunTrainer` trains a GRPO run; `services/trainer/sft_run.py` subclasses it for SFT runs, and
the service (services/trainer/service.py) claims runs and picks the class by algorithm.

One step, in order (each line durable before the next, so a SIGKILL anywhere loses nothing
and trains nothing twice):
  collect `batch_size` usable groups (stale and zero-variance ones are dropped and counted)
  -> optimizer step -> checkpoint (weights, optimizer, RNG, consumed group ids, the step's
  metrics) -> metrics to METRICS -> weights to the object store + PolicyVersion to the KV
  -> progress to the KV (unblocks pacing) -> ack the step's groups.
A restarted trainer loads the newest checkpoint, re-sends that step's metrics and weights
(both idempotent), and skips redelivered groups the checkpoint already covers.

Faults: a transient one propagates and the service resumes the run from its checkpoint after
a backoff; a `PermanentRunError` (a model that cannot load, `init_from` weights that do not
fit, non-finite updates `max_nonfinite_steps` in a row) fails the run with its reason.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from shared.bus import Bus
from shared.config import require_secret
from shared.faults import PermanentRunError, Rejected, is_transient
from shared.lease import Lease
from shared.messages import RUN_ENDED, Group, PolicyVersion, RunView, StepMetrics, TrainerProgress
from shared.models import resolve_model
from shared.weights import (
    PolicyFence,
    WeightsError,
    WeightsSignatureError,
    latest_policy,
    load_state_dict,
    publish_weights,
    read_weights,
    verify_weights,
)
from services.trainer import checkpoint
from services.trainer.feed import GroupFeed, Unusable
from services.trainer.credit import has_signal
from services.trainer.learner import Learner, StepResult
from services.trainer.progress import get_run, publish_metrics, put_progress, set_state
from services.trainer.samples import group_min_version, merge_mismatches
from services.trainer.settings import TrainerSettings

log = structlog.get_logger("trainer")

# Consumed group ids remembered in checkpoints: enough to recognise any redelivery (only the
# groups of steps after the last ack can come back, and groups are acked at checkpoints, so
# more than `checkpoint_every` steps), bounded so checkpoints stay small.
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
    nonfinite_streak: int = 0  # consecutive steps whose update was NaN/inf (not applied)

    def forget_old(self, checkpoint_every: int = 1) -> None:
        horizon = self.step - max(_REMEMBERED_STEPS, 2 * checkpoint_every + 1)
        self.seen = {g: s for g, s in self.seen.items() if s > horizon}

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "version": self.version,
            "groups_consumed": self.groups_consumed,
            "groups_trained": self.groups_trained,
            "groups_dropped": self.groups_dropped,
            "seen": self.seen,
            "nonfinite_streak": self.nonfinite_streak,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Counters:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Batch:
    kept: list[Group] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    rewards: list[float] = field(default_factory=list)  # every consumed trajectory: the policy's score


class RunTrainer:
    """Trains one run until it finishes, is cancelled, or the service stops."""

    def __init__(
        self, bus: Bus, settings: TrainerSettings, run: RunView, stop: asyncio.Event, lease: Lease, fence: PolicyFence
    ) -> None:
        self.bus = bus
        self.lease = lease  # checked before every write only the run's trainer may make
        self.fence = fence  # compare-and-set of the run's PolicyVersion
        self.settings = settings
        # Signs every version this trainer publishes; verifies the weights an init_from run left.
        self.weights_key = require_secret(settings.weights_key, "weights_key", "the weights signing key")
        self.run = run
        self.cfg = run.config
        self.train_cfg = run.config.training
        self.stop = stop
        self.ckpt_dir = settings.checkpoint_dir / run.run_id
        self.roles = re.compile(run.config.trained_roles)
        self.replay = run.config.mode == "replay"
        self.counters = Counters()
        self.feed = GroupFeed(bus, run.run_id, settings.ack_wait_s, settings.fetch_batch)
        self.learner: Learner | None = None
        self._last_progress = 0.0
        self._last_state_check = time.monotonic()
        self.cancelled = False
        self._saved_step = 0  # the step the newest checkpoint on disk covers
        # Kept groups waiting for the next step: not reported as consumed until that step's
        # weights are out, or pacing would admit requests sampled by the version they will be
        # trained against plus one (stale by one more than max_staleness allows).
        self._unsettled = 0

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def total_groups(self) -> int:
        """Groups the run consumes before it is done; a replay run's rows are its replay job's
        groups (0 until the job exists), each consumed once (`RunConfig.data_epochs`)."""
        return self.run.rows * self.cfg.data_epochs

    @property
    def ended(self) -> bool:
        """The run reached an end state (finished here, or cancelled/failed/finished elsewhere)."""
        return self.cancelled or (self._finished() and not self.stop.is_set())

    async def train(self) -> None:
        if not await self._begin():
            return
        await self.feed.start()
        try:
            while not self._finished():
                batch = await self._collect()
                if self.stop.is_set() or self.cancelled:
                    break
                if batch.kept or batch.dropped:
                    # Only the run's last batch can be all dropped (a batch ends early only when
                    # the data does): it is still a step, without an update, so its drops are
                    # in the step metrics SQL keeps, like every other consumed group.
                    await self._step(batch)
            await self._finish()
        finally:
            await self.feed.close()

    async def _begin(self) -> bool:
        """Load the model (and the newest checkpoint), publish the weights the run starts from
        and its progress; False when the run ended before training (re)started."""
        # A run that ended while this trainer started or waited out a fault may be cleaned up
        # already (services/store/cleanup.py): its durable, progress and weights must not come back.
        if (await get_run(self.bus, self.run.run_id, self.settings.store_timeout_s)).state in RUN_ENDED:
            log.info("run ended before training (re)started; nothing to do", run_id=self.run.run_id)
            self.cancelled = True
            return False
        log.info("training run", run_id=self.run.run_id, mode=self.cfg.mode, algorithm=self.cfg.algorithm,
                 planned_steps=self.run.total_steps)  # fmt: skip
        try:
            await asyncio.to_thread(self._load)
        except (OSError, ValueError) as exc:  # the model cannot be found or built: retrying cannot help
            raise PermanentRunError(f"cannot load model {self.cfg.model!r}: {type(exc).__name__}: {exc}") from exc
        if self.cfg.init_from is not None:
            await self._init_from(self.cfg.init_from, fresh=self.counters.step == 0)
        await self._publish_current_weights()
        await self._put_progress(force=True)
        return True

    async def _init_from(self, source: str, fresh: bool) -> None:
        """Start from the latest weights `source` published (e.g. an SFT warm start): a fresh
        run's policy (and KL reference) become them; a resumed run has its policy from its
        checkpoint, and only its KL reference is set again (checkpoints leave it out). The
        gateway only accepts an ended source, so its latest weights cannot move."""
        assert self.learner is not None
        if not fresh and self.learner.reference is None:
            return
        pv = await latest_policy(self.bus, source)
        if pv is None:
            raise PermanentRunError(f"init_from: run {source!r} has no published weights")
        try:
            verify_weights(self.weights_key, pv)  # only weights a trainer with this key published
        except WeightsSignatureError as exc:
            raise PermanentRunError(f"init_from: {exc}") from exc
        data = await read_weights(self.bus, pv)
        try:
            state = load_state_dict(data)
            await asyncio.to_thread(self.learner.load_policy if fresh else self.learner.load_reference, state)
        except (WeightsError, RuntimeError, ValueError) as exc:  # another architecture: permanent
            raise PermanentRunError(
                f"init_from: the weights of {source!r} (version {pv.version}) do not fit model {self.cfg.model!r}: {exc}"
            ) from exc
        log.info("starting from another run's weights", run_id=self.run.run_id, init_from=source, version=pv.version)

    async def _finish(self) -> None:
        """A run whose data is done: its last weights out, progress final, state finished."""
        if not self._finished() or self.stop.is_set():
            return
        if self.counters.version != self.counters.step:  # the last steps fell between syncs
            self.counters.version = self.counters.step
            await self._publish_weights(self.counters.step)
        await self._put_progress(force=True, finished=True)
        self.lease.check()
        try:
            await set_state(self.bus, self.run.run_id, "finished", self.settings.store_timeout_s)
        except Rejected as exc:  # cancelled (or ended) meanwhile: nothing left to mark
            log.info("run ended elsewhere before it finished here", run_id=self.run.run_id, reason=str(exc))
        log.info("run finished", run_id=self.run.run_id, step=self.counters.step)

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
            self._saved_step = self.counters.step
            self._resent_metrics = extra.get("metrics")
            log.info("resumed from checkpoint", run_id=self.run.run_id, step=step)
        else:
            self._resent_metrics = None

    async def _publish_current_weights(self) -> None:
        """Make the KV name the weights this trainer starts from (fresh run, or a checkpoint
        newer or older than the last broadcast), and re-send the last step's metrics."""
        if self._resent_metrics is not None:
            self.lease.check()
            await publish_metrics(self.bus, StepMetrics.model_validate(self._resent_metrics))
        latest = await latest_policy(self.bus, self.run.run_id)
        if (
            latest is None
            or latest.version != self.counters.version
            or latest.step != self.counters.step
            or not self._signed(latest)
        ):
            # These weights go out as version = step: the counters must say so too, or metrics
            # and progress would name a version inference no longer serves.
            self.counters.version = self.counters.step
            await self._publish_weights(self.counters.step)

    def _signed(self, pv: PolicyVersion) -> bool:
        """Whether `pv` carries this trainer's signature. An entry that does not (written before
        weights were signed, or by someone without the key) is published again, signed: replicas
        refuse it, and would otherwise serve the checkpoint's weights until the next sync."""
        try:
            verify_weights(self.weights_key, pv)
        except WeightsSignatureError as exc:
            log.warning("the run's published weights are not signed with this key; publishing them again",
                        run_id=self.run.run_id, version=pv.version, reason=str(exc))  # fmt: skip
            return False
        return True

    # --- collecting groups -------------------------------------------------------------

    def _finished(self) -> bool:
        c = self.counters
        if self.train_cfg.max_steps is not None and c.step >= self.train_cfg.max_steps:
            return True
        if self.replay and self.total_groups == 0:  # its replay job has not been made yet
            return False
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
            consumed_at = self.counters.seen.get(group.group_id)
            if consumed_at is not None:
                if consumed_at <= self._saved_step:  # covered by a checkpoint on disk: done with
                    self.lease.check()
                    await self.feed.ack(msg)
                else:  # consumed, not yet checkpointed (redelivered while held): ack it with them
                    self.feed.hold(msg)
                continue
            self.feed.hold(msg)
            if isinstance(group, Unusable):
                self._consume_dropped(group.group_id, group.reason, batch)
            else:
                self._consume(group, batch)
            await self._put_progress()
        return batch

    def _consume(self, group: Group, batch: Batch) -> None:
        batch.rewards.extend(t.reward for t in group.trajectories)
        reason = self._drop_reason(group)
        if reason is not None:
            self._consume_dropped(group.group_id, reason, batch)
            return
        c = self.counters
        c.groups_consumed += 1
        c.seen[group.group_id] = c.step + 1
        batch.kept.append(group)
        self._unsettled += 1

    def _consume_dropped(self, group_id: str, reason: str, batch: Batch) -> None:
        c = self.counters
        c.groups_consumed += 1
        c.seen[group_id] = c.step + 1
        c.groups_dropped += 1
        batch.dropped[group_id] = reason

    def _drop_reason(self, group: Group) -> str | None:
        assert self.learner is not None
        bad = self.learner.out_of_vocabulary(group)
        if bad is not None:
            return f"bad data: {bad}"
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
        run = await self._check_state()
        if run is not None and self.replay:  # the replay job sets the run's size after the run may have been claimed
            self.run = run

    async def _check_state(self) -> RunView | None:
        """Every `poll_s`, the run as the store has it (None when not due yet, or the store is
        unavailable: looked at again later); a run that ended elsewhere stops this trainer."""
        if time.monotonic() - self._last_state_check < self.settings.poll_s:
            return None
        self._last_state_check = time.monotonic()
        try:
            run = await get_run(self.bus, self.run.run_id, self.settings.store_timeout_s)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("cannot read the run's state; will look again", run_id=self.run.run_id, error=str(exc))
            return None
        if run.state in RUN_ENDED:
            log.info("run ended elsewhere; stopping", run_id=self.run.run_id, state=run.state)
            self.cancelled = True
        return run

    # --- one step ----------------------------------------------------------------------

    async def _step(self, batch: Batch) -> None:
        assert self.learner is not None
        started = time.perf_counter()
        if batch.kept:
            result = await asyncio.to_thread(self.learner.step, batch.kept)
        else:  # every group dropped: nothing to learn from, the weights stay
            result = StepResult(step=self.counters.step + 1, metrics={}, samples=0, skipped=True)
        elapsed = time.perf_counter() - started
        c = self.counters
        c.step += 1
        c.groups_trained += len(batch.kept)
        self._unsettled = 0
        sync = self._advance(result)
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
        c.forget_old(self.train_cfg.checkpoint_every)
        await self._record(metrics, sync)
        if self._checkpoint_due():
            await self._ack_held()
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

    def _advance(self, result: StepResult) -> bool:
        """After a step (counters.step already counts it): fail the run after too many
        non-finite updates in a row; whether this step's weights go out (its version)."""
        c = self.counters
        c.nonfinite_streak = c.nonfinite_streak + 1 if result.nonfinite else 0
        if c.nonfinite_streak >= self.settings.max_nonfinite_steps:
            raise PermanentRunError(
                f"non-finite loss or gradients {c.nonfinite_streak} steps in a row (last at step {c.step}); "
                "updates were not applied"
            )
        sync = c.step % self.train_cfg.sync_every == 0 or self._finished()
        if sync:
            c.version = c.step
        return sync

    def _checkpoint_due(self) -> bool:
        return self.counters.step % self.train_cfg.checkpoint_every == 0 or self._finished()

    async def _record(self, metrics: StepMetrics, sync: bool, force_progress: bool = True) -> None:
        """A step's durable effects, in the one order every algorithm follows: checkpoint (when
        due) -> metrics -> weights (when `sync`) -> progress."""
        if self._checkpoint_due():
            await self._save(metrics)
        self.lease.check()
        await publish_metrics(self.bus, metrics)
        if sync:
            await self._publish_weights(self.counters.step)
        await self._put_progress(force=force_progress)

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

    async def _save(self, metrics: StepMetrics) -> None:
        assert self.learner is not None
        extra = {"counters": self.counters.to_json(), "metrics": metrics.model_dump()}
        self._resent_metrics = extra["metrics"]
        state = self.learner.state_dict()
        self.lease.check()
        await asyncio.to_thread(
            checkpoint.save_checkpoint, self.ckpt_dir, self.counters.step, state, extra, self.settings.keep_checkpoints
        )
        self._saved_step = self.counters.step

    async def _ack_held(self) -> None:
        self.lease.check()
        await self.feed.ack_held()

    async def _publish_weights(self, step: int) -> None:
        assert self.learner is not None
        weights = await asyncio.to_thread(self.learner.policy_state)
        self.lease.check()
        pv = await publish_weights(
            self.bus, self.run.run_id, step, step, weights, keep=self.train_cfg.keep_versions, fence=self.fence,
            signing_key=self.weights_key,
        )
        log.info("weights published", run_id=self.run.run_id, version=pv.version, size=pv.size)

    async def _put_progress(self, force: bool = False, finished: bool = False) -> None:
        # Pacing reads this: update it as groups are consumed, not only at steps, or a run whose
        # groups are all dropped would never be sent more work.
        if not force and time.monotonic() - self._last_progress < 0.2:
            return
        self._last_progress = time.monotonic()
        c = self.counters
        self.lease.check()
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
