"""GRPO pieces from verl's `core_algos`: group advantages, the policy loss, the KL penalty.

Nothing here re-implements an algorithm; it adapts relayrl's groups and `TrainingConfig` to
the tensors and the config object verl's functions expect.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, get_args

import numpy as np
import torch
from verl.trainer.ppo import core_algos
from verl.workers.config.actor import ActorConfig, PolicyLossConfig

from shared.messages import Group, KlPenalty, TrainingConfig

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


# --- advantages ----------------------------------------------------------------------------


def group_advantages(groups: Sequence[Group], norm_by_std: bool) -> dict[str, float]:
    """rollout_id -> GRPO outcome advantage, each reward baselined within its own group.

    Every member counts in its group's mean and std, failed ones too (with the reward they
    carry, normally 0): a task the policy often fails on should push harder on its
    successes. Groups are told apart by their position in `groups`, not their id, so the
    same group twice in one batch (a replay) cannot merge into one baseline.
    """
    rollout_ids = [t.rollout_id for g in groups for t in g.trajectories]
    if not rollout_ids:
        return {}
    rewards = torch.tensor([t.reward for g in groups for t in g.trajectories], dtype=torch.float32)
    index = np.array([i for i, g in enumerate(groups) for _ in g.trajectories])
    # The outcome reward sits on a single "token": verl sums token rewards into the score.
    token_rewards = rewards.unsqueeze(-1)
    advantages, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=token_rewards,
        response_mask=torch.ones_like(token_rewards),
        index=index,
        norm_adv_by_std_in_grpo=norm_by_std,
    )
    return {rid: float(a) for rid, a in zip(rollout_ids, advantages[:, 0].tolist())}


def is_zero_variance(group: Group, tol: float = 1e-6) -> bool:
    """True when every member got the same reward: all advantages are 0, nothing to learn."""
    rewards = [t.reward for t in group.trajectories]
    return not rewards or max(rewards) - min(rewards) <= tol


# --- policy loss ---------------------------------------------------------------------------


def actor_config(cfg: TrainingConfig, loss_scale_factor: int | None = None) -> ActorConfig:
    """The verl `ActorConfig` the registered policy losses read their settings from.

    The losses read clip_ratio(_low/_high/_c), loss_agg_mode, policy_loss.* (clip_cov /
    kl_cov), tau_pos/tau_neg (sapo) and `global_batch_info`, which the learner fills per
    step with full-batch denominators so micro-batch losses add up to the batch loss.
    `strategy`, `rollout_n` and `use_dynamic_bsz` only satisfy the dataclass's checks.
    """
    return ActorConfig(
        strategy="fsdp",
        rollout_n=cfg.group_size,
        use_dynamic_bsz=True,
        clip_ratio=cfg.clip_ratio_low,
        clip_ratio_low=cfg.clip_ratio_low,
        clip_ratio_high=cfg.clip_ratio_high,
        clip_ratio_c=cfg.clip_ratio_c,
        loss_agg_mode=cfg.loss_agg_mode,
        loss_scale_factor=loss_scale_factor,
        policy_loss=PolicyLossConfig(loss_mode=cfg.policy_loss),
        use_kl_loss=cfg.kl_coef > 0,
        kl_loss_coef=cfg.kl_coef,
        kl_loss_type=cfg.kl_penalty,
        entropy_coeff=cfg.entropy_coeff,
    )


def policy_loss_fn(cfg: TrainingConfig) -> PolicyLossFn:
    """verl's registered loss named by `cfg.policy_loss` (ValueError if verl has none by that name)."""
    return core_algos.get_policy_loss_fn(cfg.policy_loss)


def set_global_batch(config: ActorConfig, loss_tokens: int, sequences: int, loss_scale_factor: int | None) -> None:
    """Give verl's `agg_loss` the whole batch's denominators.

    With these, agg_loss on each micro-batch divides by the full batch's loss-token count
    (token-mean) or trained-sequence count (seq-mean-*), so summing the micro-batch losses
    gives exactly the full-batch loss, however the batch was split.
    """
    config.global_batch_info.update(
        dp_size=1,
        batch_num_tokens=loss_tokens,
        global_batch_size=sequences,
        loss_scale_factor=loss_scale_factor,
    )


# Losses that ignore `global_batch_info` and take torch.mean over the rows they are given.
_MICRO_BATCH_MEAN_LOSSES = frozenset({"geo_mean"})


def compute_policy_loss(
    loss_fn: PolicyLossFn,
    config: ActorConfig,
    old_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) of one micro-batch; metrics use short names (pg_clipfrac, ppo_kl, ...)."""
    loss, metrics = loss_fn(
        old_log_prob=old_logprobs,
        log_prob=logprobs,
        advantages=advantages,
        response_mask=mask,
        loss_agg_mode=config.loss_agg_mode,
        config=config,
    )
    if config.policy_loss.loss_mode in _MICRO_BATCH_MEAN_LOSSES:
        # A plain mean over this micro-batch's rows: rescale it to its share of the batch.
        loss = loss * (mask.shape[0] / config.global_batch_info["global_batch_size"])
    return loss, {k.removeprefix("actor/"): float(v) for k, v in metrics.items()}


# --- KL against the reference ----------------------------------------------------------------


# The one list in shared.messages (KlPenalty): what verl's kl_penalty implements.
SUPPORTED_KL_PENALTIES: tuple[KlPenalty, ...] = get_args(KlPenalty)


def kl_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, config: ActorConfig
) -> torch.Tensor:
    """verl's `kl_penalty` estimate per token, aggregated like the policy loss."""
    kld = core_algos.kl_penalty(logprob=logprobs, ref_logprob=ref_logprobs, kl_penalty=config.kl_loss_type)
    return core_algos.agg_loss(
        loss_mat=kld, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info
    )


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, config: ActorConfig) -> torch.Tensor:
    """Per-token entropy aggregated like the policy loss (verl's actor subtracts
    `entropy_coeff` times this from the loss: an exploration bonus)."""
    return core_algos.agg_loss(
        loss_mat=entropy, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info
    )
