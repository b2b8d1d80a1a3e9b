"""The bus's consumers under faults, against a real nats-server: a server restart (same store
dir and a fresh one), a dead-letter publish that fails, transient failures that must not count
toward poison, handlers rejecting single messages, and the DLQ consumer never re-dead-lettering."""

import asyncio
import shutil

from shared import subjects
from shared.bus import Bus, ConsumerSpec, Delivery, PullConsumer, TransientError
from shared.messages import DeadLetter, Trajectory
from services.cli.nats_server import NatsServer
from tests.support.waiting import wait_until
from tests.support.factories import make_trajectory
from tests.support.streams import dead_letters


def consumer(bus: Bus, handler, *, poison_after: int = 3) -> PullConsumer:
    spec = ConsumerSpec(
        stream=subjects.STREAM_TRAJECTORIES,
        durable="test",
        filter_subject=subjects.STREAM_SUBJECTS[subjects.STREAM_TRAJECTORIES],
        ack_wait_s=5.0,
        poison_after=poison_after,
        retry_delay_s=0.05,
    )
    return PullConsumer(bus=bus, spec=spec, model=Trajectory, handler=handler, batch=16, fetch_timeout_s=0.2)


async def publish_n(bus: Bus, prefix: str, n: int) -> None:
    items = [make_trajectory(f"{prefix}{i}.0") for i in range(n)]
    await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in items)


async def publish_when_up(bus: Bus, prefix: str, n: int, timeout_s: float = 30.0) -> None:
    """Publish once the client has reconnected and JetStream answers (it may 503 for a moment)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await publish_n(bus, prefix, n)
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def run_through_restart(bus: Bus, nats_server: NatsServer, fresh_store: bool) -> None:
    seen: set[str] = set()

    async def handler(batch: list[Delivery[Trajectory]]) -> None:
        seen.update(d.value.rollout_id for d in batch)

    stop = asyncio.Event()
    task = asyncio.create_task(consumer(bus, handler).run(stop))
    try:
        await publish_n(bus, "before", 5)
        await wait_until(lambda: len(seen), expect=5)
        nats_server.stop()
        if fresh_store:  # the server comes back knowing no stream and no consumer
            shutil.rmtree(nats_server.store_dir / "jetstream", ignore_errors=True)
        await asyncio.sleep(1.0)  # the consumer's fetches fail meanwhile
        nats_server.start()
        await wait_until(lambda: bus.nc.is_connected, timeout_s=30)
        if fresh_store:
            # The consumer recreates its own stream; publishes need it to exist.
            await wait_until(lambda: _stream_exists(bus, subjects.STREAM_TRAJECTORIES), timeout_s=30)
        await publish_when_up(bus, "after", 5)
        await wait_until(lambda: sum(r.startswith("after") for r in seen), expect=5, timeout_s=30)
        assert not task.done(), "the consumer loop must survive the restart"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def _stream_exists(bus: Bus, name: str) -> bool:
    try:
        await bus.js.stream_info(name)
        return True
    except Exception:
        return False


async def test_consumer_survives_server_restart(bus: Bus, nats_server: NatsServer):
    await run_through_restart(bus, nats_server, fresh_store=False)


async def test_consumer_survives_restart_with_fresh_store_dir(bus: Bus, nats_server: NatsServer):
    await run_through_restart(bus, nats_server, fresh_store=True)


async def test_transient_failures_do_not_count_toward_poison(bus: Bus):
    """After an outage (many transient naks, each a delivery) one real failure must not poison."""
    calls = 0

    async def handler(batch: list[Delivery[Trajectory]]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 6:
            raise TransientError("database down")
        if calls == 7:
            raise RuntimeError("one real failure")

    stop = asyncio.Event()
    task = asyncio.create_task(consumer(bus, handler, poison_after=2).run(stop))
    await publish_n(bus, "t", 1)
    await wait_until(lambda: calls >= 8, timeout_s=20)
    await asyncio.sleep(0.3)
    stop.set()
    await task
    assert await dead_letters(bus) == []


async def test_rejected_messages_are_dead_lettered_and_the_rest_acked(bus: Bus):
    handled: list[str] = []

    async def handler(batch: list[Delivery[Trajectory]]) -> None:
        for d in batch:
            if d.value.rollout_id == "bad0.0":
                d.reject("the database refuses this row")
            else:
                handled.append(d.value.rollout_id)

    stop = asyncio.Event()
    task = asyncio.create_task(consumer(bus, handler).run(stop))
    await publish_n(bus, "good", 4)
    await publish_n(bus, "bad", 1)
    letters = await wait_until(lambda: dead_letters(bus), timeout_s=20)
    stop.set()
    await task
    assert len(letters) == 1 and letters[0].reason == "the database refuses this row"
    assert Trajectory.decode(letters[0].data).rollout_id == "bad0.0"
    assert sorted(set(handled)) == [f"good{i}.0" for i in range(4)]
    info = await bus.js.consumer_info(subjects.STREAM_TRAJECTORIES, "test")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_failed_dead_letter_publish_retries_instead_of_crashing(bus: Bus):
    """With no DLQ stream the dead-letter publish fails: the consumer lives on and the message
    comes back; once the DLQ exists again the letter is written."""
    await bus.js.delete_stream(subjects.STREAM_DLQ)
    stop = asyncio.Event()

    async def handler(batch: list[Delivery[Trajectory]]) -> None:
        return None

    task = asyncio.create_task(consumer(bus, handler).run(stop))
    await bus.nc.publish(subjects.trajectories("r"), b"\xc1 not msgpack")  # core publish: no ack to wait for
    await asyncio.sleep(1.5)  # several failed dead-letter publishes
    assert not task.done()
    await bus.ensure_topology()
    letters = await wait_until(lambda: dead_letters(bus), timeout_s=20)
    stop.set()
    await task
    assert letters[0].data == b"\xc1 not msgpack" and "not MessagePack" in letters[0].reason


async def test_dlq_consumer_never_dead_letters_a_dead_letter(bus: Bus):
    """The DLQ's own consumer: a letter whose handler keeps failing is retried (slowly), never
    published to the DLQ again (which would feed the DLQ from itself during a database outage)."""
    calls = 0

    async def handler(batch: list[Delivery[DeadLetter]]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("cannot store")

    spec = ConsumerSpec(
        stream=subjects.STREAM_DLQ,
        durable="dlq-test",
        filter_subject=subjects.STREAM_SUBJECTS[subjects.STREAM_DLQ],
        poison_after=2,
        retry_delay_s=0.05,
        dead_letter=False,
    )
    c = PullConsumer(bus=bus, spec=spec, model=DeadLetter, handler=handler, batch=8, fetch_timeout_s=0.2)
    letter = DeadLetter(stream="TRAJECTORIES", subject="x", consumer="c", reason="r", data=b"", stream_seq=1)
    await bus.publish(subjects.dlq("TRAJECTORIES"), letter, "TRAJECTORIES:1")
    stop = asyncio.Event()
    task = asyncio.create_task(c.run(stop))
    await wait_until(lambda: calls >= 4, timeout_s=20)  # past poison_after: still retried
    stop.set()
    await task
    assert (await bus.js.stream_info(subjects.STREAM_DLQ)).state.messages == 1  # nothing added
    info = await bus.js.consumer_info(subjects.STREAM_DLQ, "dlq-test")
    assert info.num_ack_pending + info.num_pending + info.num_redelivered >= 1  # not acked away
