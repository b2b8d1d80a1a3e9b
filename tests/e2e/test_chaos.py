"""Chaos at CI size, on the code of `bench/chaos.py`: a training run of the echo-digit agent on
the embedded stack survives faults of every part, and the database shows nothing lost and
nothing trained twice (see bench/chaos.py for the checks; the long version runs there).

Cases: each part SIGKILLed once (restarted 2 s later by the supervisor), the store down for
30 s, nats-server down for 15 s, and the trainer holding the run SIGSTOPped past its
ack_wait and lease TTL, then SIGKILLed before it can checkpoint again: while still stopped,
or after waking up for a moment next to the second trainer that took the run over (it must
notice its lost lease and write nothing).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import PARTS, ChaosConfig, Fault, run_chaos, schedule, table
from shared.subjects import LEASE_TTL_S

pytestmark = pytest.mark.e2e

# 30 steps of 4 groups x 4 rollouts: about 10 s without faults on 2 cores, long enough that
# every fault strikes while the run still has steps left to recover into.
CI = dict(rows=120, group_size=4, batch_size=4, epochs=1, timeout_s=360.0, recovery_timeout_s=120.0)
TRAINER_ACK_WAIT_S = 10.0  # the trainer's default (RELAYRL_ACK_WAIT_S)
PAUSE_S = max(TRAINER_ACK_WAIT_S, LEASE_TTL_S) + 5.0
# More rows where a trainer pauses: the run must still be going when the paused trainer
# wakes up and when the SIGKILL comes, after the other trainer took it over.
LONGER = dict(rows=480, trainers=2)

CASES = {
    # 50 steps and faults in the first 75%: at ~0.2 s a step, a run of 30 has ended before
    # its last fault once (the faults before it took their recovery time first).
    "kill-each-part": (dict(rows=200, jitter_s=0.5), schedule(PARTS, 1, seed=0, spread=0.75)),
    "store-down-30s": (dict(), [Fault("store", at=0.3, kind="down", down_s=30.0)]),
    "nats-down-15s": (dict(), [Fault("nats", at=0.3, kind="down", down_s=15.0)]),
    "trainer-paused-then-killed": (LONGER, [Fault("trainer", at=0.2, kind="pause_kill", down_s=PAUSE_S)]),
    "trainer-paused-woken-then-killed": (
        LONGER,
        [Fault("trainer", at=0.2, kind="pause_kill", down_s=PAUSE_S, wake_s=3.0)],
    ),
}


@pytest.mark.timeout(480)
@pytest.mark.parametrize("case", list(CASES))
def test_a_run_survives(case: str, tmp_path: Path) -> None:
    extra, faults = CASES[case]
    result = run_chaos(tmp_path / "stack", ChaosConfig(**{**CI, **extra}), faults, name=case)
    print(table([result], None))
    assert result.ok, result.failures()
