"""Run pacing: the admission rule, epoch order and the resumable cursor (pure functions)."""

from __future__ import annotations

from shared.messages import PaceCursor, RunConfig
from services.gateway.pacing import allowance, epoch_order, next_tasks


def _config(rows: int = 5, epochs: int = 2, batch: int = 2, eta: int = 1) -> RunConfig:
    return RunConfig(
        run_id="r1",
        agent="copy",
        dataset=[{"text": str(i)} for i in range(rows)],
        training={"batch_size": batch, "group_size": 2, "epochs": epochs},
        max_staleness=eta,
    )


def test_allowance_is_the_areal_admission_rule() -> None:
    cfg = _config(batch=4, eta=1)
    # published <= consumed + (eta + 1) * batch
    assert allowance(cfg, PaceCursor(groups_published=0), groups_consumed=0) == 8
    assert allowance(cfg, PaceCursor(groups_published=8), groups_consumed=0) == 0
    assert allowance(cfg, PaceCursor(groups_published=8), groups_consumed=4) == 4
    sync = _config(batch=4, eta=0)
    assert allowance(sync, PaceCursor(groups_published=4), groups_consumed=0) == 0
    assert allowance(sync, PaceCursor(groups_published=4), groups_consumed=4) == 4


def test_epoch_order_is_a_seeded_permutation() -> None:
    a = epoch_order(10, seed=3, epoch=0)
    assert sorted(a) == list(range(10))
    assert a == epoch_order(10, seed=3, epoch=0)
    assert a != epoch_order(10, seed=3, epoch=1)
    assert epoch_order(10, seed=3, epoch=1, shuffle=False) == list(range(10))


def test_next_tasks_walks_every_row_of_every_epoch_once() -> None:
    cfg = _config(rows=5, epochs=2)
    cursor, seen = PaceCursor(), []
    while not cursor.done:
        cursor, specs = next_tasks(cfg, cfg.dataset, cursor, 3)
        seen.extend(s.task_id for s in specs)
        assert cursor.groups_published == len(seen)
    assert len(seen) == len(set(seen)) == 10
    assert {t.split("-")[1] for t in seen} == {"e0", "e1"}
    # Resuming from any stored cursor yields the same tasks as one uninterrupted walk.
    _, all_at_once = next_tasks(cfg, cfg.dataset, PaceCursor(), 100)
    assert [s.task_id for s in all_at_once] == seen


def test_tasks_carry_the_run_settings() -> None:
    cfg = _config()
    _, specs = next_tasks(cfg, cfg.dataset, PaceCursor(), 1)
    (spec,) = specs
    assert spec.run_id == "r1" and spec.agent == "copy" and spec.group_size == 2
    assert spec.input in cfg.dataset
