"""Training samples: a trajectory's LLM calls turned into flat token sequences with a loss mask.

Consecutive calls whose prompt exactly extends the previous context (previous prompt +
previous response is a prefix of this prompt) merge into one sample; the prompt tokens the
environment added in between get mask 0. Advantages are per token: each call's response
tokens carry that call's advantage (see credit.py), so calls merged into one sample can get
different credit; tokens with mask 0 carry 0. Any mismatch (the agent rewrote its history, a
chat template re-rendered earlier turns differently) starts a new sample: we never
retokenize and hope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from shared.messages import Group, Trajectory, Transition, unpack_f32, unpack_i32


@dataclass
class Sample:
    """One flat token sequence of a rollout, aligned per token."""

    group_id: str
    rollout_id: str
    tokens: np.ndarray  # int32
    loss_mask: np.ndarray  # int32: 1 = sampled by the trained policy
    old_logprobs: np.ndarray  # float32; 0 where loss_mask is 0
    versions: np.ndarray  # int32: policy version of each sampled token; -1 where loss_mask is 0
    advantages: np.ndarray  # float32: advantage of each token; 0 where loss_mask is 0

    @property
    def advantage(self) -> float:
        """Mean advantage over the trained tokens (the trajectory's advantage under `equal` credit)."""
        trained = self.advantages[self.loss_mask == 1]
        return float(trained.astype(np.float64).mean()) if len(trained) else 0.0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def min_version(sample: Sample) -> int | None:
    """Oldest policy version that produced a trained token of `sample` (None: no trained tokens)."""
    trained = sample.versions[sample.loss_mask == 1]
    return int(trained.min()) if len(trained) else None


def group_min_version(group: Group, trained_roles: re.Pattern[str] | None = None) -> int | None:
    """Oldest policy version behind any trained token of an ok trajectory of `group`.

    The trainer compares this with its current version to drop groups staler than eta
    before it trains them.
    """
    oldest: int | None = None
    for traj in group.trajectories:
        if traj.status != "ok":
            continue
        for tr in traj.transitions:
            if not _trained(tr, trained_roles):
                continue
            versions = unpack_i32(tr.response_versions)
            if len(versions):
                v = int(versions.min())
                oldest = v if oldest is None else min(oldest, v)
    return oldest


def build_samples(
    group: Group, trained_roles: re.Pattern[str] | None, advantages: Mapping[str, float | Sequence[float]]
) -> list[Sample]:
    """Every sample of every ok trajectory of `group`, in trajectory then transition order.

    `advantages` is rollout_id -> either one advantage for every call of the trajectory, or
    one per transition (`credit.group_credit`); a call's trained response tokens get its value.

    Failed trajectories (status != ok) give no samples; they still counted in the group's
    baseline when `advantages` was computed. A sample with no trained token is left out: it
    could only add padding.
    """
    samples: list[Sample] = []
    for traj in group.trajectories:
        if traj.status != "ok":
            continue
        per_call = _per_transition(advantages[traj.rollout_id], len(traj.transitions), traj.rollout_id)
        for seq in _merge_transitions(traj, trained_roles, per_call):
            sample = seq.to_sample(group.group_id, traj.rollout_id)
            if sample.loss_tokens:
                samples.append(sample)
    return samples


def _per_transition(value: float | Sequence[float], n: int, rollout_id: str) -> list[float]:
    if np.ndim(value) == 0:
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{rollout_id}: {len(values)} advantages for {n} transitions")
    return values


def _trained(tr: Transition, trained_roles: re.Pattern[str] | None) -> bool:
    return trained_roles is None or trained_roles.fullmatch(tr.role) is not None


class _Builder:
    """A sample under construction: per-token lists appended chunk by chunk."""

    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.mask: list[np.ndarray] = []
        self.logprobs: list[np.ndarray] = []
        self.versions: list[np.ndarray] = []
        self.advantages: list[np.ndarray] = []
        self.length = 0

    def context(self) -> np.ndarray:
        return np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int32)

    def add_context(self, ids: np.ndarray) -> None:
        n = len(ids)
        zeros = np.zeros(n, np.float32)
        self._add(ids, np.zeros(n, np.int32), zeros, np.full(n, -1, np.int32), zeros)

    def add_response(self, tr: Transition, trained: bool, advantage: float) -> None:
        ids = unpack_i32(tr.response_ids)
        if not trained:
            self.add_context(ids)
            return
        n = len(ids)
        self._add(
            ids,
            np.ones(n, np.int32),
            unpack_f32(tr.response_logprobs),
            unpack_i32(tr.response_versions),
            np.full(n, advantage, np.float32),
        )

    def _add(
        self, ids: np.ndarray, mask: np.ndarray, logprobs: np.ndarray, versions: np.ndarray, adv: np.ndarray
    ) -> None:
        self.tokens.append(ids.astype(np.int32))
        self.mask.append(mask)
        self.logprobs.append(logprobs.astype(np.float32))
        self.versions.append(versions.astype(np.int32))
        self.advantages.append(adv)
        self.length += len(ids)

    def to_sample(self, group_id: str, rollout_id: str) -> Sample:
        mask = np.concatenate(self.mask)
        logprobs = np.concatenate(self.logprobs)
        versions = np.concatenate(self.versions)
        advantages = np.concatenate(self.advantages)
        if len(mask):
            # The first token has no context to be predicted from, so it cannot be trained.
            mask[0], logprobs[0], versions[0], advantages[0] = 0, 0.0, -1, 0.0
        return Sample(group_id, rollout_id, self.context(), mask, logprobs, versions, advantages)


def _merge_transitions(
    traj: Trajectory, trained_roles: re.Pattern[str] | None, advantages: Sequence[float]
) -> list[_Builder]:
    """Split a trajectory's transitions into maximal runs whose prompts extend the context."""
    return _merge(traj, trained_roles, advantages)[0]


def _merge(
    traj: Trajectory, trained_roles: re.Pattern[str] | None, advantages: Sequence[float]
) -> tuple[list[_Builder], int]:
    """The merged runs, and how many calls broke a run while continuing the previous call's role."""
    built: list[_Builder] = []
    current = _Builder()
    mismatches = 0
    previous_role: str | None = None
    for tr, advantage in zip(traj.transitions, advantages, strict=True):
        prompt = unpack_i32(tr.prompt_ids)
        ctx = current.context()
        extends = len(prompt) >= len(ctx) and np.array_equal(prompt[: len(ctx)], ctx)
        if current.length and not extends:
            mismatches += tr.role == previous_role
            built.append(current)
            current, ctx = _Builder(), np.zeros(0, np.int32)
        current.add_context(prompt[len(ctx) :])
        current.add_response(tr, _trained(tr, trained_roles), advantage)
        previous_role = tr.role
    if current.length:
        built.append(current)
    return built, mismatches


def merge_mismatches(groups: Sequence[Group]) -> tuple[int, int]:
    """(mismatches, continuing calls) over the ok trajectories of `groups`.

    A continuing call is one whose role is the previous call's role: usually the same
    conversation one turn later. It is a mismatch when its prompt ids do not extend the
    previous prompt + response, so it starts a new sample instead of merging. A high rate
    means the agent (or a chat template re-rendering history, e.g. tool calls) rewrites what
    the policy said: each such call re-trains the shared prefix as context, not a bug, but
    worth seeing."""
    mismatches = continuing = 0
    for g in groups:
        for traj in g.trajectories:
            if traj.status != "ok":
                continue
            roles = [t.role for t in traj.transitions]
            continuing += sum(a == b for a, b in zip(roles, roles[1:]))
            mismatches += _merge(traj, None, [0.0] * len(roles))[1]
    return mismatches, continuing
