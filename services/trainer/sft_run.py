"""One SFT run's training: supervised steps over conversations or a past run's trajectories,
with the same versioned weights, checkpoints, metrics and progress as a GRPO run.

One step, in order (the GRPO step's order, services/trainer/run.py, without groups to ack):
  the step's examples (a pure function of the run's seed and the step number)
  -> optimizer step (mean NLL of the assistant tokens) -> checkpoint -> metrics to METRICS
  -> weights to the object store + PolicyVersion to the KV (every `sync_every` steps and at
  the end) -> progress to the KV.

The examples are loaded once when training (re)starts: the run's conversation rows rendered
through the model's chat template (services/trainer/sft.py), or with `sft.from_run` that
run's stored trajectories with reward >= `sft.min_reward`, exactly as recorded. The source
run has ended (the gateway checks), so a restarted trainer loads the same examples, and
because batches follow from the step number, it resumes at the step after its checkpoint
with nothing trained twice. A dataset that cannot be trained on (empty, a conversation that
does not render) fails the run with the reason: waiting cannot fix it.

No rollouts are asked for: the gateway's pacer publishes only the run's evaluations
(`eval_every`), which inference serves with the versions published here.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

import structlog

from shared.faults import NotFound, PermanentRunError
from shared.messages import Group, StepMetrics
from shared.models import load_tokenizer, resolve_model, stop_token_ids
from shared.store_api import StoreClient
from services.trainer.learner import StepResult
from services.trainer.progress import get_run
from services.trainer.run import RunTrainer
from services.trainer.samples import Sample
from services.trainer.sft import ConversationError, render_conversations, trajectory_samples

log = structlog.get_logger("trainer.sft")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Example order of one epoch: a seeded shuffle, the same on every restart."""
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}:sft:{epoch}").shuffle(order)
    return order


def step_indices(n: int, batch_size: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """The examples of optimizer step `step` (0-based): positions [step*B, (step+1)*B) of the
    epochs laid end to end, each epoch in its own seeded order."""
    out: list[int] = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, row = divmod(position, n)
        out.append(epoch_order(n, seed, epoch, shuffle)[row])
    return out


class SftRunTrainer(RunTrainer):
    """Trains one `algorithm: sft` run until it finishes, is cancelled, or the service stops."""

    examples: list[Sample]

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: every example of every epoch, in batches (at least one)."""
        n = len(self.examples) * self.cfg.training.epochs
        steps = max(1, n // self.train_cfg.batch_size)
        return min(steps, self.train_cfg.max_steps) if self.train_cfg.max_steps else steps

    def _finished(self) -> bool:
        return self.counters.step >= self.total_steps

    async def train(self) -> None:
        self.examples = []
        if not await self._begin():
            return
        self.examples = await self._load_examples()
        # The run's size counted what it was made from (conversations, trajectories); its steps
        # are the examples', which progress reports from here on.
        self.run = self.run.model_copy(update={"total_steps": self.total_steps})
        log.info("sft examples", run_id=self.run.run_id, examples=len(self.examples), steps=self.total_steps,
                 source=self.cfg.sft.from_run or "dataset")  # fmt: skip
        while not self._finished():
            if self.stop.is_set() or self.cancelled:
                return
            await self._sft_step()
            await self._check_state()
        await self._finish()

    async def _load_examples(self) -> list[Sample]:
        store = StoreClient(self.bus, self.settings.store_timeout_s)
        source = self.cfg.sft.from_run
        if source is not None:
            # Only what was stored before this run was made: an ended run can still receive a
            # straggler, and a resumed trainer must train the very same examples.
            trajectories = await store.get_run_trajectories(source, self.cfg.sft.min_reward, self.run.created_at)
            assert self.learner is not None
            for t in trajectories:
                alone = Group(run_id=t.run_id, group_id=t.group_id, task_id=t.task_id, trajectories=[t])
                bad = self.learner.out_of_vocabulary(alone)
                if bad is not None:
                    raise PermanentRunError(f"sft.from_run: {bad} (another model's tokens?)")
            samples = trajectory_samples(trajectories, self.roles)
            if not samples:
                floor = "" if self.cfg.sft.min_reward is None else f" with reward >= {self.cfg.sft.min_reward}"
                raise PermanentRunError(
                    f"sft.from_run: run {source!r} has no stored ok trajectory{floor} with tokens of the trained "
                    f"roles ({self.cfg.trained_roles!r}): nothing to train on"
                )
            return samples
        rows = (await get_run(self.bus, self.run.run_id, self.settings.store_timeout_s)).config.dataset
        if not rows and self.cfg.dataset_name:
            try:
                rows = await store.get_dataset(self.cfg.dataset_name)
            except NotFound as exc:
                raise PermanentRunError(f"sft dataset {self.cfg.dataset_name!r}: {exc}") from exc
        try:
            return await asyncio.to_thread(self._render, rows)
        except ValueError as exc:  # ConversationError included: the data, not the system
            raise PermanentRunError(f"sft dataset: {exc}") from exc

    def _render(self, rows: list[dict]) -> list[Sample]:  # type: ignore[type-arg]
        assert self.learner is not None
        tokenizer = load_tokenizer(resolve_model(self.cfg.model, self.settings.model_dir))
        stops = stop_token_ids(self.learner.model, tokenizer)
        if not stops:
            raise ConversationError(f"model {self.cfg.model!r} names no stop token: assistant turns would never end")
        return render_conversations(tokenizer, rows, stops)

    async def _sft_step(self) -> None:
        assert self.learner is not None
        c = self.counters
        batch = [self.examples[i] for i in step_indices(len(self.examples), self.train_cfg.batch_size, c.step, self.cfg.seed, self.cfg.shuffle)]
        started = time.perf_counter()
        result: StepResult = await asyncio.to_thread(self.learner.sft_step, batch)
        elapsed = time.perf_counter() - started
        c.step += 1
        c.groups_consumed += len(batch)
        c.groups_trained += len(batch)
        sync = self._advance(result)
        values = {k: float(v) for k, v in result.metrics.items() if math.isfinite(v)}
        values["step_time_s"] = elapsed
        values["tokens_per_s"] = values.get("tokens", 0.0) / elapsed if elapsed > 0 else 0.0
        values["epoch"] = c.step * self.train_cfg.batch_size / len(self.examples)
        metrics = StepMetrics(
            run_id=self.run.run_id,
            step=c.step,
            version=c.version,
            group_ids=[],
            values=values,
            trainer_id=self.settings.trainer_id,
        )
        # Progress is rate-limited between syncs: sft steps are fast, and pacing waits on nothing here.
        await self._record(metrics, sync, force_progress=sync)
        if sync:
            log.info("sft step", run_id=self.run.run_id, step=c.step, version=c.version,
                     loss=round(values.get("sft_loss", math.nan), 4), seconds=round(elapsed, 3))  # fmt: skip
