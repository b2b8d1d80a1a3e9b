"""The trainer's source of groups: one durable per run on GROUPS (live and replayed subjects).

A group too large for one message arrives by reference and is fetched from the store
(`groups_in.resolve_group`). Groups are held un-acked, and kept alive with `in_progress()`,
until the checkpoint that records them as consumed is on disk; only then are they acked. A
trainer killed at any point therefore gets back exactly the groups its last checkpoint did
not cover. GROUPS is a work queue, so the ack is also what removes a group from the bus.

Bounds: at most `fetch_batch` groups are buffered, and the groups held un-acked are those
consumed since the last checkpoint: `checkpoint_every` x `batch_size` kept groups plus the
dropped ones among them, which pacing bounds in turn (at most `max_staleness + 1` batches
are published ahead of consumption).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import api as js_api

from shared import subjects
from shared.bus import Bus
from shared.faults import StoreError, StoreUnavailable
from shared.messages import DecodeError, Group, decode_group
from services.trainer.groups_in import resolve_group

log = structlog.get_logger("trainer.feed")


@dataclass(frozen=True)
class Unusable:
    """A group the trainer can never have whole (its reference names members the store lacks):
    consumed and dropped with `reason`, so the run still finishes by data."""

    group_id: str
    reason: str


class GroupFeed:
    def __init__(self, bus: Bus, run_id: str, ack_wait_s: float, fetch_batch: int = 64) -> None:
        self.bus = bus
        self.run_id = run_id
        self.durable = subjects.trainer_durable(run_id)
        self.ack_wait_s = ack_wait_s
        self.fetch_batch = fetch_batch
        self._sub = None
        self._buffer: deque[Msg] = deque()
        self._held: list[Msg] = []
        self._keepalive: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A nats-server that came back without its store (a new node, a lost volume) has no
        # GROUPS stream: make it, as every service does at start, before the durable on it.
        await self.bus.ensure_stream_named(subjects.STREAM_GROUPS)
        await self.bus.js.add_consumer(
            subjects.STREAM_GROUPS,
            js_api.ConsumerConfig(
                durable_name=self.durable,
                filter_subjects=[subjects.groups(self.run_id), subjects.groups(self.run_id, replay=True)],
                ack_policy=js_api.AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait_s,
                max_deliver=-1,
                max_ack_pending=-1,  # the trainer holds whole batches across steps
                deliver_policy=js_api.DeliverPolicy.ALL,
            ),
        )
        self._sub = await self.bus.js.pull_subscribe_bind(durable=self.durable, stream=subjects.STREAM_GROUPS)
        self._keepalive = asyncio.create_task(self._keep_alive())

    async def next(self, timeout_s: float) -> tuple[Msg, Group | Unusable] | None:
        """The next group, or None if none arrived within the timeout. A reference to a group
        the store cannot give whole comes back as `Unusable` (the run counts it as dropped);
        a message that names no group at all is only dead-lettered."""
        while True:
            if not self._buffer:
                assert self._sub is not None
                try:
                    self._buffer.extend(await self._sub.fetch(self.fetch_batch, timeout=timeout_s))
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    return None
            msg = self._buffer.popleft()
            try:
                return msg, await resolve_group(self.bus, msg.data)
            except StoreUnavailable as exc:  # a group by reference and no store: later, unchanged
                log.warning("cannot fetch a group's members; will retry", run_id=self.run_id, error=str(exc))
                await msg.nak(delay=1.0)
                return None
            except DecodeError as exc:  # not a group: nothing to count it against
                await self.reject(msg, str(exc))
            except StoreError as exc:  # a reference the store cannot resolve whole: recorded, and dropped
                ref = decode_group(msg.data)
                await self.bus.dead_letter(subjects.STREAM_GROUPS, self.durable, msg, str(exc))
                return msg, Unusable(ref.group_id, f"bad data: {exc}")

    def hold(self, msg: Msg) -> None:
        """Keep `msg` un-acked (alive) until `ack_held()`."""
        self._held.append(msg)

    async def ack_held(self) -> None:
        held, self._held = self._held, []
        await asyncio.gather(*(m.ack_sync(timeout=self.bus.timeout) for m in held))

    async def ack(self, msg: Msg) -> None:
        await msg.ack_sync(timeout=self.bus.timeout)

    async def reject(self, msg: Msg, reason: str) -> None:
        """A group the trainer can never use: dead-lettered with the reason, then acked."""
        await self.bus.dead_letter(subjects.STREAM_GROUPS, self.durable, msg, reason)
        await msg.ack()

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        # Held (not covered by a checkpoint) and buffered messages: nak so they come back at
        # once, to this trainer's successor, not after ack_wait.
        for msg in [*self._held, *self._buffer]:
            try:
                await msg.nak()
            except nats.errors.Error:
                pass
        self._buffer.clear()
        self._held.clear()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(max(self.ack_wait_s / 3, 0.1))
            for msg in [*self._held, *self._buffer]:
                try:
                    await msg.in_progress()
                except nats.errors.Error:
                    pass
