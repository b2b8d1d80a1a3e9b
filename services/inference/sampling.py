"""Per-row sampling over a batch of logits.

Every row carries its own temperature, top-p and `torch.Generator`, so a seeded request
draws the same tokens whatever else shares its batch. The logprob reported for a token is
the log-softmax of the temperature-scaled logits (unscaled for greedy rows): the quantity an
RL trainer recomputes from the same logits, independent of top-p truncation.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

# Below this a temperature is treated as greedy; dividing by it would overflow.
GREEDY_EPS = 1e-5
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0  # alternatives returned per token besides the sampled one
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        # torch takes seeds in [0, 2**64); fold any int into that range deterministically.
        gen.manual_seed((self.seed if self.seed is not None else secrets.randbits(63)) & 0xFFFF_FFFF_FFFF_FFFF)
        return gen


@dataclass
class Sampled:
    """What one sampling step produced for each row of the batch."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per row, may be empty


def sample(
    logits: torch.Tensor,
    configs: list[SamplingConfig],
    generators: list[torch.Generator | None],
) -> Sampled:
    """Pick one token per row of `logits` [B, V] under that row's config."""
    logits = logits.float()
    device = logits.device
    temps = torch.tensor([1.0 if c.greedy else c.temperature for c in configs], device=device)
    logprobs = torch.log_softmax(logits / temps[:, None], dim=-1)

    tokens = torch.argmax(logits, dim=-1)
    sampled_rows = [i for i, c in enumerate(configs) if not c.greedy]
    if sampled_rows:
        idx = torch.tensor(sampled_rows, device=device)
        probs = _top_p_filter(logprobs[idx].exp(), torch.tensor([configs[i].top_p for i in sampled_rows], device=device))
        for j, row in enumerate(sampled_rows):
            tokens[row] = torch.multinomial(probs[j], 1, generator=generators[row])[0]

    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    result = Sampled(tokens=tokens.tolist(), logprobs=chosen.tolist())
    k = max((c.top_logprobs for c in configs), default=0)
    if k:
        top_vals, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        vals, ids = top_vals.tolist(), top_ids.tolist()
        result.top = [list(zip(ids[i][: c.top_logprobs], vals[i][: c.top_logprobs])) for i, c in enumerate(configs)]
    else:
        result.top = [[] for _ in configs]
    return result


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail beyond cumulative mass `top_p` per row; the top token always survives."""
    if bool((top_p >= 1.0).all()):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cum = sorted_probs.cumsum(dim=-1)
    sorted_probs = sorted_probs.masked_fill(cum - sorted_probs > top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
