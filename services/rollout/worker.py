"""The rollout worker: one rollout request in, one trajectory out, then ack.

A rollout that failed (error or timeout) while inference was unavailable past the capture
client's retries (overloaded: 503 `queue_full`; restarting; unreachable) failed for a reason
outside its task: it is not published as a failed sample but handed back (`TransientError`,
redelivered after the consumer's retry delay), up to its last attempt (`max_attempts`), which
records the failure with the reason. So overload costs time, never a silently lost rollout.

Per-rollout state (the context, its proxy entry, its OpenAI clients) lives only while the
rollout runs: at most `concurrency` rollouts at once (the consumer's max_in_flight), each
removed on every way out.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import structlog

from shared import subjects, telemetry
from shared.bus import Bus, ConsumerSpec, Delivery, PullConsumer, TransientError, wait_for_stop
from shared.config import require_secret
from shared.faults import is_transient
from shared.messages import AgentInfo, RolloutRequest, Trajectory, TrajectoryStatus
from services.rollout import registry
from services.rollout.capture import CaptureClient
from services.rollout.context import AgentContext
from services.rollout.proxy import CaptureProxy
from services.rollout.settings import RolloutSettings

log = structlog.get_logger("rollout")


class Worker:
    def __init__(self, bus: Bus, settings: RolloutSettings, http: httpx.AsyncClient) -> None:
        self.bus = bus
        self.settings = settings
        urls = settings.inference_url_list()
        self.client = (
            CaptureClient(
                http,
                urls,
                settings.inference_retries,
                backoff_s=settings.inference_backoff_s,
                backoff_max_s=settings.inference_backoff_max_s,
                token=require_secret(settings.inference_token, "inference_token", "inference's token"),
            )
            if urls
            else None
        )
        # Serves agents' OpenAI base URLs once started (`proxy.serve`, done by __main__).
        self.proxy = CaptureProxy(self.client)
        self.completed = 0
        self.sync_pool = ThreadPoolExecutor(settings.sync_agent_threads, thread_name_prefix="agent")

    async def register_agents(self) -> None:
        """Advertise this worker's agents so the gateway can refuse tasks for unknown ones."""
        kv = await self.bus.kv(subjects.KV_AGENTS)
        for name, spec in registry.all_agents().items():
            info = AgentInfo(name=name, description=spec.description, worker_id=self.settings.worker_id)
            await kv.put(name, info.encode())

    async def on_request(self, batch: list[Delivery[RolloutRequest]]) -> None:
        (delivery,) = batch  # per-message consumer
        req, attempt = delivery.value, delivery.delivered
        structlog.contextvars.bind_contextvars(run_id=req.run_id, rollout_id=req.rollout_id)
        log.debug("rollout started", agent=req.agent, attempt=attempt)
        try:
            with telemetry.span_from_headers("rollout", delivery.headers, rollout_id=req.rollout_id, agent=req.agent):
                traj = await self.run_rollout(req, attempt)
                await self._publish(traj)
        finally:
            structlog.contextvars.unbind_contextvars("run_id", "rollout_id")
        self.completed += 1
        log.debug("rollout done", status=traj.status, reward=traj.reward, attempt=traj.attempt, error=traj.error)

    async def _publish(self, traj: Trajectory) -> None:
        """Publish the finished trajectory, waiting out a NATS restart (bounded): the agent's
        work is not thrown away for a blip. Past the bound the request is retried later as a
        transient failure (never counted toward poison); the store keeps the first attempt."""
        delay, deadline = 0.2, time.monotonic() + self.settings.publish_patience_s
        while True:
            try:
                await self.bus.publish(subjects.trajectories(traj.run_id), traj, traj.msg_id())
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise TransientError(f"cannot publish trajectory {traj.rollout_id}: {exc}") from exc
                log.warning("trajectory publish failed; retrying", error=f"{type(exc).__name__}: {exc}", retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run_rollout(self, req: RolloutRequest, attempt: int) -> Trajectory:
        """Run the agent on `req` and build its trajectory (ok, error or timeout). Raises
        `TransientError` instead when it failed over an inference outage and has attempts left."""
        started = time.time()
        ctx = AgentContext(request=req, client=self.client, proxy=self.proxy)
        try:
            with self.proxy.track(ctx):
                status, reward, error = await self._run_agent(req, ctx, attempt)
        finally:
            await ctx.aclose()
        return Trajectory(
            **req.keys(),
            status=status,
            error=error,
            reward=reward,
            rewards=ctx.rewards,
            events=ctx.events,
            transitions=ctx.transitions,
            started_at=started,
            finished_at=time.time(),
            worker_id=self.settings.worker_id,
            attempt=attempt,
            trace_id=telemetry.current_trace_id(),
        )

    async def _run_agent(
        self, req: RolloutRequest, ctx: AgentContext, attempt: int
    ) -> tuple[TrajectoryStatus, float, str | None]:
        fill = self.settings.failure_reward
        if attempt > self.settings.max_attempts:
            # Earlier deliveries died with their workers; record the failure so the group completes.
            return "error", fill, f"gave up after {attempt - 1} deliveries (max_attempts={self.settings.max_attempts})"
        spec = registry.get(req.agent)
        if spec is None:
            return "error", fill, f"unknown agent {req.agent!r} on worker {self.settings.worker_id}"
        try:
            async with asyncio.timeout(req.timeout_s):  # unlike wait_for, no extra task per rollout
                value = await self._call(spec, ctx)
        except TimeoutError:
            self._retry_after_outage(ctx, attempt)
            return "timeout", fill, self._with_outage(f"agent exceeded its timeout of {req.timeout_s}s", ctx)
        except Exception as exc:  # the agent's failure is data, not a worker crash
            self._retry_after_outage(ctx, attempt)
            return "error", fill, f"{type(exc).__name__}: {exc}"[:2000]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "error", fill, f"agent returned a non-finite or non-numeric reward: {value!r}"[:2000]
        return "ok", float(value), None

    def _retry_after_outage(self, ctx: AgentContext, attempt: int) -> None:
        """Hand the request back (redelivered later) when it failed while inference was
        unavailable, unless this is its last attempt: then the failure is recorded."""
        outage = ctx.inference_outage
        if outage is not None and attempt < self.settings.max_attempts:
            raise TransientError(
                f"rollout {ctx.request.rollout_id} (attempt {attempt} of {self.settings.max_attempts}) failed while "
                f"inference was unavailable; it will run again: {outage}"
            )  # fmt: skip

    @staticmethod
    def _with_outage(error: str, ctx: AgentContext) -> str:
        if ctx.inference_outage is None:
            return error
        return f"{error}; inference was unavailable: {ctx.inference_outage}"[:2000]

    async def _call(self, spec: registry.RegisteredAgent, ctx: AgentContext) -> object:
        """Async agents run on the loop; sync ones in the worker's thread pool. A sync agent past
        its timeout cannot be interrupted: its thread runs on, but the rollout is over, so its
        later calls to the proxy get 404 and nothing more is recorded."""
        if spec.is_async:
            return await spec.fn(ctx)  # type: ignore[misc]
        return await asyncio.get_running_loop().run_in_executor(self.sync_pool, spec.fn, ctx)

    def consumer(self) -> PullConsumer[RolloutRequest]:
        return PullConsumer(
            bus=self.bus,
            spec=ConsumerSpec(
                stream=subjects.STREAM_TASKS,
                durable=subjects.CONSUMER_ROLLOUT,
                filter_subject=subjects.STREAM_SUBJECTS[subjects.STREAM_TASKS],
                ack_wait_s=self.settings.ack_wait_s,
            ),
            model=RolloutRequest,
            handler=self.on_request,
            batch=min(self.settings.concurrency, 256),
            per_message=True,
            max_in_flight=self.settings.concurrency,
        )

    async def report(self, stop: asyncio.Event, every_s: float = 10.0) -> None:
        """One info line per period instead of one per rollout (thousands per second)."""
        last, last_t = self.completed, time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=every_s)
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            if self.completed != last:
                rate = (self.completed - last) / (now - last_t)
                log.info("rollouts completed", total=self.completed, per_s=round(rate, 1))
            last, last_t = self.completed, now

    async def run(self, stop: asyncio.Event) -> None:
        await self.register_agents()
        try:
            await wait_for_stop(stop, self.consumer().run(stop), self.report(stop))
        finally:
            self.sync_pool.shutdown(wait=False, cancel_futures=True)
