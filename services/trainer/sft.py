"""Supervised fine-tuning examples: conversations and stored trajectories as token sequences
with a loss mask on the assistant's tokens only.

Two sources, one `Sample` type (services/trainer/samples.py), so SFT batches through the same
micro-batching as GRPO:

- **Conversations** (`{"messages": [...], "tools": [...]}`, OpenAI chat format, assistant tool
  calls and tool results included) are rendered through the model's own chat template exactly
  as inference renders a prompt: for each assistant turn i, the prompt is the template applied
  to `messages[:i]` with the generation prompt, and the response is what rendering
  `messages[:i+1]` adds to it. Each piece is tokenized on its own (`add_special_tokens=False`,
  as inference tokenizes prompts), so the ids the model learns are the ids it sees and writes
  when serving: a prompt's tokens, then its reply's. Prompt text (system, user, tool results,
  the template's markers) gets mask 0; an assistant reply gets mask 1 up to and including its
  first stop token (`<|im_end|>`), the template's text after it (a newline) 0: the model never
  writes it. A template whose renderings do not extend each other turn by turn cannot be
  trained this way and is refused with the turn that broke it.
- **Stored trajectories** (rejection-sampling fine-tuning): the token ids recorded by the
  capture proxy, merged across calls exactly as GRPO merges them (`build_samples`), loss on
  the trained roles' response tokens. Nothing is re-tokenized.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jinja2
import numpy as np

from shared.messages import Group, Trajectory, check_conversation
from services.trainer.samples import Sample, build_samples


class ConversationError(ValueError):
    """A conversation that cannot become a training example; the text says which and why."""


def render_conversation(tokenizer: Any, row: dict[str, Any], stop_ids: set[int], name: str = "conversation") -> Sample:
    """One training sample of a conversation (see the module docstring)."""
    reason = check_conversation(row)
    if reason is not None:
        raise ConversationError(f"{name}: {reason}")
    messages: list[dict[str, Any]] = row["messages"]
    tools = row.get("tools") or None
    tokens: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    rendered = ""  # the text tokenized so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], tools, True, name)
        full = _render(tokenizer, messages[: i + 1], tools, False, name)
        if not prompt.startswith(rendered):
            raise ConversationError(
                f"{name}: the chat template renders messages[:{i}] differently from the turns before it, "
                "so the prompt of this turn does not extend the previous one"
            )
        if not full.startswith(prompt):
            raise ConversationError(f"{name}: the chat template's messages[{i}] does not continue its generation prompt")
        context = _ids(tokenizer, prompt[len(rendered) :])
        reply = _ids(tokenizer, full[len(prompt) :])
        trained = np.zeros(len(reply), np.int32)
        stops = [j for j, t in enumerate(reply) if int(t) in stop_ids]
        trained[: stops[0] + 1 if stops else len(reply)] = 1
        tokens += [context, reply]
        mask += [np.zeros(len(context), np.int32), trained]
        rendered = full
    return _sample(name, np.concatenate(tokens), np.concatenate(mask))


def render_conversations(tokenizer: Any, rows: Sequence[dict[str, Any]], stop_ids: set[int]) -> list[Sample]:
    """Every row as a sample; the first row that does not render stops with its index."""
    if not rows:
        raise ConversationError("the sft dataset is empty")
    return [render_conversation(tokenizer, row, stop_ids, name=f"dataset[{i}]") for i, row in enumerate(rows)]


def trajectory_samples(trajectories: Sequence[Trajectory], trained_roles: re.Pattern[str] | None) -> list[Sample]:
    """Samples of stored trajectories: their recorded ids, loss on trained roles' responses.

    The advantage slot carries 1.0 on trained tokens (the SFT loss ignores it); old logprobs
    and versions stay what the trajectory recorded."""
    samples: list[Sample] = []
    for t in trajectories:
        group = Group(run_id=t.run_id, group_id=t.group_id, task_id=t.task_id, trajectories=[t])
        samples += build_samples(group, trained_roles, {t.rollout_id: 1.0})
    return samples


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, generation: bool, name: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False)
    except (ValueError, TypeError, KeyError, jinja2.TemplateError) as exc:
        raise ConversationError(f"{name}: the chat template cannot render it: {type(exc).__name__}: {exc}") from None
    if not isinstance(text, str):
        raise ConversationError(f"{name}: the chat template rendered {type(text).__name__}, not text")
    return text


def _ids(tokenizer: Any, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def _sample(name: str, tokens: np.ndarray, mask: np.ndarray) -> Sample:
    n = len(tokens)
    return Sample(
        group_id=name,
        rollout_id=name,
        tokens=tokens,
        loss_mask=mask,
        old_logprobs=np.zeros(n, np.float32),
        versions=np.full(n, -1, np.int32),
        advantages=mask.astype(np.float32),
    )
