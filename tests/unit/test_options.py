"""Each training option's one list (a Literal in shared/messages.py) against what runs it.

One test per option: every value of the Literal goes through the function that implements it
(verl 0.9.1's `kl_penalty`, `get_policy_loss_fn` + the loss, `agg_loss` + `ActorConfig`; the
trainer's credit assignment and trainer table), so a value the implementation refuses fails
here; and values outside the list are refused by RunConfig validation, which is what answers
`POST /v1/runs` with 422 at the gateway.
"""

from __future__ import annotations

from typing import Any, get_args

import pytest
import torch
from pydantic import ValidationError
from verl.trainer.ppo import core_algos

from services.trainer import credit, grpo
from services.trainer.service import TRAINERS
from shared.messages import (
    ALGORITHMS,
    POLICY_LOSSES,
    Algorithm,
    CreditMode,
    KlPenalty,
    LossAggMode,
    PolicyLoss,
    RunConfig,
    TrainingConfig,
)


def run_config(**training: Any) -> RunConfig:
    """A minimal run config with these `training:` settings (raises ValidationError)."""
    return RunConfig.model_validate({"agent": "echo", "dataset": [{"x": 1}], "training": training})


def refused(field: str, value: Any) -> str:
    """RunConfig validation's message for `training.<field>: value` (which must be refused)."""
    with pytest.raises(ValidationError) as info:
        run_config(**{field: value})
    return str(info.value)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old logprobs, new logprobs with grad, advantages, mask) of 3 sequences of 5 tokens."""
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=gen)
    new = (old + 0.1 * torch.randn(3, 5, generator=gen)).requires_grad_()
    adv = torch.tensor([[1.0], [-0.5], [0.2]]).expand(3, 5)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0.0
    return old, new, adv, mask


def test_kl_penalty_values_are_verls() -> None:
    values: tuple[KlPenalty, ...] = get_args(KlPenalty)
    assert grpo.SUPPORTED_KL_PENALTIES == values  # the trainer's check is the same list
    assert {"kl", "abs", "mse", "low_var_kl", "k1", "k2", "k3"} <= set(values)
    old, new, _, mask = batch()
    for value in values:
        kld = core_algos.kl_penalty(logprob=new, ref_logprob=old, kl_penalty=value)
        assert kld.shape == new.shape and torch.isfinite(kld).all(), value
        cfg = run_config(kl_coef=0.1, kl_penalty=value).training
        config = grpo.actor_config(cfg)
        grpo.set_global_batch(config, int(mask.sum()), 3, None)
        loss = grpo.kl_loss(new, old, mask, config)
        (grad,) = torch.autograd.grad(loss, new)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0, value
    # "full" passed validation once and then failed at trainer start: verl does not implement it.
    with pytest.raises(NotImplementedError):
        core_algos.kl_penalty(logprob=new, ref_logprob=old, kl_penalty="full")
    for value in ("full", "k4", "KL", ""):
        assert "unknown kl_penalty" in refused("kl_penalty", value)


def test_policy_loss_values_are_verls() -> None:
    values: tuple[PolicyLoss, ...] = get_args(PolicyLoss)
    assert POLICY_LOSSES == values
    old, new, adv, mask = batch()
    for value in values:
        cfg = run_config(policy_loss=value).training
        fn = core_algos.get_policy_loss_fn(value)  # raises ValueError for a name verl lacks
        assert fn is grpo.policy_loss_fn(cfg)
        config = grpo.actor_config(cfg)
        grpo.set_global_batch(config, int(mask.sum()), 3, None)
        loss, _ = grpo.compute_policy_loss(fn, config, old, new, adv, mask)
        (grad,) = torch.autograd.grad(loss, new)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), value
    # "dro" is in verl's registry but needs a dro_beta the config has no field for: not offered.
    for value in ("made_up", "dro", "Vanilla"):
        assert "unknown policy_loss" in refused("policy_loss", value)


def test_loss_agg_mode_values_are_verls() -> None:
    values: tuple[LossAggMode, ...] = get_args(LossAggMode)
    old, new, adv, mask = batch()
    for value in values:
        cfg = run_config(loss_agg_mode=value).training
        config = grpo.actor_config(cfg)  # verl's ActorConfig checks the mode in __post_init__
        loss = core_algos.agg_loss(loss_mat=(new - old) * adv, loss_mask=mask, loss_agg_mode=value)
        assert torch.isfinite(loss), value
        # And through the trainer's loss with full-batch denominators, as a step computes it.
        grpo.set_global_batch(config, int(mask.sum()), 3, loss_scale_factor=5)
        pg_loss, _ = grpo.compute_policy_loss(grpo.policy_loss_fn(cfg), config, old, new, adv, mask)
        assert torch.isfinite(pg_loss), value
    for value in ("token_mean", "seq-mean", "mean"):
        assert "unknown loss_agg_mode" in refused("loss_agg_mode", value)


def test_credit_values_are_the_trainers() -> None:
    values: tuple[CreditMode, ...] = get_args(CreditMode)
    assert credit.CREDIT_MODES == values
    results = {}
    for value in values:
        cfg = run_config(credit=value, discount=0.5).training
        out = credit.credit(1.0, [True, False, True], [0.5, 0.0, 1.0], mode=cfg.credit, discount=cfg.discount)
        assert len(out) == 3, value
        results[value] = out
    assert len({tuple(v) for v in results.values()}) == len(values)  # each mode assigns differently
    for value in ("first", "Equal"):
        assert "unknown credit" in refused("credit", value)


def test_algorithm_values_have_a_trainer() -> None:
    values: tuple[Algorithm, ...] = get_args(Algorithm)
    assert ALGORITHMS == values and set(TRAINERS) == set(values)
    # A conversation row: a dataset both algorithms accept.
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    for value in values:
        assert RunConfig.model_validate({"agent": "echo", "dataset": rows, "algorithm": value}).algorithm == value
    with pytest.raises(ValidationError, match="algorithm"):
        RunConfig.model_validate({"agent": "echo", "dataset": rows, "algorithm": "ppo"})


def test_option_defaults_are_in_their_lists() -> None:
    cfg = TrainingConfig()
    for field in ("kl_penalty", "policy_loss", "loss_agg_mode", "credit"):
        assert getattr(cfg, field) in get_args(TrainingConfig.model_fields[field].annotation), field
