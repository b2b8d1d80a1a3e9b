"""Credit assignment, AIR rules and selective optimization, against hand-computed advantages.

The group (size 2, Dr.GRPO advantages, i.e. no std: A = reward - group mean):

  rollout x.0, reward 1 -> A = +0.5; one merged sample (each prompt extends the context):
    t0 write   prompt [1 2]              response [3 4]
    t1 check   prompt [1 2 3 4 9]        response [5]     (9: a tool output)
    t2 rewrite prompt [1 2 3 4 9 5 6]    response [7 8]   (6: a tool output)
    tokens [1 2 3 4 9 5 6 7 8], with trained_agents "write|rewrite":
    mask   [0 0 1 1 0 0 0 1 1]
    rewards: 0.2 explicit on t0 (ctx.reward)
    events:  "format_ok" and "unruled" on t0; "tool_success" on t1; "tool_failure" without a
             transition (-> the last one, t2)
  rollout x.1, reward 0 -> A = -0.5; two samples (t1 rewrote the history):
    t0 write   prompt [1 2]   response [3 5]   -> tokens [1 2 3 5], mask [0 0 1 1]
    t1 rewrite prompt [1 2 7] response [8]     -> tokens [1 2 7 8], mask [0 0 0 1]
    rewards: 0.4 explicit on t1

AIR rules: format_ok -> 0.05, tool_success -> 1.0, tool_failure -> -0.25 ("unruled" earns nothing).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from services.trainer import credit, grpo
from services.trainer.batching import collate
from services.trainer.learner import Learner
from services.trainer.samples import build_samples
from shared.messages import (
    AirRule,
    Event,
    Group,
    Reward,
    RunConfig,
    RuntimeConfig,
    TrainingConfig,
    Trajectory,
    Transition,
    pack_f32,
    pack_i32,
)

RULES = {"format_ok": 0.05, "tool_success": 1.0, "tool_failure": -0.25}
ROLES = re.compile("write|rewrite")


def transition(prompt: list[int], response: list[int], role: str) -> Transition:
    return Transition(
        role=role,
        prompt_ids=pack_i32(prompt),
        response_ids=pack_i32(response),
        response_logprobs=pack_f32([-1.0] * len(response)),
        response_versions=pack_i32([0] * len(response)),
    )


def trajectory(index: int, reward: float, transitions: list[Transition], rewards: list[Reward],
               events: list[Event] | None = None) -> Trajectory:
    return Trajectory(
        rollout_id=f"x.{index}", run_id="run", task_id="x", group_id="x", sample_index=index, group_size=2,
        agent="test", status="ok", reward=reward, rewards=rewards, events=events or [], transitions=transitions,
        started_at=0.0, finished_at=1.0, worker_id="w",
    )


def the_group() -> Group:
    merged = trajectory(0, 1.0, [
        transition([1, 2], [3, 4], "write"),
        transition([1, 2, 3, 4, 9], [5], "check"),
        transition([1, 2, 3, 4, 9, 5, 6], [7, 8], "rewrite"),
    ], [
        Reward(value=0.2, transition=0, source="format"),
    ], [
        Event(name="format_ok", transition=0),
        Event(name="unruled", transition=0, data={"note": "no rule names me"}),
        Event(name="tool_success", transition=1, data={"tool": "sql"}),
        Event(name="tool_failure"),
    ])
    split = trajectory(1, 0.0, [
        transition([1, 2], [3, 5], "write"),
        transition([1, 2, 7], [8], "rewrite"),
    ], [Reward(value=0.4, transition=1)])
    return Group(run_id="run", group_id="x", task_id="x", trajectories=[merged, split])


def samples_for(mode: str, discount: float = 1.0, air: dict[str, float] | None = None,
                roles: re.Pattern[str] | None = ROLES) -> list:
    g = the_group()
    outcome = grpo.group_advantages([g], norm_by_std=False)
    assert outcome == pytest.approx({"x.0": 0.5, "x.1": -0.5})
    per_call = credit.group_credit([g], outcome, roles, mode, discount, air)  # type: ignore[arg-type]
    return build_samples(g, roles, per_call)


def advs(samples: list) -> list[list[float]]:
    for s in samples:
        assert s.advantages.dtype == np.float32 and len(s.advantages) == len(s.tokens)
        assert not s.advantages[s.loss_mask == 0].any()  # no advantage on an untrained token
    return [s.advantages.tolist() for s in samples]


def close(actual: list[list[float]], expected: list[list[float]]) -> bool:
    """Nested per-token lists equal to float32 precision (pytest.approx takes no nesting)."""
    return [len(a) for a in actual] == [len(e) for e in expected] and all(
        a == pytest.approx(e, abs=1e-6) for a, e in zip(actual, expected)
    )


# --- intermediate rewards and AIR ------------------------------------------------------------------


def test_intermediate_rewards_with_and_without_air() -> None:
    merged, split = the_group().trajectories
    # AIR off: only the explicit reward counts; events earn nothing.
    assert credit.intermediate_rewards(merged, None) == pytest.approx([0.2, 0.0, 0.0])
    # AIR on: each ruled event earns its rule's value on its call; "unruled" earns nothing; the
    # transition-less failure lands on the last call.
    assert credit.intermediate_rewards(merged, RULES) == pytest.approx([0.25, 1.0, -0.25])
    # AIR on without rules: no event earns anything.
    assert credit.intermediate_rewards(merged, {}) == pytest.approx([0.2, 0.0, 0.0])
    assert credit.intermediate_rewards(split, RULES) == pytest.approx([0.0, 0.4])
    # An index that names no call is ignored; no transitions at all: nothing to attach to.
    odd = split.model_copy(update={"rewards": [Reward(value=1.0, transition=5), Reward(value=1.0, transition=-1)]})
    assert credit.intermediate_rewards(odd, None) == [0.0, 0.0]
    assert credit.intermediate_rewards(split.model_copy(update={"transitions": []}), None) == []


# --- credit modes, per token ------------------------------------------------------------------------


def test_equal_credit_gives_every_trained_token_the_outcome_advantage() -> None:
    samples = samples_for("equal", air=RULES)  # intermediate rewards do not touch `equal`
    assert [s.tokens.tolist() for s in samples] == [[1, 2, 3, 4, 9, 5, 6, 7, 8], [1, 2, 3, 5], [1, 2, 7, 8]]
    assert [s.loss_mask.tolist() for s in samples] == [[0, 0, 1, 1, 0, 0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert advs(samples) == [
        [0, 0, 0.5, 0.5, 0, 0, 0, 0.5, 0.5],
        [0, 0, -0.5, -0.5],
        [0, 0, 0, -0.5],
    ]
    assert [s.advantage for s in samples] == [0.5, -0.5, -0.5]


def test_last_credit_only_on_the_last_trained_call() -> None:
    samples = samples_for("last", air=RULES)
    # The earlier calls keep loss mask 1 with advantage 0.
    assert [s.loss_mask.tolist() for s in samples] == [[0, 0, 1, 1, 0, 0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert advs(samples) == [
        [0, 0, 0, 0, 0, 0, 0, 0.5, 0.5],
        [0, 0, 0, 0],
        [0, 0, 0, -0.5],
    ]
    # "Last" means last *trained*: with only `write` trained, t0 is the last trained call.
    only_write = samples_for("last", roles=re.compile("write"))
    assert advs(only_write) == [[0, 0, 0.5, 0.5, 0, 0, 0, 0, 0], [0, 0, -0.5, -0.5]]


def test_discounted_credit_with_air_rules() -> None:
    # x.0, gamma 0.5, r = [0.25, 1.0, -0.25]:
    #   G2 = -0.25; G1 = 1.0 + 0.5 * -0.25 = 0.875; G0 = 0.25 + 0.5 * 0.875 = 0.6875
    #   adv = 0.5 + G = [1.1875, 1.375 (check: untrained, mask 0), 0.25]
    # x.1, r = [0, 0.4]: G1 = 0.4, G0 = 0.2; adv = -0.5 + G = [-0.3, -0.1]
    samples = samples_for("discounted", discount=0.5, air=RULES)
    assert close(advs(samples), [
        [0, 0, 1.1875, 1.1875, 0, 0, 0, 0.25, 0.25],
        [0, 0, -0.3, -0.3],
        [0, 0, 0, -0.1],
    ])
    # The rewards of the untrained `check` call still flow back to `write`.
    assert credit.trajectory_credit(the_group().trajectories[0], 0.5, ROLES, "discounted", 0.5, RULES) == [
        1.1875, 1.375, 0.25,
    ]


def test_discounted_credit_without_air_and_undiscounted() -> None:
    # AIR off, gamma 0.5: x.0 r = [0.2, 0, 0] -> adv = [0.7, 0.5, 0.5].
    samples = samples_for("discounted", discount=0.5, air=None)
    assert close(advs(samples), [
        [0, 0, 0.7, 0.7, 0, 0, 0, 0.5, 0.5],
        [0, 0, -0.3, -0.3],
        [0, 0, 0, -0.1],
    ])
    # AIR on, gamma 1: x.0 G = [1.0, 0.75, -0.25] -> adv = [1.5, 1.25, 0.25];
    # x.1 G = [0.4, 0.4] -> adv = [-0.1, -0.1].
    samples = samples_for("discounted", discount=1.0, air=RULES)
    assert close(advs(samples), [
        [0, 0, 1.5, 1.5, 0, 0, 0, 0.25, 0.25],
        [0, 0, -0.1, -0.1],
        [0, 0, 0, -0.1],
    ])


def test_credit_function_edges() -> None:
    assert credit.credit(0.5, [], [], "last") == []
    assert credit.credit(0.5, [False, False], [0.0, 0.0], "last") == [0.0, 0.0]
    with pytest.raises(ValueError):
        credit.credit(0.5, [True], [0.0, 1.0], "discounted")
    with pytest.raises(ValueError):
        credit.credit(0.5, [True], [0.0], "discounted", discount=0.0)
    with pytest.raises(ValueError):
        credit.credit(0.5, [True], [0.0], "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # one advantage per transition, or one for all
        build_samples(the_group(), ROLES, {"x.0": [1.0], "x.1": 0.0})


# --- the learner -------------------------------------------------------------------------------------


def test_learner_uses_the_configured_credit_and_air_rules() -> None:
    run = RunConfig(
        agent="a", dataset=[{}], trained_agents="write|rewrite",
        training=TrainingConfig(group_size=2, norm_adv_by_std=False, credit="discounted", discount=0.5),
        runtime={"air_enabled": True, "air_rules": [{"on": "tool_failure", "reward": -0.25},
                                                    {"on": "tool_success", "reward": 1.0},
                                                    {"on": "format_ok", "reward": 0.05}]},
    )
    learner = Learner(torch.nn.Linear(1, 1), run.training, device="cpu", trained_roles=run.trained_roles,
                      air_rules=run.runtime.air_values())
    assert close(advs(learner.samples([the_group()])), advs(samples_for("discounted", 0.5, RULES)))
    # Defaults: equal credit, no AIR -> exactly the outcome advantage (what the trainer did before).
    plain = Learner(torch.nn.Linear(1, 1), TrainingConfig(group_size=2, norm_adv_by_std=False), device="cpu",
                    trained_roles="write|rewrite")
    assert advs(plain.samples([the_group()])) == advs(samples_for("equal"))


def test_per_token_advantages_reach_the_policy_loss() -> None:
    # With logprobs equal to the old ones every ratio is 1, so vanilla's token-mean loss is
    # -sum(adv * mask) / loss_tokens and d loss / d logprob_j = -adv_j * mask_j / loss_tokens.
    samples = samples_for("discounted", discount=0.5, air=RULES)
    mb = collate(samples, [0, 1, 2])
    cfg = TrainingConfig(group_size=2)
    config = grpo.actor_config(cfg)
    tokens = sum(s.loss_tokens for s in samples)  # 4 + 2 + 1
    assert tokens == 7
    grpo.set_global_batch(config, tokens, len(samples), None)
    logprobs = mb.old_logprobs.clone().requires_grad_(True)
    loss, _ = grpo.compute_policy_loss(grpo.policy_loss_fn(cfg), config, mb.old_logprobs, logprobs,
                                       mb.advantages, mb.loss_mask)
    expected = -(2 * 1.1875 + 2 * 0.25 + 2 * -0.3 + -0.1) / 7
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert logprobs.grad is not None
    assert logprobs.grad.numpy() == pytest.approx(-(mb.advantages * mb.loss_mask).numpy() / 7, abs=1e-7)
    # Targets-aligned: the merged sample's advantages shifted left by one.
    assert mb.advantages[0].tolist() == pytest.approx([0, 1.1875, 1.1875, 0, 0, 0, 0.25, 0.25])


# --- selective optimization ----------------------------------------------------------------------------


def test_selective_optimization_trains_only_the_named_agents() -> None:
    run = RunConfig(agent="a", dataset=[{}], trained_agents="write|rewrite")
    assert run.trained_roles == "write|rewrite"
    g = the_group()
    samples = build_samples(g, re.compile(run.trained_roles), {"x.0": 0.5, "x.1": -0.5})
    merged = samples[0]
    roles_of = ["", "", "write", "write", "", "check", "", "rewrite", "rewrite"]  # "" = prompt context
    assert merged.loss_mask.tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 1]
    assert all(m == (1 if r in ("write", "rewrite") else 0) for m, r in zip(merged.loss_mask.tolist(), roles_of))
    # Only `check` trained: its single token, and x.1 (no check call) gives no sample at all.
    only_check = build_samples(g, re.compile("check"), {"x.0": 0.5, "x.1": -0.5})
    assert [s.loss_mask.tolist() for s in only_check] == [[0, 0, 0, 0, 0, 1, 0, 0, 0]]
    # fullmatch: "write" does not train "rewrite".
    only_write = build_samples(g, re.compile(RunConfig(agent="a", dataset=[{}], trained_agents="write").trained_roles),
                               {"x.0": 0.5, "x.1": -0.5})
    assert [s.loss_mask.tolist() for s in only_write] == [[0, 0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1]]


# --- config ---------------------------------------------------------------------------------------------


def test_config_fields_and_validation() -> None:
    cfg = TrainingConfig()
    assert cfg.credit == "equal" and cfg.discount == 1.0
    assert TrainingConfig(credit="last").credit == "last"
    for bad in ({"credit": "shapley"}, {"discount": 0.0}, {"discount": 1.5}):
        with pytest.raises(ValidationError):
            TrainingConfig(**bad)

    base = {"agent": "a", "dataset": [{}]}
    assert RunConfig(**base).trained_roles == ".*"
    assert RunConfig(**base, trained_roles="write").trained_roles == "write"
    assert RunConfig(**base, trained_agents="w", trained_roles="w").trained_roles == "w"
    with pytest.raises(ValidationError, match="give one of them"):
        RunConfig(**base, trained_agents="write", trained_roles="check")
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        RunConfig(**base, trained_agents="write|(")
    dumped = RunConfig(**base, trained_agents="write|rewrite").model_dump()
    assert dumped["trained_roles"] == "write|rewrite" and "trained_agents" not in dumped
    assert RunConfig.model_validate(dumped).trained_roles == "write|rewrite"


def test_air_rules_validation() -> None:
    rt = RuntimeConfig(air_enabled=True, air_rules=[{"on": "tool_success", "reward": 0.5}], custom_key=3)
    assert rt.air_rules == [AirRule(on="tool_success", reward=0.5)]
    assert rt.air_values() == [AirRule(on="tool_success", reward=0.5)]
    assert rt.model_extra == {"custom_key": 3}  # unknown runtime keys still load
    assert RuntimeConfig(air_rules=[{"on": "x", "reward": 1}]).air_values() is None  # AIR off
    assert RuntimeConfig(air_enabled=True).air_values() == []
    # PyYAML reads a bare `on:` key as True, and JSON then writes that key as "true".
    assert RuntimeConfig(air_rules=[{True: "tool_failure", "reward": -1}]).air_rules[0].on == "tool_failure"
    from_yaml = json.loads(json.dumps(yaml.safe_load("air_rules: [{on: tool_success, reward: 0.3}]")))
    assert from_yaml == {"air_rules": [{"true": "tool_success", "reward": 0.3}]}
    assert RuntimeConfig(**from_yaml).air_rules == [AirRule(on="tool_success", reward=0.3)]
    for bad in ([{"on": "x"}], [{"reward": 1.0}], [{"on": "", "reward": 1.0}], [{"on": "x", "reward": "lots"}],
                [{"on": "x", "reward": 1.0, "extra": 1}], [{"on": "x", "reward": float("nan")}],
                [{"on": "x", "reward": 1.0}, {"on": "x", "reward": 2.0}]):
        with pytest.raises(ValidationError):
            RuntimeConfig(air_rules=bad)
    with pytest.raises(ValidationError):
        RunConfig(agent="a", dataset=[{}], runtime={"air_rules": [{"on": "x"}]})


def test_has_signal_keeps_zero_variance_groups_with_intermediate_rewards() -> None:
    g = the_group()
    flat = g.model_copy(update={"trajectories": [t.model_copy(update={"reward": 1.0}) for t in g.trajectories]})
    assert credit.has_signal(g, "equal") and credit.has_signal(g, "last")
    assert not credit.has_signal(flat, "equal") and not credit.has_signal(flat, "last")
    assert credit.has_signal(flat, "discounted", RULES) and credit.has_signal(flat, "discounted", None)
    silent = flat.model_copy(update={"trajectories": [t.model_copy(update={"rewards": [], "events": [
        Event(name="tool_success")]}) for t in flat.trajectories]})
    assert not credit.has_signal(silent, "discounted", None)  # AIR off: events earn nothing
    assert credit.has_signal(silent, "discounted", RULES)


def test_air_rules_can_match_event_data() -> None:
    """`where` narrows a rule to events whose data holds its values; the first match counts."""
    runtime = RuntimeConfig(air_enabled=True, air_rules=[
        {"on": "retrieval", "where": {"hit": True}, "reward": 0.2},
        {"on": "retrieval", "reward": -0.05},  # every other retrieval
    ])
    rules = runtime.air_values()
    hit, miss, other = (Event(name="retrieval", transition=0, data={"hit": True, "hop": 1}),
                        Event(name="retrieval", transition=1, data={"hit": False}),
                        Event(name="unrelated", transition=1))
    assert [credit.air_reward(e, rules) for e in (hit, miss, other)] == [0.2, -0.05, None]
    traj = the_group().trajectories[0].model_copy(update={"rewards": [], "events": [hit, miss, other]})
    assert credit.intermediate_rewards(traj, rules) == pytest.approx([0.2, -0.05, 0.0])
    assert RuntimeConfig(air_rules=runtime.air_rules).air_values() is None  # AIR off
    with pytest.raises(ValidationError, match="two rules"):
        RuntimeConfig(air_rules=[{"on": "retrieval", "where": {"hit": True}, "reward": 1.0},
                                 {"on": "retrieval", "where": {"hit": True}, "reward": 2.0}])


def test_a_rule_behind_a_catch_all_for_its_event_is_refused() -> None:
    with pytest.raises(ValidationError, match="comes after a rule for every 'retrieval' event"):
        RuntimeConfig(air_rules=[{"on": "retrieval", "reward": -0.05},
                                 {"on": "retrieval", "where": {"hit": True}, "reward": 0.2}])
