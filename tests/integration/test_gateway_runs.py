"""Training runs over HTTP with a real nats-server and store: validation, pacing, lease, states.

No trainer runs here: the test plays the trainer by writing its progress into the policy KV,
which is exactly what pacing reads.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import httpx
import nats.js.errors
import pytest

from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import AgentInfo, Event, RolloutRequest, TrainerProgress, Transition, pack_f32, pack_i32
from shared.store_api import StoreClient
from tests.support.factories import make_trajectory
from tests.support.gateway import gateway, run_body
from tests.support.store import RunningStore
from tests.support.waiting import wait_until


@pytest.fixture
async def client(settings: ServiceSettings, bus: Bus, sqlite_store: RunningStore) -> AsyncIterator[httpx.AsyncClient]:
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("copy", AgentInfo(name="copy", worker_id="test").encode())
    async with gateway(settings) as c:
        yield c


async def queued_requests(bus: Bus, run_id: str) -> int:
    info = await bus.js.stream_info(subjects.STREAM_TASKS, subjects_filter=subjects.tasks(run_id))
    return sum((info.state.subjects or {}).values())


async def settle(bus: Bus, run_id: str, expected: int, timeout_s: float = 10.0) -> int:
    """Wait until the queue holds `expected` requests, then a little longer to see it stays there."""
    deadline = time.monotonic() + timeout_s
    while await queued_requests(bus, run_id) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    return await queued_requests(bus, run_id)


async def consume(bus: Bus, run_id: str, groups: int) -> None:
    kv = await bus.kv(subjects.KV_POLICY)
    progress = TrainerProgress(run_id=run_id, step=groups // 2, version=groups // 2, groups_consumed=groups)
    await kv.put(subjects.progress_key(run_id), progress.encode())


@pytest.mark.parametrize(
    "change, status, reason",
    [
        ({"training": {"learning_rate": -0.1}}, 422, "learning_rate"),
        ({"training": {"group_size": 1}}, 422, "group_size 1"),
        ({"training": {"policy_loss": "made_up"}}, 422, "unknown policy_loss"),
        ({"training": {"kl_penalty": "full"}}, 422, "unknown kl_penalty"),  # verl has no "full"
        ({"agent": "nobody"}, 400, "unknown agent"),
        ({"algorithm": "ppo"}, 422, "algorithm"),
        ({"dataset": []}, 422, "dataset"),
        ({"dataset": [], "dataset_name": "missing"}, 400, "unknown dataset"),
        ({"max_staleness": -1}, 422, "max_staleness"),
        ({"run_id": "has.dot"}, 422, "run_id"),
    ],
)
async def test_bad_run_configs_are_refused_with_a_reason(client: httpx.AsyncClient, change, status, reason):
    body = run_body()
    for key, value in change.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) else value
    r = await client.post("/v1/runs", json=body)
    assert r.status_code == status, r.text
    assert reason in r.text
    assert (await client.get("/v1/runs")).json() == []


async def test_pacing_follows_the_admission_rule(client: httpx.AsyncClient, bus: Bus):
    r = await client.post("/v1/runs", json=run_body(rows=12))
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["state"] == "running" and view["rows"] == 12 and view["total_steps"] == 6
    # (eta + 1) x batch = 4 groups of 3 requests before the trainer consumed anything.
    assert await settle(bus, "r1", 12) == 12
    await consume(bus, "r1", 2)
    assert await settle(bus, "r1", 18) == 18
    await consume(bus, "r1", 12)
    assert await settle(bus, "r1", 36) == 36  # every row once, nothing more
    run = (await client.get("/v1/runs/r1")).json()
    assert run["cursor"]["groups_published"] == 12 and run["cursor"]["done"]
    assert run["groups_consumed"] == 12 and run["step"] == 6


async def test_same_config_is_idempotent_and_another_is_409(client: httpx.AsyncClient):
    assert (await client.post("/v1/runs", json=run_body())).status_code == 201
    assert (await client.post("/v1/runs", json=run_body())).status_code == 201
    r = await client.post("/v1/runs", json=run_body(learning_rate=0.5))
    assert r.status_code == 409 and "training" in r.text


async def test_pause_resume_cancel(client: httpx.AsyncClient, bus: Bus):
    await client.post("/v1/runs", json=run_body(rows=12))
    assert await settle(bus, "r1", 12) == 12
    assert (await client.post("/v1/runs/r1/pause")).json()["state"] == "paused"
    await consume(bus, "r1", 4)
    assert await settle(bus, "r1", 13, timeout_s=1.0) == 12  # paused: nothing new
    r = await client.post("/v1/runs/r1/pause")
    assert r.status_code == 409 and "paused" in r.text
    assert (await client.post("/v1/runs/r1/resume")).json()["state"] == "running"
    assert await settle(bus, "r1", 24) == 24
    assert (await client.post("/v1/runs/r1/cancel")).json()["state"] == "cancelled"
    assert await queued_requests(bus, "r1") == 0  # queued work of a cancelled run is dropped
    assert (await client.post("/v1/runs/r1/resume")).status_code == 409
    assert (await client.post("/v1/runs/nope/pause")).status_code == 404


async def test_a_restarted_gateway_resumes_from_the_cursor_and_two_never_pace_one_run(
    client: httpx.AsyncClient, bus: Bus, settings: ServiceSettings
):
    async with gateway(settings) as second:
        await client.post("/v1/runs", json=run_body(rows=12))
        assert await settle(bus, "r1", 12) == 12
        await consume(bus, "r1", 4)
        # Two gateways pace concurrently; the lease lets only one publish, and task ids dedupe.
        assert await settle(bus, "r1", 24) == 24
        assert (await second.get("/v1/runs/r1")).json()["cursor"]["groups_published"] == 8
    async with gateway(settings) as third:
        await consume(bus, "r1", 12)
        assert await settle(bus, "r1", 36) == 36
        assert (await third.get("/v1/runs/r1")).json()["cursor"]["done"]


async def test_datasets_by_name(client: httpx.AsyncClient, bus: Bus):
    r = await client.post("/v1/datasets", json={"name": "words", "rows": [{"text": "a"}, {"text": "b"}]})
    assert r.status_code == 201 and r.json()["rows"] == 2
    body = run_body()
    body["dataset"], body["dataset_name"] = [], "words"
    r = await client.post("/v1/runs", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 2
    assert await settle(bus, "r1", 6) == 6


async def test_metrics_and_replay_of_an_untrained_run(client: httpx.AsyncClient):
    await client.post("/v1/runs", json=run_body())
    assert (await client.get("/v1/runs/r1/metrics")).json() == []
    assert (await client.get("/v1/runs/missing/metrics")).status_code == 404
    r = await client.post("/v1/runs/r1/replay", json={})
    assert r.status_code == 404, r.text


# --- evaluation ------------------------------------------------------------------------------------


async def queued(bus: Bus, run_id: str, eval: bool) -> list[RolloutRequest]:
    """The rollout requests queued on one of the run's subjects, read without consuming them
    (TASKS is a work queue: a fetch would take them away from the workers)."""
    subject = subjects.tasks(run_id, eval=eval)
    info = await bus.js.stream_info(subjects.STREAM_TASKS)
    out: list[RolloutRequest] = []
    for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(subjects.STREAM_TASKS, seq=seq)
        except nats.js.errors.NotFoundError:
            continue
        if msg.subject == subject:
            out.append(RolloutRequest.decode(msg.data))
    return out


def eval_body(run_id: str, **extra: Any) -> dict[str, Any]:
    return {**run_body(run_id, rows=4), "eval_dataset": [{"text": f"e{i}"} for i in range(3)], **extra}


async def test_evaluation_on_request_is_greedy_pinned_to_a_version_and_idempotent(client: httpx.AsyncClient, bus: Bus):
    assert (await client.post("/v1/runs", json=eval_body("ev1"))).status_code == 201
    r = await client.post("/v1/runs/ev1/evals", json={})
    assert r.status_code == 202, r.text
    assert r.json()["version"] == 0 and len(r.json()["tasks"]) == 3
    reqs = await queued(bus, "ev1", eval=True)
    assert len(reqs) == 3 and all(q.eval and q.group_size == 1 and q.min_version == 0 for q in reqs)
    assert all(q.eval_version == 0 and q.sampling.temperature == 0.0 for q in reqs)
    assert sorted(q.input["text"] for q in reqs) == ["e0", "e1", "e2"]
    assert not any(q.eval for q in await queued(bus, "ev1", eval=False))  # training requests apart
    # The same evaluation again creates nothing new; other rows at the same version do.
    assert (await client.post("/v1/runs/ev1/evals", json={})).status_code == 202
    assert len(await queued(bus, "ev1", eval=True)) == 3
    r = await client.post("/v1/runs/ev1/evals", json={"rows": [{"text": "x"}], "version": 0})
    assert r.status_code == 202 and r.json()["version"] == 0
    assert sorted(q.input["text"] for q in await queued(bus, "ev1", eval=True)) == ["e0", "e1", "e2", "x"]
    # Inference serves only the trainer's latest weights: any other version is refused.
    r = await client.post("/v1/runs/ev1/evals", json={"version": 4})
    assert r.status_code == 409 and "not served" in r.json()["detail"]
    await consume(bus, "ev1", groups=4)  # the trainer moves on to version 2
    assert (await client.post("/v1/runs/ev1/evals", json={"version": 1})).status_code == 409
    assert (await client.post("/v1/runs/ev1/evals", json={"version": 2})).status_code == 202
    assert (await client.post("/v1/runs/ev1/evals", json={"rows": []})).status_code == 422
    assert (await client.post("/v1/runs/r-none/evals", json={})).status_code == 404
    assert (await client.post("/v1/runs", json=run_body("ev-norows"))).status_code == 201
    r = await client.post("/v1/runs/ev-norows/evals", json={})
    assert r.status_code == 400 and "eval_dataset" in r.json()["detail"]
    assert (await client.post("/v1/runs/ev-norows/cancel")).status_code == 200
    r = await client.post("/v1/runs/ev-norows/evals", json={"rows": [{"text": "x"}]})
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]


async def test_periodic_evaluation_every_n_versions(client: httpx.AsyncClient, bus: Bus):
    assert (await client.post("/v1/runs", json=eval_body("ev2", eval_every=2))).status_code == 201

    async def versions() -> list[int]:
        return sorted({q.min_version for q in await queued(bus, "ev2", eval=True)})

    await wait_until(versions, expect=[0])
    await consume(bus, "ev2", groups=2)  # version 1: not due
    await asyncio.sleep(0.5)
    assert await versions() == [0]
    await consume(bus, "ev2", groups=6)  # version 3: the evaluation due at 2 runs now, at 3
    await wait_until(versions, expect=[0, 3])
    run = (await client.get("/v1/runs/ev2")).json()
    assert run["cursor"]["next_eval"] == 4 and run["cursor"]["last_eval"] == 3


async def test_eval_results_are_aggregated_per_version_and_never_trained(
    client: httpx.AsyncClient, bus: Bus, sqlite_store: RunningStore
):
    assert (await client.post("/v1/runs", json=eval_body("ev3"))).status_code == 201
    # (version asked for, versions of the tokens, reward); the last ran on a newer policy.
    rollouts = [(0, [0, 0], 1.0), (0, [0, 0], 0.0), (0, [0, 0], 1.0), (5, [5, 5], 0.5), (5, [5, 6], 1.0)]
    for i, (version, tokens, reward) in enumerate(rollouts):
        t = make_trajectory(f"ev3-eval-v{version}-r{i}.0").model_copy(update={
            "run_id": "ev3", "group_size": 1, "eval": True, "eval_version": version, "reward": reward,
            "transitions": [Transition(prompt_ids=pack_i32([1]), response_ids=pack_i32([2, 3]),
                                       response_logprobs=pack_f32([-0.1, -0.2]),
                                       response_versions=pack_i32(tokens))],
            # Rollout i records i tool successes and one failure when i is odd.
            "events": [Event(name="tool_success", transition=0) for _ in range(i)]
            + [Event(name="tool_failure", transition=0)] * (i % 2)})
        await bus.publish(subjects.trajectories("ev3"), t, t.msg_id())
    failed = make_trajectory("ev3-eval-v0-r9.0").model_copy(update={
        "run_id": "ev3", "group_size": 1, "eval": True, "eval_version": 0, "status": "error", "reward": 0.0,
        "transitions": []})
    await bus.publish(subjects.trajectories("ev3"), failed, failed.msg_id())

    async def summaries() -> list[dict[str, Any]]:
        return (await client.get("/v1/runs/ev3/evals")).json()

    got = await wait_until(lambda: _total(summaries(), 6))
    assert [s["version"] for s in got] == [0, 5]
    v0, v5 = got
    assert v0["rollouts"] == 4 and v0["ok"] == 3 and v0["off_version"] == 0
    assert v0["accuracy"] == pytest.approx(2 / 4) and v0["reward_mean"] == pytest.approx(2 / 4)
    assert v5["rollouts"] == 2 and v5["off_version"] == 1 and v5["accuracy"] == 0.5
    # The seeds' episode figures: calls per rollout (the failed one made none), tokens per call,
    # and events (v0 holds rollouts 0, 1, 2 and the failed one; v5 rollouts 3 and 4).
    assert v0["calls_mean"] == pytest.approx(3 / 4) and v0["response_tokens_mean"] == 2.0
    assert v0["events"] == {"tool_failure": 1, "tool_success": 3} and v0["rollouts_with"] == {"tool_failure": 1, "tool_success": 2}
    assert v5["events"] == {"tool_failure": 1, "tool_success": 7} and v5["rollouts_with"]["tool_success"] == 2
    lenient = (await client.get("/v1/runs/ev3/evals", params={"accuracy_threshold": 0.5})).json()
    assert [s["accuracy"] for s in lenient] == [0.5, 1.0]
    # Complete groups of one, yet nothing went to the trainer's subject.
    info = await bus.js.stream_info(subjects.STREAM_GROUPS, subjects_filter=subjects.groups("ev3"))
    assert not info.state.subjects


async def _total(summaries: Any, n: int) -> list[dict[str, Any]] | None:
    got = await summaries
    return got if sum(s["rollouts"] for s in got) == n else None


async def test_rollouts_show_which_calls_their_run_trains(client: httpx.AsyncClient, bus: Bus):
    body = {**run_body("sel"), "trained_agents": "write|rewrite"}
    assert (await client.post("/v1/runs", json=body)).status_code == 201
    calls = [Transition(role=role, prompt_ids=pack_i32([1]), response_ids=pack_i32([2]),
                        response_logprobs=pack_f32([-0.1]), response_versions=pack_i32([0]))
             for role in ("write", "check", "rewrite")]
    for run_id in ("sel", "adhoc"):
        t = make_trajectory(f"{run_id}-t.0").model_copy(update={"run_id": run_id, "group_size": 1, "transitions": calls})
        await bus.publish(subjects.trajectories(run_id), t, t.msg_id())

    async def shown(rollout_id: str) -> list[bool | None] | None:
        r = await client.get(f"/v1/rollouts/{rollout_id}")
        return [x["trained"] for x in r.json()["transitions"]] if r.status_code == 200 else None

    assert await wait_until(lambda: shown("sel-t.0")) == [True, False, True]
    assert await wait_until(lambda: shown("adhoc-t.0")) == [None, None, None]  # no run config


async def test_a_finished_run_gets_its_last_version_evaluated(client: httpx.AsyncClient, bus: Bus):
    assert (await client.post("/v1/runs", json=eval_body("ev4", eval_every=100))).status_code == 201

    async def versions() -> list[int]:
        return sorted({q.eval_version for q in await queued(bus, "ev4", eval=True)})

    await wait_until(versions, expect=[0])
    await consume(bus, "ev4", groups=6)  # version 3, not a multiple of 100
    await asyncio.sleep(0.3)
    assert await versions() == [0]
    # The trainer finishes the run: the pacer evaluates version 3 before letting the run go,
    # and the run's queued training requests are purged but its evaluations are kept.
    await StoreClient(bus, timeout_s=5).set_run_state("ev4", "finished", from_states=["running"])
    await wait_until(versions, expect=[0, 3])
    await wait_until(lambda: queued_requests(bus, "ev4"), expect=0)


def sft_body(run_id: str, **extra: Any) -> dict[str, Any]:
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    body = {**run_body(run_id, rows=0), "algorithm": "sft", "dataset": [conversation] * 4}
    return {**body, "eval_dataset": [{"text": "e0"}], "eval_every": 2, **extra}


async def test_an_sft_run_asks_for_evaluations_but_never_for_training_rollouts(client: httpx.AsyncClient, bus: Bus):
    r = await client.post("/v1/runs", json=sft_body("sft1"))
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 4 and r.json()["total_steps"] == 2  # 4 conversations / batch 2

    async def evaluations() -> list[int]:
        return sorted({q.min_version for q in await queued(bus, "sft1", eval=True)})

    await wait_until(evaluations, expect=[0])
    await consume(bus, "sft1", groups=4)  # the trainer at version 2
    await wait_until(evaluations, expect=[0, 2])
    assert await queued(bus, "sft1", eval=False) == []


@pytest.mark.parametrize(
    "change, status, reason",
    [
        ({"dataset": [{"text": "not a conversation"}]}, 422, "dataset[0] is not an sft conversation"),
        ({"dataset": [], "sft": {"from_run": "nobody"}}, 409, "sft.from_run: there is no run 'nobody'"),
        ({"dataset": [], "sft": {"from_run": "base"}}, 409, "run 'base' is running"),
        ({"init_from": "nobody"}, 409, "init_from: there is no run 'nobody'"),
        ({"init_from": "base", "model": "tiny:other"}, 409, "trained model 'tiny'"),
        ({"init_from": "base"}, 409, "init_from: run 'base' is running; start from it once it ended"),
    ],
)
async def test_sft_and_init_from_sources_are_checked(client: httpx.AsyncClient, change, status, reason):
    assert (await client.post("/v1/runs", json=run_body("base"))).status_code == 201
    r = await client.post("/v1/runs", json={**sft_body("sft2"), **change})
    assert r.status_code == status, r.text
    assert reason in r.text


async def test_sft_from_a_run_without_passing_trajectories_is_refused(client: httpx.AsyncClient):
    assert (await client.post("/v1/runs", json=run_body("base"))).status_code == 201
    assert (await client.post("/v1/runs/base/cancel")).status_code == 200
    r = await client.post("/v1/runs", json={**sft_body("sft3"), "dataset": [], "sft": {"from_run": "base", "min_reward": 1}})
    assert r.status_code == 422 and "no stored ok trajectory with reward >= 1.0" in r.text
    other = {**sft_body("sft4"), "model": "tiny:agent", "dataset": [], "sft": {"from_run": "base"}}
    r = await client.post("/v1/runs", json=other)
    assert r.status_code == 409 and "sampled model 'tiny', not 'tiny:agent'" in r.text
    # A cancelled run is not a warm start: only a finished run's last weights are.
    r = await client.post("/v1/runs", json={**run_body("rl"), "init_from": "base"})
    assert r.status_code == 409 and "start from a finished run" in r.text
