"""SFT runs in the trainer service, as a real process against a real nats-server and store:
versioned, checkpointed and resumable exactly like GRPO runs; fine-tuning on a past run's
stored trajectories; a GRPO run starting from an SFT run's weights; bad data failing the run
with its reason."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Awaitable, Sized

import numpy as np
import torch

from shared.bus import Bus
from shared.messages import PolicyVersion, RunConfig, StepMetrics, Trajectory, Transition, pack_f32, pack_i32
from shared.store_api import StoreClient
from shared.weights import (
    latest_policy,
    load_state_dict,
    put_weight_bytes,
    read_weights,
    serialize_state_dict,
    verify_weights,
)
from shared import subjects
from tests.support.secrets import WEIGHTS_KEY
from tests.support.store import RunningStore
from tests.support.trainer import TrainerProcess
from tests.support.waiting import wait_until

TOOL = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object", "properties": {}}}}


def conversation(i: int) -> dict[str, Any]:
    a, b = 3 + i, 7 + 2 * i
    call = {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": f'{{"expression": "{a} * {b}"}}'}}
    return {
        "messages": [
            {"role": "system", "content": "Use the calculator."},
            {"role": "user", "content": f"What is {a} times {b}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": str(a * b)},
            {"role": "assistant", "content": f"Answer: {a * b}"},
        ],
        "tools": [TOOL],
    }


def sft_config(run_id: str, **extra: Any) -> RunConfig:
    # 30 steps of a few tenths of a second: long enough to be killed in the middle.
    training = dict(batch_size=2, epochs=5, learning_rate=3e-3, sync_every=2, group_size=2)
    base: dict[str, Any] = dict(
        run_id=run_id, agent="calculator", algorithm="sft", dataset=[conversation(i) for i in range(12)], seed=5,
        training=training,
    )  # fmt: skip
    base.update(extra)
    return RunConfig(**base)


async def finished(client: StoreClient, run_id: str, timeout_s: float = 120) -> None:
    async def done() -> bool:
        return (await client.get_run(run_id)).state in ("finished", "failed")

    await wait_until(done, timeout_s, 0.2)


async def weights(bus: Bus, run_id: str) -> tuple[int, dict[str, torch.Tensor]]:
    pv = await latest_policy(bus, run_id)
    assert pv is not None
    return pv.version, load_state_dict(await read_weights(bus, pv))


async def test_an_sft_run_resumed_after_sigkill_ends_with_the_weights_of_an_uninterrupted_one(
    sqlite_store: RunningStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    client = StoreClient(bus, 10)
    for run_id in ("straight", "killed"):
        await client.put_run(sft_config(run_id), 12)
    assert await TrainerProcess(nats_url, tmp_path, "straight").wait(180) == 0

    trainer = TrainerProcess(nats_url, tmp_path, "killed")

    async def two_steps() -> bool:
        return len(await client.get_metrics("killed")) >= 2

    await wait_until(two_steps, 120, 0.05)
    await trainer.kill()
    assert len(await client.get_metrics("killed")) < 30, "killed in the middle of the run"
    assert await TrainerProcess(nats_url, tmp_path, "killed").wait(180) == 0

    for run_id in ("straight", "killed"):
        run = await client.get_run(run_id)
        steps: list[StepMetrics] = await client.get_metrics(run_id)
        assert run.state == "finished" and run.total_steps == 30  # 12 conversations x 5 epochs / 2
        assert [m.step for m in steps] == list(range(1, 31))
        assert [m.version for m in steps] == [s - s % 2 for s in range(1, 31)]  # sync_every 2
        assert steps[-1].values["sft_loss"] < steps[0].values["sft_loss"]
    assert "resumed from checkpoint" in (tmp_path / "trainer-killed.log").read_text()
    (va, wa), (vb, wb) = await weights(bus, "straight"), await weights(bus, "killed")
    assert va == vb == 30 and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "a resumed sft run must train exactly the same steps"

    # A GRPO run with init_from starts where the sft run ended: its version 0 is those weights.
    grpo = RunConfig(run_id="rl", agent="calculator", dataset=[{"q": 1}], init_from="straight", training={"group_size": 2})
    await client.put_run(grpo, 1)
    rl = TrainerProcess(nats_url, tmp_path, "rl")

    async def version_zero() -> bool:
        return await latest_policy(bus, "rl") is not None

    await wait_until(version_zero, 120, 0.2)
    await rl.kill()
    v0, w0 = await weights(bus, "rl")
    assert v0 == 0 and all(torch.equal(w0[k], wa[k]) for k in wa)
    assert "starting from another run's weights" in (tmp_path / "trainer-rl.log").read_text()


async def test_init_from_weights_not_signed_with_the_key_fails_the_run_with_the_reason(
    sqlite_store: RunningStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    """Weights someone wrote into NATS without the key are never trained from."""
    client = StoreClient(bus, 10)
    data = serialize_state_dict({"w": torch.ones(4)})
    stored_obj = await put_weight_bytes(bus, "planted", 1, data)
    forged = PolicyVersion(run_id="planted", version=1, object=stored_obj.name, sha256=stored_obj.sha256,
                           size=stored_obj.size, step=1)  # fmt: skip
    await (await bus.kv(subjects.KV_POLICY)).put(subjects.policy_key("planted"), forged.encode())
    grpo = RunConfig(run_id="from-planted", agent="calculator", dataset=[{"q": 1}], init_from="planted",
                     training={"group_size": 2})  # fmt: skip
    await client.put_run(grpo, 1)
    await TrainerProcess(nats_url, tmp_path, "from-planted").wait(120)
    run = await client.get_run("from-planted")
    assert run.state == "failed" and run.error is not None and "unsigned" in run.error, (run.state, run.error)
    assert await latest_policy(bus, "from-planted") is None  # nothing was published from them


async def test_a_trainer_republishes_its_run_s_weights_signed_over_an_unsigned_entry(
    sqlite_store: RunningStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    """The run's KV entry names its version 0 but is unsigned (written before signing, or by
    someone without the key): replicas would refuse it, so the trainer publishes it again, signed."""
    client = StoreClient(bus, 10)
    stored_obj = await put_weight_bytes(bus, "resign", 0, serialize_state_dict({"w": torch.ones(4)}))
    unsigned = PolicyVersion(run_id="resign", version=0, object=stored_obj.name, sha256=stored_obj.sha256,
                             size=stored_obj.size, step=0)  # fmt: skip
    await (await bus.kv(subjects.KV_POLICY)).put(subjects.policy_key("resign"), unsigned.encode())
    run = RunConfig(run_id="resign", agent="calculator", dataset=[{"q": 1}], training={"group_size": 2})
    await client.put_run(run, 1)
    trainer = TrainerProcess(nats_url, tmp_path, "resign")

    async def signed() -> bool:
        pv = await latest_policy(bus, "resign")
        return pv is not None and pv.signature is not None

    try:
        await wait_until(signed, 120, 0.2)
    finally:
        await trainer.kill()
    pv = await latest_policy(bus, "resign")
    assert pv is not None and pv.version == 0 and pv.sha256 != unsigned.sha256
    verify_weights(WEIGHTS_KEY, pv)
    assert "not signed with this key; publishing them again" in (tmp_path / "trainer-resign.log").read_text()


def stored(run_id: str, index: int, reward: float) -> Trajectory:
    prompt, response = np.arange(10, 20) + index, np.arange(30, 36) + index
    return Trajectory(
        rollout_id=f"{run_id}-t{index}.0", run_id=run_id, task_id=f"{run_id}-t{index}", group_id=f"{run_id}-t{index}",
        sample_index=0, group_size=1, agent="calculator", status="ok", reward=reward,
        transitions=[Transition(
            prompt_ids=pack_i32(prompt), response_ids=pack_i32(response), response_logprobs=pack_f32(np.full(6, -1.0)),
            response_versions=pack_i32(np.zeros(6)), role="solver",
        )],
        started_at=time.time(), finished_at=time.time(), worker_id="test",
    )  # fmt: skip


async def test_rejection_sampling_fine_tunes_on_the_stored_trajectories_that_passed(
    sqlite_store: RunningStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    client = StoreClient(bus, 10)
    source = RunConfig(run_id="source", agent="calculator", dataset=[{"q": i} for i in range(8)], training={"group_size": 2})
    await client.put_run(source, 8)
    for i in range(8):
        t = stored("source", i, reward=1.0 if i % 2 else 0.0)
        await bus.publish(subjects.trajectories("source"), t, t.msg_id())

    async def all_stored() -> bool:
        return await client.count_run_trajectories("source") == 8

    await wait_until(all_stored, 30, 0.2)
    await client.set_run_state("source", "finished")
    passed = await client.get_run_trajectories("source", min_reward=1.0)
    assert sorted(t.rollout_id for t in passed) == [f"source-t{i}.0" for i in (1, 3, 5, 7)]

    rft = RunConfig(
        run_id="rft", agent="calculator", algorithm="sft", sft={"from_run": "source", "min_reward": 1.0},
        training={"batch_size": 2, "epochs": 1, "group_size": 2},
    )  # fmt: skip
    await client.put_run(rft, 4)
    assert await TrainerProcess(nats_url, tmp_path, "rft").wait(180) == 0
    # Metrics reach SQL through the METRICS stream, so the last one may trail the trainer's exit.
    await wait_until(lambda: _count(client.get_metrics("rft")), expect=2, timeout_s=30)
    steps = await client.get_metrics("rft")
    assert (await client.get_run("rft")).state == "finished" and len(steps) == 2
    # 4 passing trajectories, 6 response tokens each, trained exactly as recorded.
    assert sum(m.values["samples"] for m in steps) == 4 and sum(m.values["loss_tokens"] for m in steps) == 24


async def test_bad_sft_data_or_an_unknown_model_fails_the_run_with_the_reason(
    sqlite_store: RunningStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    client = StoreClient(bus, 10)
    broken = conversation(1)
    del broken["messages"][2]["tool_calls"][0]["function"]["name"]
    await client.put_run(sft_config("broken", dataset=[conversation(0), broken]), 2)
    await client.put_run(sft_config("nomodel", model=str(tmp_path / "no-such-model")), 12)
    await client.put_run(sft_config("empty-source", dataset=[], sft={"from_run": "broken", "min_reward": 1.0}), 1)
    for run_id in ("broken", "nomodel", "empty-source"):
        assert await TrainerProcess(nats_url, tmp_path, run_id).wait(120) == 0
    reasons = {r: (await client.get_run(r)).error or "" for r in ("broken", "nomodel", "empty-source")}
    assert "dataset[1]" in reasons["broken"] and "cannot render" in reasons["broken"]
    assert "cannot load model" in reasons["nomodel"]
    assert "no stored ok trajectory with reward >= 1.0" in reasons["empty-source"]


async def _count(rows: Awaitable[Sized]) -> int:
    return len(await rows)
