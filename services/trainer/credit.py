"""Credit assignment: a trajectory's GRPO advantage, and its intermediate rewards, per LLM call.

Pure functions, no torch. The learner computes the outcome advantage A of every rollout
(its final reward, baselined within its group: `grpo.group_advantages`), then asks
`transition_advantages` for one scalar per transition; `samples.build_samples` spreads each
transition's scalar over that call's response tokens (per-token advantages, so two calls
merged into one sample can still get different credit).

Intermediate rewards
    r_k, the intermediate reward of transition k, is the sum, in recording order, of

    - the explicit rewards attached to k (`ctx.reward(v)` / `ctx.reward(v, step=i)`,
      `Trajectory.rewards`): they always count, with the value the agent gave;
    - when AIR is on (`runtime.air_enabled`), the rule value of each event attached to k
      that an AIR rule matches (`ctx.event("tool_success")` with
      `air_rules: [{on: tool_success, reward: 0.3}]`, `Trajectory.events`). A rule matches
      events of its name whose data holds its `where` values (`{on: retrieval, where: {hit:
      true}, reward: 0.1}`); the first matching rule counts. Events no rule matches earn
      nothing; with AIR off no event does.

    A reward or event with no transition index attaches to the last transition of the
    trajectory; an index outside [0, len(transitions)) names no call and is ignored.

Credit modes (A = the rollout's group-normalised outcome advantage, T = its transitions)
    equal:       adv_t = A for every t (the trajectory's advantage on all of its tokens).
    last:        adv_t = A for the last *trained* transition (role matched by trained_roles),
                 0 for every other one. The earlier calls keep loss mask 1: their tokens add
                 no policy gradient but stay in the loss denominators, the KL penalty and the
                 metrics, so switching the credit mode changes the advantages only, never
                 which tokens the batch normalises by (and never which groups are stale).
    discounted:  adv_t = A + sum_{k=t}^{T-1} discount^(k-t) * r_k
                 i.e. the outcome advantage plus the discounted return of the intermediate
                 rewards from call t on. k runs over every transition, trained or not (a
                 reward earned after an untrained call still flows back to the calls before).

`equal` and `last` use the outcome advantage only: intermediate rewards shape `discounted`
credit and nothing else.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence, Union, get_args

from shared.messages import AirRule, CreditMode, Event, Group, Trajectory

CREDIT_MODES: tuple[CreditMode, ...] = get_args(CreditMode)  # the one list: shared.messages


# The AIR rules of a run (`RuntimeConfig.air_values()`), or plain event name -> value.
AirRules = Union[Sequence[AirRule], Mapping[str, float]]


def air_reward(event: Event, air_rules: AirRules) -> float | None:
    """What `event` earns under `air_rules` (None: no rule matches it)."""
    if isinstance(air_rules, Mapping):
        value = air_rules.get(event.name)
        return None if value is None else float(value)
    for rule in air_rules:
        if rule.matches(event):
            return float(rule.reward)
    return None


def intermediate_rewards(traj: Trajectory, air_rules: AirRules | None) -> list[float]:
    """r_k for each transition k of `traj` (see the module docstring for what counts).
    `air_rules` None means AIR is off."""
    n = len(traj.transitions)
    out = [0.0] * n
    if not n:
        return out
    earned: list[tuple[int | None, float]] = [(r.transition, float(r.value)) for r in traj.rewards]
    if air_rules is not None:
        for event in traj.events:
            value = air_reward(event, air_rules)
            if value is not None:
                earned.append((event.transition, value))
    for index, value in earned:  # a fixed order: the sums are reproducible to the bit
        k = n - 1 if index is None else index
        if 0 <= k < n:
            out[k] += value
    return out


def credit(
    advantage: float,
    trained: Sequence[bool],
    rewards: Sequence[float],
    mode: CreditMode = "equal",
    discount: float = 1.0,
) -> list[float]:
    """One advantage per transition from the outcome advantage `advantage` (A).

    `trained[k]`: transition k's role is trained; `rewards[k]`: its intermediate reward r_k.
    equal: A everywhere. last: A on the last trained transition, 0 elsewhere.
    discounted: A + sum_{k>=t} discount^(k-t) r_k, computed backwards as G_t = r_t + discount G_{t+1}.
    """
    n = len(trained)
    if len(rewards) != n:
        raise ValueError(f"{len(rewards)} rewards for {n} transitions")
    if mode == "equal":
        return [float(advantage)] * n
    if mode == "last":
        out = [0.0] * n
        last = max((k for k in range(n) if trained[k]), default=None)
        if last is not None:
            out[last] = float(advantage)
        return out
    if mode == "discounted":
        if not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        out = [0.0] * n
        ret = 0.0
        for k in range(n - 1, -1, -1):
            ret = float(rewards[k]) + discount * ret
            out[k] = float(advantage) + ret
        return out
    raise ValueError(f"unknown credit mode {mode!r}; choose one of {list(CREDIT_MODES)}")


def trajectory_credit(
    traj: Trajectory,
    advantage: float,
    trained_roles: re.Pattern[str] | None,
    mode: CreditMode = "equal",
    discount: float = 1.0,
    air_rules: AirRules | None = None,
) -> list[float]:
    """Per-transition advantages of one trajectory (`credit` with its roles and intermediate rewards)."""
    trained = [trained_roles is None or trained_roles.fullmatch(t.role) is not None for t in traj.transitions]
    rewards = intermediate_rewards(traj, air_rules) if mode == "discounted" else [0.0] * len(trained)
    return credit(advantage, trained, rewards, mode, discount)


def group_credit(
    groups: Sequence[Group],
    outcome: Mapping[str, float],
    trained_roles: re.Pattern[str] | None,
    mode: CreditMode = "equal",
    discount: float = 1.0,
    air_rules: AirRules | None = None,
) -> dict[str, list[float]]:
    """rollout_id -> per-transition advantages for every ok trajectory of `groups`.

    `outcome` is rollout_id -> A (`grpo.group_advantages`). Failed trajectories give no
    samples, so they get no entry.
    """
    out: dict[str, list[float]] = {}
    for g in groups:
        for traj in g.trajectories:
            if traj.status == "ok":
                out[traj.rollout_id] = trajectory_credit(
                    traj, outcome[traj.rollout_id], trained_roles, mode, discount, air_rules
                )
    return out


def has_signal(
    group: Group,
    mode: CreditMode = "equal",
    air_rules: AirRules | None = None,
    tol: float = 1e-6,
) -> bool:
    """False when every advantage of `group` would be 0 under `mode`: nothing to learn.

    For equal and last credit that is a zero-variance group (all final rewards alike). Under
    discounted credit a zero-variance group still teaches something if an ok member earned a
    nonzero intermediate reward, so the trainer's drop_zero_variance should keep it.
    """
    rewards = [t.reward for t in group.trajectories]
    if rewards and max(rewards) - min(rewards) > tol:
        return True
    if mode != "discounted":
        return False
    return any(
        abs(r) > tol for t in group.trajectories if t.status == "ok" for r in intermediate_rewards(t, air_rules)
    )
