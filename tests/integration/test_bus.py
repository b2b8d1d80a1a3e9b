"""The bus against a real nats-server: dedupe, ack-after-effect, DLQ, keep-alive, transient retry."""

import asyncio

import msgpack

import pytest

from shared import subjects
from shared.bus import FAILURE_HEADER, Bus, ConsumerSpec, Delivery, PullConsumer, TransientError
from shared.config import ServiceSettings
from shared.messages import Failure, Ping
from shared.store_api import Stored
from tests.support.waiting import wait_until
from tests.support.factories import make_trajectory
from tests.support.streams import dead_letters
from shared.messages import Trajectory


async def stream_count(bus: Bus, stream: str) -> int:
    return (await bus.js.stream_info(stream)).state.messages


def consumer(bus: Bus, handler, *, ack_wait_s: float = 5.0, per_message: bool = False, poison_after: int = 3) -> PullConsumer:
    return PullConsumer(
        bus=bus,
        spec=ConsumerSpec(
            stream=subjects.STREAM_TRAJECTORIES,
            durable="test",
            filter_subject=subjects.STREAM_SUBJECTS[subjects.STREAM_TRAJECTORIES],
            ack_wait_s=ack_wait_s,
            poison_after=poison_after,
            retry_delay_s=0.05,
        ),
        model=Trajectory,
        handler=handler,
        batch=16,
        per_message=per_message,
        max_in_flight=32,
        fetch_timeout_s=0.2,
    )


async def test_topology_is_idempotent(bus: Bus):
    await bus.ensure_topology()
    await bus.ensure_topology()
    names = {s.config.name for s in await bus.js.streams_info()}
    assert {"TASKS", "TRAJECTORIES", "GROUPS", "METRICS", "DLQ"} <= names


async def test_same_msg_id_is_stored_once(bus: Bus):
    t = make_trajectory()
    first = await bus.publish(subjects.trajectories("r"), t, t.msg_id())
    again = await bus.publish(subjects.trajectories("r"), t, t.msg_id())
    assert again.duplicate and not first.duplicate
    assert await stream_count(bus, subjects.STREAM_TRAJECTORIES) == 1


async def test_consumer_acks_after_handler_and_dead_letters_garbage(bus: Bus):
    seen: list[str] = []

    async def handler(batch: list[Delivery[Trajectory]]) -> None:
        seen.extend(d.value.rollout_id for d in batch)

    stop = asyncio.Event()
    task = asyncio.create_task(consumer(bus, handler).run(stop))
    await bus.publish(subjects.trajectories("r"), make_trajectory("a.0"), "a.0")
    await bus.js.publish(subjects.trajectories("r"), msgpack.packb([1, 2, 3]))
    await bus.publish(subjects.trajectories("r"), make_trajectory("b.0"), "b.0")
    await wait_until(lambda: len(seen) == 2)
    stop.set()
    await task
    letters = await dead_letters(bus)
    assert len(letters) == 1 and "expected a map" in letters[0].reason
    assert letters[0].stream == "TRAJECTORIES" and letters[0].data == msgpack.packb([1, 2, 3])
    info = await bus.js.consumer_info(subjects.STREAM_TRAJECTORIES, "test")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_poison_message_is_dead_lettered_and_others_go_on(bus: Bus):
    ok: list[str] = []

    async def handler(batch: list[Delivery[Trajectory]]) -> None:
        for d in batch:
            if d.value.rollout_id == "poison.0":
                raise ValueError("cannot handle this one")
        ok.extend(d.value.rollout_id for d in batch)

    stop = asyncio.Event()
    task = asyncio.create_task(consumer(bus, handler, poison_after=3).run(stop))
    for rid in ("a.0", "poison.0", "b.0"):
        await bus.publish(subjects.trajectories("r"), make_trajectory(rid), rid)
    letters = await wait_until(lambda: dead_letters(bus), timeout_s=20)
    stop.set()
    await task
    assert sorted(ok) == ["a.0", "b.0"]
    assert "cannot handle this one" in letters[0].reason and letters[0].delivered == 3


async def test_transient_failures_retry_without_dead_lettering(bus: Bus):
    calls = 0

    async def handler(batch: list[Delivery[Trajectory]]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:  # more than poison_after: transient failures must not count
            raise TransientError("database down")

    stop = asyncio.Event()
    task = asyncio.create_task(consumer(bus, handler, poison_after=2).run(stop))
    await bus.publish(subjects.trajectories("r"), make_trajectory(), "x")
    await wait_until(lambda: calls >= 6, timeout_s=20)
    stop.set()
    await task
    assert await dead_letters(bus) == []


async def test_long_handler_is_kept_alive_not_redelivered(bus: Bus):
    calls = 0

    async def handler(batch: list[Delivery[Trajectory]]) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3.0)  # three times ack_wait

    stop = asyncio.Event()
    task = asyncio.create_task(consumer(bus, handler, ack_wait_s=1.0, per_message=True).run(stop))
    await bus.publish(subjects.trajectories("r"), make_trajectory(), "x")
    await wait_until(lambda: calls == 1)
    await asyncio.sleep(4.0)
    stop.set()
    await task
    assert calls == 1


async def test_request_reply_bad_request_gets_400(bus: Bus):
    async def handler(_: Ping) -> Stored:
        return Stored(stored=1)

    await bus.serve("relayrl.rpc.test", "q", Ping, handler)
    assert (await bus.request("relayrl.rpc.test", Ping(), Stored)) == Stored(stored=1)
    raw = await bus.nc.request("relayrl.rpc.test", b"garbage", timeout=2)
    assert raw.headers and FAILURE_HEADER in raw.headers
    reply = Failure.decode(raw.data)
    assert reply.code == 400 and "MessagePack" in reply.error
    with pytest.raises(TimeoutError):
        await bus.request("relayrl.rpc.nobody", Ping(), Stored, timeout=0.5)


async def test_a_failing_handler_answers_transient_or_permanent(bus: Bus):
    async def down(_: Ping) -> Stored:
        raise ConnectionRefusedError("database restarting")

    async def bug(_: Ping) -> Stored:
        raise KeyError("oops")

    await bus.serve("relayrl.rpc.down", "q", Ping, down)
    await bus.serve("relayrl.rpc.bug", "q", Ping, bug)
    transient = await bus.request("relayrl.rpc.down", Ping(), Stored)
    assert isinstance(transient, Failure) and transient.code == 503 and transient.transient
    permanent = await bus.request("relayrl.rpc.bug", Ping(), Stored)
    assert isinstance(permanent, Failure) and permanent.code == 500 and not permanent.transient


async def test_connect_gives_up_after_its_attempts() -> None:
    import time

    from services.cli.nats_server import free_port

    cfg = ServiceSettings(nats_url=f"nats://127.0.0.1:{free_port()}", nats_connect_attempts=2, nats_connect_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="could not connect"):
        await Bus.connect(cfg, "test")
    assert time.monotonic() - started < 10
