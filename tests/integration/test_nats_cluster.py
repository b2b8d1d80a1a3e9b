"""A 3-node JetStream cluster on loopback: R3 topology, and a stream leader SIGKILLed mid-run.

The promise under test (DESIGN.md, fault model): a NATS node can die and come back without
a message lost. Publishers retry with the same `Nats-Msg-Id` (the stream drops the
duplicate), the consumer may see a redelivery (an ack lost in the failover) and dedupes by
id, and the restarted node catches up from its peers. Measured numbers are printed
(`pytest -s`): publish gap across the failover, time to a new stream leader, catch-up time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import AsyncIterator, Iterator

import nats.errors
import pytest

from services.cli.nats_server import NatsCluster
from shared import retention, subjects
from shared.bus import Bus, ConsumerSpec, Delivery, PullConsumer
from shared.config import ServiceSettings
from shared.messages import Message
from tests.support.waiting import wait_until

REPLICAS = 3


class Numbered(Message):
    """A test message that carries only its id."""

    id: str


def _settings(cluster: NatsCluster, replicas: int) -> ServiceSettings:
    # Short request timeout: a publish stuck on a dead leader is retried sooner.
    return ServiceSettings(nats_url=cluster.url, js_replicas=replicas, log_format="console", request_timeout_s=2.0)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path / "nats", size=REPLICAS).start()
    yield c
    c.stop()


@pytest.fixture
async def cluster_bus(cluster: NatsCluster) -> AsyncIterator[Bus]:
    b = await Bus.connect(_settings(cluster, REPLICAS), "test")
    await b.ensure_topology()
    yield b
    await b.close()


TOPOLOGY_STREAMS = [s.name for s in retention.STREAMS] + [
    f"KV_{subjects.KV_POLICY}",
    f"KV_{subjects.KV_AGENTS}",
    f"KV_{subjects.KV_LEASES}",
    f"OBJ_{subjects.OBJ_WEIGHTS}",
]


async def _replicas(bus: Bus) -> dict[str, int]:
    return {name: (await bus.js.stream_info(name)).config.num_replicas or 1 for name in TOPOLOGY_STREAMS}


async def test_topology_is_replicated(cluster_bus: Bus) -> None:
    assert await _replicas(cluster_bus) == {name: REPLICAS for name in TOPOLOGY_STREAMS}
    info = await cluster_bus.js.stream_info(subjects.STREAM_TRAJECTORIES)
    assert info.cluster is not None and info.cluster.leader
    assert len(info.cluster.replicas or []) == REPLICAS - 1  # the peers besides the leader


async def test_replicas_are_raised_never_lowered(cluster: NatsCluster) -> None:
    one = await Bus.connect(_settings(cluster, 1), "r1")
    three = await Bus.connect(_settings(cluster, REPLICAS), "r3")
    try:
        await one.ensure_topology()
        assert set((await _replicas(one)).values()) == {1}
        await three.ensure_topology()  # an upgraded deployment raises existing streams and buckets
        assert set((await _replicas(one)).values()) == {REPLICAS}
        await one.ensure_topology()  # a service started without the setting must not shrink them
        assert set((await _replicas(one)).values()) == {REPLICAS}
    finally:
        await one.close()
        await three.close()


async def test_single_node_refuses_replicas_clearly(nats_url: str) -> None:
    bus = await Bus.connect(ServiceSettings(nats_url=nats_url, js_replicas=3, log_format="console"), "test")
    try:
        with pytest.raises(ValueError, match="RELAYRL_JS_REPLICAS=3"):
            await bus.ensure_topology()
    finally:
        await bus.close()


def _node_stream_last_seq(cluster: NatsCluster, name: str, stream: str) -> int | None:
    """The last sequence of `stream` as node `name` itself stores it (its own replica, from /jsz)."""
    try:
        jsz = cluster.node(name).monitor("/jsz?streams=true")
    except OSError:
        return None
    for account in jsz.get("account_details") or []:
        for s in account.get("stream_detail") or []:
            if s["name"] == stream:
                return int(s["state"]["last_seq"])
    return None


async def _messages(bus: Bus, stream: str) -> int:
    return (await bus.js.stream_info(stream)).state.messages


async def test_stream_leader_killed_mid_run_loses_nothing(cluster: NatsCluster, cluster_bus: Bus) -> None:
    bus = cluster_bus
    total, kill_at = 600, 200
    stream = subjects.STREAM_TRAJECTORIES
    subject = subjects.trajectories("cluster-test")
    seen: Counter[str] = Counter()

    async def handler(deliveries: list[Delivery[Numbered]]) -> None:
        seen.update(d.value.id for d in deliveries)

    consumer = PullConsumer(
        bus=bus,
        spec=ConsumerSpec(
            stream=stream,
            durable="cluster-test",
            filter_subject=subjects.STREAM_SUBJECTS[stream],
            # Short: an ack lost in the failover comes back (as a duplicate) within the test.
            ack_wait_s=3.0,
            retry_delay_s=0.05,
        ),
        model=Numbered,
        handler=handler,
        batch=32,
        fetch_timeout_s=0.5,
    )
    stop = asyncio.Event()
    consuming = asyncio.create_task(consumer.run(stop))

    leader = (await bus.js.stream_info(stream)).cluster.leader  # type: ignore[union-attr]
    assert leader
    meta_too = cluster.meta_leader() == leader  # then the JetStream meta leader is re-elected as well
    acked_at: list[float] = []
    retries = 0
    killed_at = 0.0
    try:
        for i in range(total):
            if i == kill_at:
                cluster.kill(leader)
                killed_at = time.monotonic()
            # At least once: the same msg id until acked, so a retry after a lost ack is dropped by the stream.
            while True:
                try:
                    await bus.publish(subject, Numbered(id=f"m-{i}"), msg_id=f"m-{i}")
                    break
                except (nats.errors.Error, asyncio.TimeoutError):
                    retries += 1
                    await asyncio.sleep(0.05)
            acked_at.append(time.monotonic())
            await asyncio.sleep(0.002)  # spread publishing so the kill lands mid-stream

        async def new_leader() -> str | None:
            try:
                got = (await bus.js.stream_info(stream)).cluster.leader  # type: ignore[union-attr]
            except (nats.errors.Error, asyncio.TimeoutError):
                return None
            return got if got and got != leader else None

        elected = await wait_until(new_leader, timeout_s=20)
        ids = {f"m-{i}" for i in range(total)}
        await wait_until(lambda: ids <= set(seen), timeout_s=30)
        assert set(seen) == ids, "a message arrived that was never published"
        info = await bus.js.stream_info(stream)
        # One sequence per stored message: a duplicate stored would take one more.
        assert info.state.last_seq == total, "the stream stored a message twice (msg-id dedupe failed)"
        # A work queue: what the consumer acked is gone.
        assert await wait_until(lambda: _messages(bus, stream), expect=0) == 0

        # The killed node comes back with its old store and catches up from the new leader.
        restart_t0 = time.monotonic()
        cluster.restart(leader)
        await wait_until(lambda: _node_stream_last_seq(cluster, leader, stream), timeout_s=30, expect=total)
        catch_up_s = time.monotonic() - restart_t0

        async def all_current() -> bool:
            c = (await bus.js.stream_info(stream)).cluster
            peers = c.replicas or [] if c else []
            return len(peers) == REPLICAS - 1 and all(p.current for p in peers)

        await wait_until(all_current, timeout_s=30)
        # Still one cluster: a message published now reaches the consumer.
        await bus.publish(subject, Numbered(id="after-restart"), msg_id="after-restart")
        await wait_until(lambda: seen["after-restart"] >= 1, timeout_s=15)
    finally:
        stop.set()
        await asyncio.wait_for(consuming, timeout=15)

    start = next(t for t in acked_at if t >= killed_at) if killed_at else 0.0
    gaps = [b - a for a, b in zip(acked_at, acked_at[1:])]
    dups = sum(n - 1 for n in seen.values() if n > 1)
    print(
        f"\nkilled stream leader {leader}{' (also the meta leader)' if meta_too else ''} (new leader {elected}); "
        f"first publish ack after the kill {start - killed_at:.2f}s; longest publish gap {max(gaps):.2f}s; "
        f"publish retries {retries}; consumer duplicates {dups}; restarted node caught up in {catch_up_s:.2f}s"
    )
