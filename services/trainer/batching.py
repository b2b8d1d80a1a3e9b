"""Micro-batches: samples packed under a token budget, as tensors for a causal LM.

Every tensor of a micro-batch is (rows, padded_length - 1) and aligned with the *targets*:
position j holds what is needed to score token j + 1 from the logits at position j, so the
loss mask, old logprobs and advantages of a sample are shifted left by one once here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from services.trainer.samples import Sample


@dataclass
class MicroBatch:
    """Right-padded tensors of some samples; `targets`-aligned tensors are one shorter."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (B, T-1) long: input_ids shifted left
    loss_mask: torch.Tensor  # (B, T-1) float
    old_logprobs: torch.Tensor  # (B, T-1) float
    advantages: torch.Tensor  # (B, T-1) float: per-token advantages (0 where loss_mask is 0)
    sample_index: list[int]  # positions of the rows in the list given to `pack`

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum().item())

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            targets=self.targets.to(device),
            loss_mask=self.loss_mask.to(device),
            old_logprobs=self.old_logprobs.to(device),
            advantages=self.advantages.to(device),
            sample_index=self.sample_index,
        )


def plan_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group sample positions so that padded length x rows <= token_budget.

    Longest first (ties by position, so the plan depends only on the lengths), filled
    greedily: similar lengths share a batch and little is spent on padding. A sample longer
    than the budget on its own still gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Longest first: the batch's padded length is that of its first sample.
        width = lengths[current[0]] if current else lengths[i]
        if current and width * (len(current) + 1) > token_budget:
            plan.append(current)
            current = []
        current.append(i)
    if current:
        plan.append(current)
    return plan


def collate(samples: Sequence[Sample], index: Sequence[int], pad_id: int = 0) -> MicroBatch:
    """Right-padded tensors for `samples[i]` for each i in `index`."""
    rows = [samples[i] for i in index]
    width = max(len(s) for s in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    attn = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.float32)
    old = np.zeros((len(rows), width), np.float32)
    adv = np.zeros((len(rows), width), np.float32)
    for r, s in enumerate(rows):
        n = len(s)
        ids[r, :n] = s.tokens
        attn[r, :n] = 1
        mask[r, :n] = s.loss_mask
        old[r, :n] = s.old_logprobs
        adv[r, :n] = s.advantages
    return MicroBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(attn),
        targets=torch.from_numpy(ids[:, 1:].copy()),
        loss_mask=torch.from_numpy(mask[:, 1:].copy()),
        old_logprobs=torch.from_numpy(old[:, 1:].copy()),
        advantages=torch.from_numpy(adv[:, 1:].copy()),
        sample_index=list(index),
    )


def pack(samples: Sequence[Sample], token_budget: int, pad_id: int = 0) -> list[MicroBatch]:
    """All samples as micro-batches within `token_budget`, in a deterministic order."""
    plan = plan_micro_batches([len(s) for s in samples], token_budget)
    return [collate(samples, index, pad_id) for index in plan]


# --- from logits -------------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position; logits (B, T, V) for positions aligned with targets (B, T).

    log_softmax in at least float32 subtracts the row max first, so it neither overflows nor
    loses precision in bf16 (float64 logits stay float64).
    """
    logp = torch.log_softmax(_at_least_f32(logits), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position (differentiable: pass detached
    logits for a metric, live ones for an entropy bonus)."""
    logp = torch.log_softmax(_at_least_f32(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _at_least_f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))
