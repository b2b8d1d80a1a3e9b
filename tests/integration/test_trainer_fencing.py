"""Single-writer fencing of a run's weights: the PolicyVersion is compare-and-set, so two
trainers (one of them a zombie that lost its lease while paused) can never both publish."""

from __future__ import annotations

import pytest
import torch

from shared.bus import Bus
from shared.faults import LeaseLost
from shared.weights import PolicyFence, latest_policy, publish_weights
from tests.support.secrets import WEIGHTS_KEY

WEIGHTS = {"w": torch.arange(8, dtype=torch.float32)}


async def test_a_writer_that_missed_a_publish_cannot_publish(bus: Bus) -> None:
    zombie = await PolicyFence.read(bus, "r1")
    live = await PolicyFence.read(bus, "r1")
    assert zombie.revision is None and live.revision is None
    await publish_weights(bus, "r1", 1, 1, WEIGHTS, fence=live, signing_key=WEIGHTS_KEY)
    with pytest.raises(LeaseLost):
        await publish_weights(bus, "r1", 1, 1, {"w": torch.zeros(8)}, fence=zombie, signing_key=WEIGHTS_KEY)
    pv = await latest_policy(bus, "r1")
    assert pv is not None and pv.version == 1
    # The live writer goes on; its fence follows its own writes.
    await publish_weights(bus, "r1", 2, 2, WEIGHTS, fence=live, signing_key=WEIGHTS_KEY)
    assert (await latest_policy(bus, "r1")).version == 2  # type: ignore[union-attr]


async def test_the_fence_is_checked_before_the_object_is_written(bus: Bus) -> None:
    """A fenced-out writer must not replace the object a live PolicyVersion points at."""
    live = await PolicyFence.read(bus, "r2")
    pv = await publish_weights(bus, "r2", 3, 3, WEIGHTS, fence=live, signing_key=WEIGHTS_KEY)
    stale = PolicyFence(revision=None)
    with pytest.raises(LeaseLost):
        await publish_weights(bus, "r2", 3, 3, {"w": torch.ones(8)}, fence=stale, signing_key=WEIGHTS_KEY)
    from shared.weights import read_weights

    data = await read_weights(bus, pv)  # still the live writer's bytes: the sha256 matches
    assert len(data) == pv.size


async def test_a_fence_read_after_taking_the_lease_continues_the_history(bus: Bus) -> None:
    first = await PolicyFence.read(bus, "r3")
    await publish_weights(bus, "r3", 1, 1, WEIGHTS, fence=first, signing_key=WEIGHTS_KEY)
    successor = await PolicyFence.read(bus, "r3")  # a new trainer, after the lease passed to it
    await publish_weights(bus, "r3", 2, 2, WEIGHTS, fence=successor, signing_key=WEIGHTS_KEY)
    with pytest.raises(LeaseLost):
        await publish_weights(bus, "r3", 3, 3, WEIGHTS, fence=first, signing_key=WEIGHTS_KEY)
