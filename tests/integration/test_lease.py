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


async def test_a_holder_that_cannot_renew_is_fenced_before_the_lease_can_expire(bus: Bus) -> None:
    """A paused holder (SIGSTOP, a long GC, NATS down) stops trusting its lease TTL - margin
    after the last confirmed renewal, before anyone else can have taken it."""
    from shared.faults import LeaseLost
    from shared.lease import FENCE_MARGIN_S

    ttl = FENCE_MARGIN_S + 1.0
    kv = await bus.kv("test-fence-leases", ttl_s=ttl)
    a = Lease(kv, subjects.lease_key("train", "r"), "paused-trainer", ttl_s=ttl)
    b = Lease(kv, subjects.lease_key("train", "r"), "new-trainer", ttl_s=ttl)
    assert await a.acquire()
    a.check()  # just renewed: trusted
    await asyncio.sleep(1.1)  # no renewal for longer than ttl - margin
    assert not a.valid()
    try:
        a.check()
    except LeaseLost as exc:
        assert "paused-trainer" in str(exc)
    else:
        raise AssertionError("a lease past ttl - margin must not be trusted")
    assert not await b.acquire()  # ... while the server still holds it for a: nobody else yet
    assert await a.renew()  # renewing in time makes it trusted again
    a.check()
