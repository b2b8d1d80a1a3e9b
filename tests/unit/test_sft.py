"""SFT examples and steps: which tokens are trained, that stored trajectories keep their exact
ids, that bad data is refused with a reason, and that a step lowers the assistant's loss."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.messages import RunConfig, TrainingConfig, check_conversation, pack_i32
from shared.models import IM_END, load_causal_lm, load_tokenizer, stop_token_ids
from services.trainer.learner import Learner
from services.trainer.sft import ConversationError, render_conversation, render_conversations, trajectory_samples
from services.trainer.sft_run import step_indices
from tests.support.factories import make_trajectory

TOOL = {
    "type": "function",
    "function": {"name": "calculator", "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}},
}
CALL = {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6 * 7"}'}}
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You solve problems."},
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_0", "content": "42"},
        {"role": "assistant", "content": "Answer: 42"},
    ],
    "tools": [TOOL],
}


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(tiny)


@pytest.fixture(scope="module")
def stops(tiny: Path, tokenizer) -> set[int]:  # type: ignore[no-untyped-def]
    return stop_token_ids(load_causal_lm(tiny), tokenizer)


def trained_text(tokenizer, sample) -> list[str]:  # type: ignore[no-untyped-def]
    """The trained tokens' text, one string per contiguous run of mask 1."""
    runs, current = [], []
    for token, m in zip(sample.tokens.tolist(), sample.loss_mask.tolist()):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def test_only_the_assistant_turns_are_trained_tool_calls_included(tokenizer, stops) -> None:  # type: ignore[no-untyped-def]
    sample = render_conversation(tokenizer, CONVERSATION, stops)
    # Exactly the two replies as the model writes them, each up to its stop token; the system
    # prompt, the question, the tool schema, the tool's result and the role markers are context.
    assert trained_text(tokenizer, sample) == [
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7"}}\n</tool_call>' + IM_END,
        "Answer: 42" + IM_END,
    ]
    # The whole sequence is the full rendering, token for token what inference would build.
    full = tokenizer.apply_chat_template(CONVERSATION["messages"], tools=[TOOL], tokenize=False)
    assert tokenizer.decode(sample.tokens.tolist()) == full
    assert sample.loss_mask.dtype == np.int32 and sample.advantages[sample.loss_mask == 1].min() == 1.0


def test_each_prompt_is_tokenized_as_inference_tokenizes_it(tokenizer, stops) -> None:  # type: ignore[no-untyped-def]
    sample = render_conversation(tokenizer, CONVERSATION, stops)
    # The second reply's prompt, rendered and tokenized alone (as the inference API does), is
    # exactly the sample's tokens before that reply.
    prompt = tokenizer.apply_chat_template(CONVERSATION["messages"][:4], tools=[TOOL], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert sample.tokens[: len(ids)].tolist() == ids
    assert sample.loss_mask[len(ids) - 1] == 0 and sample.loss_mask[len(ids)] == 1


def test_a_conversation_that_does_not_render_is_refused_with_its_index(tokenizer, stops) -> None:  # type: ignore[no-untyped-def]
    nameless = json.loads(json.dumps(CONVERSATION))
    del nameless["messages"][2]["tool_calls"][0]["function"]["name"]  # the template needs the name
    with pytest.raises(ConversationError, match=r"dataset\[1\].*cannot render"):
        render_conversations(tokenizer, [CONVERSATION, nameless], stops)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "hi"}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "assistant", "content": ""}]}, "neither content nor tool_calls"),
        ({"messages": [{"role": "assistant", "content": "x"}], "tools": "calculator"}, "tools"),
    ],
)
def test_malformed_conversations_are_named(row: dict, reason: str) -> None:
    assert reason in (check_conversation(row) or "")


def test_an_empty_dataset_is_refused(tokenizer, stops) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConversationError, match="empty"):
        render_conversations(tokenizer, [], stops)


def test_run_config_refuses_sft_rows_that_are_not_conversations() -> None:
    with pytest.raises(ValueError, match=r"dataset\[0\] is not an sft conversation"):
        RunConfig(agent="calculator", algorithm="sft", dataset=[{"question": "1+1", "answer": 2}])
    with pytest.raises(ValueError, match="not both"):
        RunConfig(agent="a", algorithm="sft", dataset=[CONVERSATION], sft={"from_run": "other"})
    with pytest.raises(ValueError, match="algorithm: sft"):
        RunConfig(agent="a", sft={"from_run": "other"})
    with pytest.raises(ValueError, match="mode 'replay' does not apply"):
        RunConfig(agent="a", algorithm="sft", dataset=[CONVERSATION], mode="replay")
    with pytest.raises(ValueError, match="no KL term"):
        RunConfig(agent="a", algorithm="sft", dataset=[CONVERSATION], training={"kl_coef": 0.1})
    with pytest.raises(ValueError, match="give sft.from_run"):
        RunConfig(agent="a", algorithm="sft", dataset=[CONVERSATION], sft={"min_reward": 1.0})
    with pytest.raises(ValueError, match="another run"):
        RunConfig(run_id="x", agent="a", dataset=[{}], init_from="x")
    config = RunConfig(agent="a", algorithm="sft", sft={"from_run": "other", "min_reward": 1.0})
    assert not config.asks_rollouts and RunConfig(agent="a", dataset=[{}]).asks_rollouts


def test_stored_trajectories_train_on_their_exact_ids() -> None:
    t = make_trajectory("task.0", n_tokens=4)
    second = t.transitions[0].model_copy(
        update={"role": "check", "prompt_ids": pack_i32([1, 2, 3, 0, 1, 2, 3, 9]), "response_ids": pack_i32([11, 12])}
    )
    t = t.model_copy(update={"transitions": [t.transitions[0].model_copy(update={"role": "write"}), second]})
    [sample] = trajectory_samples([t], re.compile("write"))
    # The second call's prompt extends the first call's context: one sequence, recorded ids,
    # only the trained role's response has loss.
    assert sample.tokens.tolist() == [1, 2, 3, 0, 1, 2, 3, 9, 11, 12]
    assert sample.loss_mask.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert trajectory_samples([t], re.compile("rewrite")) == []


def test_every_example_is_seen_once_per_epoch_in_a_seeded_order() -> None:
    n, batch = 10, 4
    steps = [step_indices(n, batch, s, seed=3) for s in range(5)]  # 20 positions = 2 epochs
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:], "each epoch is shuffled on its own"
    assert steps == [step_indices(n, batch, s, seed=3) for s in range(5)]
    assert step_indices(n, batch, 0, seed=3, shuffle=False) == [0, 1, 2, 3]


def test_sft_steps_lower_the_assistant_loss(tiny: Path, tokenizer, stops) -> None:  # type: ignore[no-untyped-def]
    sample = render_conversation(tokenizer, CONVERSATION, stops)
    learner = Learner(load_causal_lm(tiny), TrainingConfig(learning_rate=3e-3), seed=0, device="cpu")
    first = learner.sft_step([sample])
    for _ in range(20):
        last = learner.sft_step([sample])
    assert first.metrics["loss_tokens"] == sample.loss_tokens
    assert first.metrics["sft_loss"] > 0 and math.isfinite(first.metrics["grad_norm"])
    assert last.metrics["sft_loss"] < 0.5 * first.metrics["sft_loss"]
    assert last.metrics["token_accuracy"] > first.metrics["token_accuracy"]


def test_micro_batching_does_not_change_the_sft_step(tiny: Path, tokenizer, stops) -> None:  # type: ignore[no-untyped-def]
    rows = [CONVERSATION, {"messages": CONVERSATION["messages"][:2] + [{"role": "assistant", "content": "Answer: 41"}]}]
    samples = render_conversations(tokenizer, rows, stops)
    results = {}
    for budget in (4096, 16):
        cfg = TrainingConfig(learning_rate=1e-3, micro_batch_tokens=budget)
        learner = Learner(load_causal_lm(tiny), cfg, device="cpu", master_dtype=torch.float64)
        result = learner.sft_step(samples)
        results[budget] = (result, {k: v.clone() for k, v in learner.model.state_dict().items()})
    (one, w_one), (many, w_many) = results[4096], results[16]
    assert one.metrics["micro_batches"] == 1 and many.metrics["micro_batches"] == 2
    # float64 master weights: the two summation orders differ by rounding of ~1e-16 per term.
    terms = sum(s.loss_tokens for s in samples)
    eps64 = torch.finfo(torch.float64).eps
    assert many.metrics["sft_loss"] == pytest.approx(one.metrics["sft_loss"], rel=terms * eps64 * 8)
    assert all(torch.allclose(w_one[k], w_many[k], rtol=0, atol=1e-12) for k in w_one)


def test_init_from_weights_load_with_tied_tensors_stored_once(tiny: Path) -> None:
    source = Learner(load_causal_lm(tiny), TrainingConfig(), seed=1, device="cpu")
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(0.01)
    state = source.policy_state()
    state.pop("lm_head.weight", None)  # tied to the embeddings: published once (shared/weights.py)
    target = Learner(load_causal_lm(tiny), TrainingConfig(kl_coef=0.01), seed=0, device="cpu")
    target.load_policy(state)
    got = target.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert torch.equal(got["lm_head.weight"], state["model.embed_tokens.weight"])
    # The KL anchor is the warm start too, and a resumed run sets it alone.
    assert target.reference is not None
    assert all(torch.equal(target.reference.state_dict()[k], v) for k, v in state.items())
    resumed = Learner(load_causal_lm(tiny), TrainingConfig(kl_coef=0.01), seed=0, device="cpu")
    resumed.load_reference(state)
    assert resumed.reference is not None and torch.equal(resumed.reference.state_dict()["lm_head.weight"], state["model.embed_tokens.weight"])
    assert not torch.equal(resumed.model.state_dict()["lm_head.weight"], state["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="unexpected"):
        target.load_policy({**state, "extra.weight": torch.zeros(1)})
