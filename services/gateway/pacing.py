"""Run pacing: publish each training run's rollout requests epoch by epoch, no faster than the
staleness bound allows.

The AReaL admission rule: groups published <= groups consumed by the trainer +
(max_staleness + 1) x batch_size. A request published under that bound is sampled by a policy
at most `max_staleness` versions behind the one that trains on it. The trainer's progress is
read from the policy KV; the cursor (epoch, row, groups published) is stored through the
store after every publication, so a restarted gateway resumes where it stopped. One gateway
holds a run's pacing lease at a time.

The pacer supervises itself: a failing tick is retried with bounded backoff and never changes
durable state (the cursor is saved only after its requests are published); a transient fault
(the store, its database or NATS restarting) is waited out, anything else is logged with its
traceback and the loop carries on the same way. `/readyz` reports how long it has been failing.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable

import structlog

from shared import subjects
from shared.bus import Bus
from shared.faults import StoreError, is_transient
from shared.lease import Lease
from shared.messages import RUN_ACTIVE, PaceCursor, RunConfig, RunView, TaskSpec, TrainerProgress
from shared.store_api import StoreClient
from services.gateway.evals import eval_tasks
from services.gateway.submit import submit

log = structlog.get_logger("gateway.pacing")

# ListRuns' largest page size: the client pages on until every live run is listed.
_ALL_RUNS = 10000


def task_id(run_id: str, epoch: int, row: int) -> str:
    """Deterministic, so a republication after a crash is deduplicated by the store and the stream."""
    return f"{run_id}-e{epoch}-r{row}"


def epoch_order(rows: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Row order of one epoch: a seeded shuffle, the same on every gateway and every restart."""
    order = list(range(rows))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def allowance(config: RunConfig, cursor: PaceCursor, groups_consumed: int) -> int:
    """How many more groups may be published now without breaking the staleness bound."""
    window = (config.max_staleness + 1) * config.training.batch_size
    return groups_consumed + window - cursor.groups_published


def next_tasks(config: RunConfig, rows: list[dict], cursor: PaceCursor, n: int) -> tuple[PaceCursor, list[TaskSpec]]:
    """The next `n` tasks after `cursor` (fewer at the end of the last epoch) and the cursor after them."""
    epoch, row, published = cursor.epoch, cursor.row, cursor.groups_published
    specs: list[TaskSpec] = []
    while len(specs) < n and epoch < config.training.epochs:
        order = epoch_order(len(rows), config.seed, epoch, config.shuffle)
        while len(specs) < n and row < len(order):
            index = order[row]
            specs.append(
                TaskSpec(
                    task_id=task_id(config.run_id, epoch, index),
                    run_id=config.run_id,
                    agent=config.agent,
                    input=rows[index],
                    group_size=config.training.group_size,
                    sampling=config.sampling,
                    timeout_s=config.timeout_s,
                )
            )
            row += 1
        if row >= len(order):
            epoch, row = epoch + 1, 0
    done = epoch >= config.training.epochs
    after = cursor.model_copy(update={"epoch": epoch, "row": row, "groups_published": published + len(specs), "done": done})
    return after, specs


def has_eval_schedule(config: RunConfig) -> bool:
    return bool(config.eval_every and config.eval_dataset)


def eval_due(config: RunConfig, cursor: PaceCursor, version: int, final: bool = False) -> bool:
    """Whether a periodic evaluation is due at `version`; with `final` (the run just finished),
    whether its last version still lacks one."""
    if not has_eval_schedule(config):
        return False
    return version != cursor.last_eval if final else version >= cursor.next_eval


async def read_progress(bus: Bus, run_id: str) -> TrainerProgress | None:
    value = await bus.kv_value(subjects.KV_POLICY, subjects.progress_key(run_id))
    return TrainerProgress.decode(value) if value is not None else None


async def purge_tasks(bus: Bus, run_id: str, evals: bool = False) -> None:
    """Drop a finished or cancelled run's queued training requests (and with `evals`, its
    evaluation requests) so workers do not run them for nothing."""
    await bus.js.purge_stream(subjects.STREAM_TASKS, subject=subjects.tasks(run_id))
    if evals:
        await bus.js.purge_stream(subjects.STREAM_TASKS, subject=subjects.tasks(run_id, eval=True))


@dataclass
class Pacer:
    bus: Bus
    store: StoreClient
    interval_s: float = 0.25
    max_backoff_s: float = 10.0
    holder: str = field(default_factory=lambda: f"gateway-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Since when ticks have been failing (monotonic), and why; None while they succeed.
    failing_since: float | None = None
    last_error: str | None = None
    # Per-run state, bounded by the live training runs: a run's entries go when it ends
    # (`_forget`), and a dataset's cached rows when no live run reads it (`tick`).
    _leases: dict[str, Lease] = field(default_factory=dict)
    _renewed: dict[str, float] = field(default_factory=dict)
    _rows: dict[str, list[dict]] = field(default_factory=dict)
    # Full configs (inline rows included) of the runs paced here; a run's config never changes.
    _configs: dict[str, RunConfig] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop`; a failed tick is logged and retried after a bounded backoff."""
        failures = 0
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except Exception as exc:  # supervised: the loop must outlive any one failure
                    failures += 1
                    self._failed(exc, failures)
                else:
                    failures, self.failing_since, self.last_error = 0, None, None
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=self._delay(failures))
                except asyncio.TimeoutError:
                    pass
        finally:
            for lease in self._leases.values():
                try:
                    await lease.release()
                except Exception as exc:  # NATS gone at shutdown: the lease expires by its TTL
                    log.warning("pacing lease not released", error=str(exc))

    def failing_for(self) -> float:
        """Seconds ticks have been failing without a success in between (0 while they succeed)."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

    def _failed(self, exc: Exception, failures: int) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.last_error = f"{type(exc).__name__}: {exc}"
        if is_transient(exc):
            log.warning("pacing waits for the store / NATS", error=self.last_error, failures=failures)
        else:
            log.exception("pacing tick failed; retrying with backoff", failures=failures)

    def _delay(self, failures: int) -> float:
        if failures == 0:
            return self.interval_s
        # Exponential with jitter, bounded: gateways restarted together do not retry in step.
        return min(self.interval_s * 2 ** min(failures, 20), self.max_backoff_s) * random.uniform(0.5, 1.0)

    async def tick(self) -> None:
        live = {
            r.run_id: r
            for r in await self.store.list_runs(states=list(RUN_ACTIVE), limit=_ALL_RUNS)
            if r.config.mode == "train"
        }
        for run_id in list(self._leases):
            if run_id not in live:  # finished or cancelled since the last tick
                await self._for_run(run_id, self._final_eval(run_id))
                await self._forget(run_id)
        for run_id in self._configs.keys() - live.keys():
            del self._configs[run_id]
        # Cached datasets: only those a live run reads (bounded by the live runs, not by history).
        for name in self._rows.keys() - {r.config.dataset_name for r in live.values()}:
            del self._rows[name]
        for run in live.values():
            if run.state == "running":
                await self._for_run(run.run_id, self.pace(run))

    async def _for_run(self, run_id: str, step: Awaitable[None]) -> None:
        """Run one run's step; the store refusing it (e.g. a task too big to store) is logged and
        the other runs go on. A transient fault stops the tick: the store is down for every run."""
        try:
            await step
        except StoreError as exc:
            if is_transient(exc):
                raise
            log.warning("pacing refused for this run", run_id=run_id, error=str(exc))

    async def pace(self, run: RunView) -> None:
        # The listing leaves eval rows out: `eval_every` alone says an evaluation may still be due.
        if run.cursor.done and not run.config.eval_every:
            return
        if not await self._hold(run.run_id):
            return
        run = await self._with_config(run)
        if run.cursor.done and not has_eval_schedule(run.config):
            return
        progress = await read_progress(self.bus, run.run_id)
        if progress is None and run.config.init_from is not None:
            # Until its trainer published version 0 (the init_from weights), inference would
            # serve the base model under that version: nothing is asked for before.
            return
        version = progress.version if progress else 0
        cursor = await self._evaluate(run, version)
        n = allowance(run.config, cursor, progress.groups_consumed if progress else 0)
        specs: list[TaskSpec] = []
        if n > 0 and not cursor.done and run.config.asks_rollouts:  # an sft run asks only for evaluations
            rows = await self._dataset(run)
            cursor, specs = next_tasks(run.config, rows, cursor, n)
            if specs:
                await submit(self.bus, self.store, specs, min_version=version)
        if cursor != run.cursor:
            await self.store.save_cursor(run.run_id, cursor)
        if specs:
            log.info("published", run_id=run.run_id, groups=len(specs), published=cursor.groups_published, done=cursor.done)

    async def _with_config(self, run: RunView) -> RunView:
        """The listed run with its whole config: listings leave inline rows out."""
        config = self._configs.get(run.run_id)
        if config is None:
            config = self._configs[run.run_id] = (await self.store.get_run(run.run_id)).config
        return run.model_copy(update={"config": config})

    async def _evaluate(self, run: RunView, version: int, final: bool = False) -> PaceCursor:
        """Publish the periodic evaluation that is due at `version` (with `final`: the run's last
        version, unless already evaluated); the cursor after it."""
        if not eval_due(run.config, run.cursor, version, final):
            return run.cursor
        specs = eval_tasks(run.config, run.config.eval_dataset, version)
        await submit(self.bus, self.store, specs, min_version=version)
        log.info("evaluation published", run_id=run.run_id, version=version, tasks=len(specs), final=final)
        every = run.config.eval_every
        return run.cursor.model_copy(update={"next_eval": (version // every + 1) * every, "last_eval": version})

    async def _final_eval(self, run_id: str) -> None:
        """A run that just finished gets its last version evaluated while its weights are still
        the ones inference serves (periodic evaluations only land on multiples of eval_every)."""
        lease = self._leases.get(run_id)
        if lease is None or not lease.held:
            return
        run = await self.store.get_run(run_id)
        if run.state != "finished" or not has_eval_schedule(run.config):
            return
        progress = await read_progress(self.bus, run_id)
        cursor = await self._evaluate(run, progress.version if progress else 0, final=True)
        if cursor != run.cursor:
            await self.store.save_cursor(run_id, cursor)

    async def _hold(self, run_id: str) -> bool:
        lease = self._leases.get(run_id)
        if lease is None:
            lease = self._leases[run_id] = await Lease.open(self.bus, "pace", run_id, self.holder)
        # Renew well inside the TTL; a lease we hold and renewed recently needs no KV write.
        if lease.held and time.monotonic() - self._renewed.get(run_id, 0.0) < subjects.LEASE_TTL_S / 4:
            return True
        held = await lease.renew()
        if held:
            self._renewed[run_id] = time.monotonic()
        return held

    async def _dataset(self, run: RunView) -> list[dict]:
        if run.config.dataset:
            return run.config.dataset
        name = run.config.dataset_name or ""
        if name not in self._rows:
            self._rows[name] = await self.store.get_dataset(name)
        return self._rows[name]

    async def _forget(self, run_id: str) -> None:
        lease = self._leases.pop(run_id)
        if lease.held:
            await purge_tasks(self.bus, run_id)  # training requests only: queued evaluations still run
            await lease.release()
        self._renewed.pop(run_id, None)
        self._configs.pop(run_id, None)
