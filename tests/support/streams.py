"""Reading what a test's services left on a stream.

relayrl's streams are work queues: one consumer per subject at a time, so a test reads through
a consumer of its own that it deletes when done (an ephemeral one would linger and refuse the
next reader). Reading does not ack unless asked: the messages stay for their real consumer.
"""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from nats.aio.msg import Msg
from nats.js import api as js_api

from shared import subjects
from shared.bus import Bus
from shared.messages import DeadLetter, Group


@asynccontextmanager
async def reader(bus: Bus, stream: str, subject: str) -> AsyncIterator[Any]:
    """A pull subscription on `subject` of `stream` through a consumer deleted on exit."""
    name = f"test-reader-{uuid.uuid4().hex[:8]}"
    await bus.js.add_consumer(
        stream,
        js_api.ConsumerConfig(
            name=name, filter_subject=subject, ack_policy=js_api.AckPolicy.EXPLICIT, inactive_threshold=60.0
        ),
    )
    sub = await bus.js.pull_subscribe_bind(consumer=name, stream=stream)
    try:
        yield sub
    finally:
        await sub.unsubscribe()
        await bus.js.delete_consumer(stream, name)


async def read_stream(bus: Bus, stream: str, subject: str, limit: int = 10_000, ack: bool = False) -> list[Msg]:
    """Up to `limit` messages on `subject` of `stream`, oldest first; with `ack`, consumed
    (a work queue then drops them)."""
    out: list[Msg] = []
    async with reader(bus, stream, subject) as sub:
        while len(out) < limit:
            try:
                msgs = await sub.fetch(min(256, limit - len(out)), timeout=0.5)
            except Exception:  # nats-py's fetch timeout: nothing more there
                break
            out.extend(msgs)
            if ack:
                for m in msgs:
                    await m.ack_sync()
    return out


async def dead_letters(bus: Bus) -> list[DeadLetter]:
    """Every dead letter on DLQ so far (up to 100), oldest first; [] when there is none.
    Only while no store consumes DLQ (a store moves them into SQL)."""
    msgs = await read_stream(bus, subjects.STREAM_DLQ, subjects.STREAM_SUBJECTS[subjects.STREAM_DLQ], limit=100)
    return [DeadLetter.decode(m.data) for m in msgs]


async def published_groups(bus: Bus, subject: str = subjects.STREAM_SUBJECTS[subjects.STREAM_GROUPS]) -> list[Group]:
    """Every group on `subject` (default: all of GROUPS), in stream order (left for the trainer)."""
    msgs = await read_stream(bus, subjects.STREAM_GROUPS, subject)
    return [Group.decode(m.data) for m in msgs]


async def stream_messages(bus: Bus, stream: str, subject: str | None = None) -> int:
    """Messages `stream` holds now (on `subject` only, when given)."""
    if subject is None:
        return (await bus.js.stream_info(stream)).state.messages
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())
