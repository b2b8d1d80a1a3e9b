"""The learner: one GRPO optimizer step per batch of groups, on plain torch.

    groups -> advantages (per group baseline) -> credit per call (credit.py)
           -> samples (per-token advantages) -> micro-batches
           -> forward / backward per micro-batch (gradients accumulate)
           -> clip grad norm -> AdamW step

Losses come from verl's `core_algos`. Micro-batching never changes the loss: each
micro-batch's loss is normalised with the *whole batch's* denominators (see
`grpo.set_global_batch`), so the accumulated gradient is the full-batch gradient:

- token-mean: every micro-batch divides its token sum by the batch's loss-token count,
  i.e. it is weighted by its share of loss tokens.
- seq-mean-token-mean / seq-mean-token-sum: every micro-batch divides its per-sequence sum
  by the batch's count of trained sequences.
- seq-mean-token-sum-norm: as above, then divided by a constant horizon, `loss_scale_factor`
  (default: the longest sample of the batch, minus the first token), not by each
  micro-batch's padded width, which would depend on how the batch was split.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from services.trainer import credit, grpo
from services.trainer.batching import MicroBatch, pack, token_entropy, token_logprobs
from services.trainer.samples import Sample, build_samples, min_version
from shared.messages import Group, TrainingConfig, unpack_i32
from shared.models import load_causal_lm, resolve_device


@dataclass
class StepResult:
    """What one `Learner.step` did."""

    step: int  # optimizer steps taken so far, this one included
    metrics: dict[str, float]
    samples: int
    sample_versions: list[int] = field(default_factory=list)  # oldest version behind each trained sample
    skipped: bool = False  # no trained token in the batch: the weights did not change
    nonfinite: bool = False  # the loss or a gradient was NaN/inf: the update was not applied

    def staleness(self, current_version: int) -> dict[int, int]:
        """Versions behind `current_version` -> trained samples (for StepMetrics.staleness)."""
        out: dict[int, int] = {}
        for v in sorted(self.sample_versions):
            lag = max(0, current_version - v)
            out[lag] = out.get(lag, 0) + 1
        return out


class Learner:
    """Policy, optional frozen reference, AdamW and the GRPO step."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainingConfig,
        *,
        seed: int = 0,
        device: str = "auto",
        trained_roles: str | re.Pattern[str] | None = None,
        pad_id: int = 0,
        pass_threshold: float = 1.0,
        loss_scale_factor: int | None = None,
        air_rules: credit.AirRules | None = None,
        master_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`air_rules`: the run's AIR rules (`RuntimeConfig.air_values()`); None = AIR off.
        `master_dtype`: the weights' dtype; float64 gives tests a reference free of float32
        summation-order rounding."""
        if cfg.kl_coef > 0 and cfg.kl_penalty not in grpo.SUPPORTED_KL_PENALTIES:
            raise ValueError(f"kl_penalty {cfg.kl_penalty!r} is not implemented by verl's kl_penalty")
        self.cfg = cfg
        self.device = resolve_device(device)
        self.trained_roles = re.compile(trained_roles) if isinstance(trained_roles, str) else trained_roles
        self.pad_id = pad_id
        self.pass_threshold = pass_threshold
        self.loss_scale_factor = loss_scale_factor
        self.air_rules = air_rules
        self.step_count = 0

        _seed_everything(seed)
        if self.device.type == "cpu":
            # CPU kernels are deterministic for a fixed thread count; this catches the rest.
            torch.use_deterministic_algorithms(True, warn_only=True)

        # Master weights stay fp32; on CUDA the forward runs under bf16 autocast.
        self.model = model.to(device=self.device, dtype=master_dtype)
        # Any nn.Module can be a policy in tests; Hugging Face models name their vocabulary.
        embeddings = getattr(self.model, "get_input_embeddings", None)
        self.vocab_size: int | None = embeddings().num_embeddings if embeddings is not None else None
        # Dropout off: the sampler had none, so ratios against its logprobs must start at 1.
        self.model.eval()
        self.reference = _frozen_copy(self.model) if cfg.kl_coef > 0 else None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.learning_rate,
            betas=tuple(cfg.adam_betas),
            weight_decay=cfg.weight_decay,
        )
        self.loss_fn = grpo.policy_loss_fn(cfg)
        self.actor_config = grpo.actor_config(cfg, loss_scale_factor)

    @classmethod
    def from_pretrained(cls, path: str | Path, cfg: TrainingConfig, **kwargs: Any) -> Learner:
        """Load a checkpoint directory (fp32) and build a learner around it."""
        device = resolve_device(kwargs.get("device", "auto"))
        return cls(load_causal_lm(path, device=device, dtype=torch.float32), cfg, **kwargs)

    # --- the step ----------------------------------------------------------------------

    def out_of_vocabulary(self, group: Group) -> str | None:
        """Why `group` holds a token id the model has no embedding for, or None. Such an id
        would crash the step (on CUDA, a device assert) or index garbage."""
        for t in group.trajectories:
            for i, tr in enumerate(t.transitions):
                for name in ("prompt_ids", "response_ids"):
                    ids = unpack_i32(getattr(tr, name))
                    limit = self.vocab_size if self.vocab_size is not None else np.iinfo(np.int32).max
                    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= limit):
                        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                        return f"token id {bad} outside the vocabulary [0, {self.vocab_size}) in {t.rollout_id} call {i} {name}"
        return None

    def samples(self, groups: Sequence[Group]) -> list[Sample]:
        """The training samples of `groups`, per-token advantages filled in, in group order."""
        outcome = grpo.group_advantages(groups, self.cfg.norm_adv_by_std)
        per_call = credit.group_credit(
            groups, outcome, self.trained_roles, self.cfg.credit, self.cfg.discount, self.air_rules
        )
        return [s for g in groups for s in build_samples(g, self.trained_roles, per_call)]

    def step(self, groups: Sequence[Group]) -> StepResult:
        """One optimizer step on all of `groups` (staleness and zero-variance filtering is the caller's)."""
        if not groups:
            raise ValueError("step() needs at least one group")
        samples = self.samples(groups)
        batches = pack(samples, self.cfg.micro_batch_tokens, self.pad_id)
        loss_tokens = sum(s.loss_tokens for s in samples)
        self._set_denominators(samples, loss_tokens)

        self.optimizer.zero_grad(set_to_none=True)
        totals = _Totals()
        for mb in batches:
            totals.add(self._forward_backward(mb.to(self.device)), mb, loss_tokens)

        metrics = totals.metrics()
        skipped = loss_tokens == 0
        nonfinite = False
        grad_norm = 0.0
        if not skipped:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
            # A NaN/inf loss or gradient never reaches the weights (they would be published and
            # checkpointed). The loss is checked too: clipping can zero a NaN ratio's gradient.
            losses = [v for k, v in metrics.items() if k.endswith("_loss")]
            nonfinite = not all(math.isfinite(v) for v in [grad_norm, *losses])
            if not nonfinite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1

        metrics.update(nonfinite=float(nonfinite))
        metrics.update(grad_norm=grad_norm, loss_tokens=float(loss_tokens), samples=float(len(samples)))
        metrics.update(micro_batches=float(len(batches)), lr=self.cfg.learning_rate)
        metrics.update(_reward_metrics(groups, self.pass_threshold))
        metrics.update(_advantage_metrics(samples))
        versions = [v for v in (min_version(s) for s in samples) if v is not None]
        return StepResult(self.step_count, metrics, len(samples), versions, skipped or nonfinite, nonfinite)

    def sft_step(self, samples: Sequence[Sample]) -> StepResult:
        """One supervised optimizer step: mean negative log-likelihood of the batch's loss tokens
        (the assistant's), each micro-batch divided by the whole batch's count so micro-batching
        never changes the gradient. The advantage and old logprobs of the samples are ignored."""
        if not samples:
            raise ValueError("sft_step() needs at least one sample")
        batches = pack(samples, self.cfg.micro_batch_tokens, self.pad_id)
        loss_tokens = sum(s.loss_tokens for s in samples)
        self.optimizer.zero_grad(set_to_none=True)
        nll = correct = tokens = 0.0
        for mb in batches:
            mb = mb.to(self.device)
            with self._autocast():
                logits = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
            logits = logits[:, :-1]
            summed = -(token_logprobs(logits, mb.targets) * mb.loss_mask).sum()
            if mb.loss_tokens:
                (summed / max(loss_tokens, 1)).backward()
            nll += float(summed.detach())
            correct += float(((logits.detach().argmax(-1) == mb.targets) * mb.loss_mask).sum())
            tokens += mb.tokens
        grad_norm = 0.0
        nonfinite = False
        if loss_tokens:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
            nonfinite = not (math.isfinite(grad_norm) and math.isfinite(nll))
            if not nonfinite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        denominator = max(loss_tokens, 1)
        metrics = {
            "sft_loss": nll / denominator,
            "token_accuracy": correct / denominator,
            "grad_norm": grad_norm,
            "loss_tokens": float(loss_tokens),
            "tokens": tokens,
            "samples": float(len(samples)),
            "micro_batches": float(len(batches)),
            "lr": self.cfg.learning_rate,
            "nonfinite": float(nonfinite),
        }
        return StepResult(self.step_count, metrics, len(samples), [], loss_tokens == 0 or nonfinite, nonfinite)

    def load_policy(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the policy's weights (an `init_from` warm start); the optimizer starts fresh.

        Published weights hold a tied tensor once (shared/weights.py), so a missing name is
        accepted only when its parameter shares storage with one that was loaded."""
        _load_tied(self.model, state)
        if self.reference is not None:  # the KL anchor is where training starts
            _load_tied(self.reference, state)

    def load_reference(self, state: dict[str, torch.Tensor]) -> None:
        """Set the frozen KL reference (a resumed `init_from` run: its policy came from the checkpoint)."""
        if self.reference is not None:
            _load_tied(self.reference, state)

    def _set_denominators(self, samples: Sequence[Sample], loss_tokens: int) -> None:
        trained = sum(1 for s in samples if s.loss_tokens)
        horizon = self.loss_scale_factor
        if horizon is None and self.cfg.loss_agg_mode == "seq-mean-token-sum-norm":
            horizon = max((len(s) - 1 for s in samples), default=1)
        # verl divides by these; 1 keeps an empty batch (no backward happens) finite.
        grpo.set_global_batch(self.actor_config, max(loss_tokens, 1), max(trained, 1), horizon)

    def _forward_backward(self, mb: MicroBatch) -> dict[str, float]:
        """Loss of one micro-batch, backpropagated; returns its (already batch-normalised) parts."""
        with self._autocast():
            logits = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        logits = logits[:, :-1]  # the last position predicts nothing we have
        logprobs = token_logprobs(logits, mb.targets)
        pg_loss, pg_metrics = grpo.compute_policy_loss(
            self.loss_fn, self.actor_config, mb.old_logprobs, logprobs, mb.advantages, mb.loss_mask
        )
        loss = pg_loss
        out = {"policy_loss": float(pg_loss.detach())}
        if self.reference is not None:
            kl = grpo.kl_loss(logprobs, self._reference_logprobs(mb), mb.loss_mask, self.actor_config)
            loss = loss + self.cfg.kl_coef * kl
            out["kl_loss"] = float(kl.detach())
        if self.cfg.entropy_coeff > 0:
            entropy = token_entropy(logits)
            bonus = grpo.entropy_loss(entropy, mb.loss_mask, self.actor_config)
            loss = loss - self.cfg.entropy_coeff * bonus
            out["entropy_loss"] = float(bonus.detach())
            entropy = entropy.detach()
        else:
            entropy = token_entropy(logits.detach())
        if mb.loss_tokens:
            loss.backward()
        out["entropy_sum"] = float((entropy * mb.loss_mask).sum())
        out.update({f"mean:{k}": v for k, v in pg_metrics.items()})
        return out

    @torch.no_grad()
    def _reference_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        assert self.reference is not None
        with self._autocast():
            logits = self.reference(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        return token_logprobs(logits[:, :-1], mb.targets)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- weights and checkpoints -------------------------------------------------------------

    def policy_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the policy weights (for publishing; tied weights appear under each name)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed learner needs to continue bit-identically.

        The reference model is not included: build the learner from the base model, then
        `load_state_dict`, and the reference stays the base model.
        """
        return {
            "step": self.step_count,
            "model": self.policy_state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.step_count = int(state["step"])


# --- metrics ---------------------------------------------------------------------------------


class _Totals:
    """Per-micro-batch parts summed into batch metrics.

    Losses are already divided by batch denominators, so they add up. Per-micro-batch
    means from verl (pg_clipfrac, ppo_kl) are weighted by their share of loss tokens.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.total_tokens = 0

    def add(self, parts: dict[str, float], mb: MicroBatch, loss_tokens: int) -> None:
        share = mb.loss_tokens / loss_tokens if loss_tokens else 0.0
        self.total_tokens += mb.tokens
        for key, value in parts.items():
            if key.startswith("mean:") and not share:
                continue  # verl's mean over no tokens is not a number
            if key.startswith("mean:"):
                key, value = key.removeprefix("mean:"), value * share
            elif key == "entropy_sum":
                key, value = "entropy", value / loss_tokens if loss_tokens else 0.0
            self.sums[key] = self.sums.get(key, 0.0) + value

    def metrics(self) -> dict[str, float]:
        out = dict(self.sums)
        out["loss"] = out.get("policy_loss", 0.0) + out.get("kl_loss", 0.0)
        out["tokens"] = float(self.total_tokens)
        return out


def _reward_metrics(groups: Sequence[Group], pass_threshold: float) -> dict[str, float]:
    rewards = np.array([t.reward for g in groups for t in g.trajectories], np.float64)
    ok = np.array([t.status == "ok" for g in groups for t in g.trajectories])
    if not len(rewards):
        return {}
    return {
        "reward_mean": float(rewards.mean()),
        "reward_max": float(rewards.max()),
        "reward_min": float(rewards.min()),
        "pass_rate": float((rewards >= pass_threshold - 1e-6).mean()),
        "failed_rate": float(1.0 - ok.mean()),
        "groups": float(len(groups)),
        "zero_variance_groups": float(sum(grpo.is_zero_variance(g) for g in groups)),
    }


def _advantage_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """Over trained tokens, as verl reports them: a long sample weighs more."""
    if not samples:
        return {}
    adv = np.concatenate([s.advantages[s.loss_mask == 1].astype(np.float64) for s in samples])
    if not len(adv):
        return {}
    return {
        "advantage_mean": float(adv.mean()),
        "advantage_std": float(adv.std()),
        "advantage_max": float(adv.max()),
        "advantage_min": float(adv.min()),
    }


# --- seeds, RNG and the reference ------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into `model`; a name missing from it is accepted only when its parameter
    shares storage with one that was loaded (tied weights are stored once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(f"weights do not fit the model: missing {untied[:5]}, unexpected {list(unexpected)[:5]}")


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref

