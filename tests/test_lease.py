"""KV leases: one holder per key, renewal, release, and takeover after expiry."""

from __future__ import annotations

import asyncio

from shared import subjects
from shared.bus import Bus
from shared.lease import Lease


async def test_one_holder_at_a_time(bus: Bus) -> None:
    a = await Lease.open(bus, "pace", "run1", "gw-a")
    b = await Lease.open(bus, "pace", "run1", "gw-b")
    assert await a.acquire()
    assert not await b.acquire()
    assert await a.renew() and a.held
    assert not await b.renew()
    await a.release()
    assert await b.acquire()
    # A restarted holder with the same id gets its own lease back.
    b_again = await Lease.open(bus, "pace", "run1", "gw-b")
    assert await b_again.acquire()


async def test_other_keys_are_independent(bus: Bus) -> None:
    assert await (await Lease.open(bus, "pace", "run1", "x")).acquire()
    assert await (await Lease.open(bus, "pace", "run2", "y")).acquire()
    assert await (await Lease.open(bus, "train", "run1", "y")).acquire()


async def test_an_unrenewed_lease_expires_and_can_be_taken(bus: Bus) -> None:
    # A bucket with a short TTL stands in for `relayrl-leases` so the test need not wait 10 s.
    kv = await bus.kv("test-leases", ttl_s=1.0)
    a = Lease(kv, subjects.lease_key("train", "r"), "dead-trainer")
    b = Lease(kv, subjects.lease_key("train", "r"), "new-trainer")
    assert await a.acquire()
    assert not await b.acquire()
    await asyncio.sleep(1.6)
    assert await b.acquire()
    assert not await a.renew()  # the old holder learns it lost the lease
