"""The calculator example: safe evaluator, answer extraction and reward, dataset generator,
the tool-call step logic and the agent loop (driven by scripted replies, since the tiny test
model never writes a valid tool call), AIR credit from its events, and one end-to-end run
through the real services."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from examples.calculator import calc, data
from examples.calculator.agent import (
    CALCULATOR_TOOL,
    MAX_CALLS_PER_TURN,
    NAME,
    ROLE,
    calculator_agent,
    first_messages,
    step,
)
from examples.calculator.calc import CalcError, calculator, evaluate
from examples.calculator.reward import answer_reward, extract_answer
from services.rollout.context import AgentContext
from services.rollout.registry import get
from services.trainer.credit import trajectory_credit
from shared.messages import Event, RolloutRequest, RunConfig, Trajectory, Transition, pack_f32, pack_i32
from tests.support.agent_stack import assert_captured, run_tasks, samples_of

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "calculator"


# ---------------------------------------------------------------- the evaluator


@pytest.mark.parametrize(
    "expression, value",
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("12 / 4", 3),
        ("7 // 2", 3),
        ("7 % 3", 1),
        ("2 ** 10", 1024),
        ("-3 + +5", 2),
        ("10 ** -3", 0.001),
        ("round(3.14159, 2)", 3.14),
        ("round(2.5)", 2),
        ("abs(-4.5)", 4.5),
        ("min(3, 1, 2) + max(4, 9)", 10),
        ("sqrt(16)", 4),
        ("floor(2.7) + ceil(2.1)", 5),
        ("4 × 2.5 ÷ 5", 2),
        ("1_000 * 3", 3000),
    ],
)
def test_evaluate_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == pytest.approx(value)


def test_results_are_formatted_without_float_noise() -> None:
    assert calculator("0.1 + 0.2") == "0.3"
    assert calculator("12 / 4") == "3"
    assert calculator("3 * 4.25") == "12.75"
    assert calculator("2 ** 40") == "1099511627776"


@pytest.mark.parametrize(
    "expression, why",
    [
        ("__import__('os')", "unknown function"),
        ("__import__('os').system('echo hi')", "unknown function"),
        ("open('/etc/passwd')", "unknown function"),
        ("eval('1+1')", "unknown function"),
        ("x + 1", "names"),
        ("pi * 2", "names"),
        ("(1).real", "not allowed"),
        ("().__class__", "not allowed"),
        ("(1).__class__.__bases__", "not allowed"),
        ("[1, 2][0]", "not allowed"),
        ("lambda: 1", "not allowed"),
        ("1 if 1 else 2", "not allowed"),
        ("1 < 2", "not allowed"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("1j * 1j", "only numbers"),
        ("round(x=1)", "positional"),
        ("max(*[1, 2])", "positional"),
        ("sqrt(1, 2)", "takes 1"),
        ("2 ^ 3", "**"),
        ("1,250 * 3", "commas"),
        ("1 << 10", "not allowed"),
        ("9 ** 9 ** 9", "exponent too large"),
        ("10 ** 100", "exponent too large"),
        ("2 ** 64", "too large"),
        ("99999999 * 99999999", "too large"),
        ("1e308 * 10", "too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("sqrt(-1)", "negative"),
        ("round(1, 100)", "digits"),
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("1 +", "cannot parse"),
        ("", "empty"),
        ("1 + " * 100 + "1", "too long"),
        ("+".join(["1"] * 100), "too complex"),
    ],
)
def test_evaluate_rejects(expression: str, why: str) -> None:
    with pytest.raises(CalcError, match=re.escape(why)):
        evaluate(expression)
    result = calculator(expression)  # the tool never raises: the model reads an error instead
    assert result.startswith("error: ") and why in result


def test_deep_nesting_is_bounded() -> None:
    # Within the length limit nesting is shallow enough to evaluate; past it, refused unparsed.
    assert calculator("(" * 120 + "1" + ")" * 120) == "1"
    assert calculator("-" * 250 + "1").startswith("error: expression too complex")
    assert calculator("(" * 1000 + "1" + ")" * 1000).startswith("error: expression too long")


def test_evaluator_never_evals() -> None:
    source = Path(calc.__file__).read_text()
    assert "eval(" not in source.replace("evaluate(", "").replace("_Evaluator(", "")
    assert "exec(" not in source and "compile(" not in source


def test_calculator_rejects_non_strings() -> None:
    assert calculator(None).startswith("error:")  # type: ignore[arg-type]
    assert calculator(["1+1"]).startswith("error:")  # type: ignore[arg-type]


# ---------------------------------------------------------------- answers and reward


@pytest.mark.parametrize(
    "text, value",
    [
        ("The total is $1,234.50.", 1234.5),
        ("Answer: 42 (after 3 steps)", 42),
        ("answer is -3", -3),
        ("The answer = 7.", 7),
        (r"So the result is \boxed{17}. Check: 3 + 4", 17),
        (r"\boxed{\$20.75}", 20.75),
        ("It drops by 15%", 15),
        ("Answer: 3/4", 0.75),
        ("First 12, then 30, so 45 cookies remain", 45),
        ("Total: 1,000,000", 1_000_000),
        ("It costs .5 dollars", 0.5),
        ("5 - 3 leaves 2", 2),
    ],
)
def test_extract_answer(text: str, value: float) -> None:
    assert extract_answer(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "no numbers here", "version v2", "\\boxed{}"])
def test_extract_answer_none(text: str) -> None:
    assert extract_answer(text) is None


def test_answer_reward() -> None:
    assert answer_reward("Answer: 20.75", 20.75) == 1.0
    assert answer_reward("Answer: $20.76", 20.75) == 1.0  # within 0.01
    assert answer_reward("Answer: 20.77", 20.75) == 0.0
    assert answer_reward("Answer: 972", 972) == 1.0
    assert answer_reward("I think 971", 972) == 0.0
    assert answer_reward("", 3) == 0.0
    assert answer_reward("Answer: 1,234", 1234) == 1.0


# ---------------------------------------------------------------- dataset


def test_dataset_deterministic_and_balanced() -> None:
    a, b = data.make_dataset(200, seed=3), data.make_dataset(200, seed=3)
    assert a == b and len(a) == 200
    assert data.make_dataset(200, seed=4) != a
    assert data.make_dataset(7, seed=3) == a[:7]  # a prefix: n does not change the draws
    k = len(data.TEMPLATES)
    assert k >= 5
    questions = {row["question"] for row in a}
    assert len(questions) > 190  # barely any repeats
    for row in a:
        assert set(row) == {"question", "answer"}
        assert isinstance(row["question"], str) and row["question"].endswith("?")
        assert isinstance(row["answer"], (int, float)) and not isinstance(row["answer"], bool)
        assert math.isfinite(row["answer"]) and row["answer"] >= 0
        assert Fraction(str(row["answer"])) * 100 == int(Fraction(str(row["answer"])) * 100)  # whole cents


def test_every_template_appears_in_every_block() -> None:
    # Each template has its own phrasings; one per block of len(TEMPLATES) rows.
    markers = {
        "shopping": ("buys",),
        "rates": ("per hour", "per minute"),
        "percentages": ("%",),
        "sharing": ("equally", "left over", "pack"),
        "multi_step": ("baker", "saves", "reads"),
    }
    assert set(markers) == set(data.TEMPLATES)
    rows = data.make_dataset(50, seed=0)
    k = len(data.TEMPLATES)
    for start in range(0, 50, k):
        block = [r["question"] for r in rows[start : start + k]]
        for name, words in markers.items():
            assert any(any(w in q for w in words) for q in block), (name, block)


@pytest.mark.parametrize("name", sorted(data.TEMPLATES))
def test_template_answers_match_the_question(name: str) -> None:
    # Recompute a few answers from the numbers in the text, independently of the generator.
    import random

    rng = random.Random(11)
    for _ in range(200):
        question, answer = data.TEMPLATES[name](rng)
        assert answer >= 0 and (answer * 100).denominator == 1, question
        nums = [Fraction(x.replace("$", "")) for x in re.findall(r"\$?\d+(?:\.\d+)?", question)]
        if "pages per minute" in question:
            assert answer == nums[1] / nums[0]
        elif "on sale for" in question:
            assert answer == nums[0] * (1 - nums[1] / 100)
        elif "grew by" in question:
            assert answer == nums[0] * (1 + nums[1] / 100)
        elif "left over" in question:
            assert answer == nums[0] % nums[1]
        elif "hold" in question:
            assert answer == -(-nums[0] // nums[1])
        elif "buys" in question and "change" in question:
            assert answer == nums[4] - (nums[0] * nums[1] + nums[2] * nums[3])
        elif "buys" in question:
            assert answer == nums[0] * nums[1] + nums[2] * nums[3]
        elif "baker" in question.lower():
            rest = nums[0] * nums[1] - nums[2]
            assert answer == rest - rest / 3


def test_committed_rows_come_from_the_generator() -> None:
    path = EXAMPLE / "rows.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows == data.make_dataset(len(rows), seed=0)
    assert 200 <= len(rows) and path.stat().st_size < 300_000


def test_train_yaml_is_a_valid_run() -> None:
    from services.cli.app import load_run_config

    config = RunConfig.model_validate(load_run_config(EXAMPLE / "train.yaml"))
    assert config.agent == NAME and config.model == "tiny"
    assert config.trained_roles == ROLE
    assert config.training.credit == "discounted"
    assert {r.on: r.reward for r in config.runtime.air_values()} == {"tool_success": 0.1, "tool_failure": -0.1}
    assert len(config.dataset) >= 200


# ---------------------------------------------------------------- one step of the loop


def tool_call(arguments: Any, name: str = "calculator", call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant(*calls: dict[str, Any], content: str | None = None) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def test_step_valid_call() -> None:
    args = json.dumps({"expression": "3 * 4.25 + 2"})
    out = step(assistant(tool_call(args), content="Let me compute."))
    assert out.final is None
    assert out.messages == [
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [tool_call(args)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "14.75"},
    ]
    assert out.events == [("tool_success", {"tool": "calculator", "expression": "3 * 4.25 + 2", "result": "14.75"})]


def test_step_keeps_argument_text_as_generated() -> None:
    # Re-rendering the call must reproduce the model's tokens, so the string is not re-serialized.
    args = '{"expression":   "1+1"}'
    out = step(assistant(tool_call(args)))
    assert out.messages[0]["tool_calls"][0]["function"]["arguments"] == args
    assert out.messages[1]["content"] == "2"


def test_step_invalid_expression() -> None:
    out = step(assistant(tool_call(json.dumps({"expression": "__import__('os')"}))))
    assert out.final is None
    assert out.messages[1]["role"] == "tool" and out.messages[1]["content"].startswith("error: ")
    [(name, data_)] = out.events
    assert name == "tool_failure"
    assert data_["tool"] == "calculator" and data_["expression"] == "__import__('os')" and data_["error"]


def test_step_division_by_zero() -> None:
    out = step(assistant(tool_call({"expression": "5 / 0"})))  # arguments as an object: accepted too
    assert out.messages[1]["content"] == "error: division by zero"
    assert out.events == [("tool_failure", {"tool": "calculator", "expression": "5 / 0", "error": "division by zero"})]


def test_step_unknown_tool() -> None:
    out = step(assistant(tool_call('{"query": "weather"}', name="web_search")))
    assert out.final is None
    assert out.messages[1]["tool_call_id"] == "call_1" and "unknown tool 'web_search'" in out.messages[1]["content"]
    assert out.events[0][0] == "tool_failure" and out.events[0][1]["tool"] == "web_search"


@pytest.mark.parametrize(
    "arguments", ['{"expression": "1+1"', "not json", "[1, 2]", '"1+1"', '{"expr": "1+1"}', '{"expression": null}']
)
def test_step_malformed_arguments(arguments: str) -> None:
    out = step(assistant(tool_call(arguments)))
    assert out.final is None
    assert out.messages[1]["content"].startswith("error: ")
    assert [name for name, _ in out.events] == ["tool_failure"]
    json.dumps(out.events)  # what ctx.event will require


def test_step_several_calls_and_the_cap() -> None:
    calls = [tool_call(json.dumps({"expression": f"{i} * 2"}), call_id=f"c{i}") for i in range(MAX_CALLS_PER_TURN + 2)]
    out = step(assistant(*calls))
    assert [m["role"] for m in out.messages] == ["assistant"] + ["tool"] * len(calls)
    assert [m["tool_call_id"] for m in out.messages[1:]] == [c["id"] for c in calls]
    ran = out.messages[1 : MAX_CALLS_PER_TURN + 1]
    assert [m["content"] for m in ran] == [str(i * 2) for i in range(MAX_CALLS_PER_TURN)]
    names = [name for name, _ in out.events]
    assert names == ["tool_success"] * MAX_CALLS_PER_TURN + ["tool_failure"] * 2


def test_step_final_answer() -> None:
    out = step({"role": "assistant", "content": "Answer: 20.75"})
    assert out.final == "Answer: 20.75" and out.events == []
    assert out.messages == [{"role": "assistant", "content": "Answer: 20.75"}]
    assert step({"role": "assistant", "content": None, "tool_calls": []}).final == ""


def test_step_accepts_openai_sdk_objects() -> None:
    from openai.types.chat import ChatCompletionMessage

    msg = ChatCompletionMessage.model_validate(
        {"role": "assistant", "content": None, "tool_calls": [tool_call('{"expression": "2**5"}')]}
    )
    out = step(msg)
    assert out.messages[1]["content"] == "32" and out.events[0][0] == "tool_success"
    assert out.messages[0]["tool_calls"][0]["id"] == "call_1"
    final = step(ChatCompletionMessage.model_validate({"role": "assistant", "content": "Answer: 3"}))
    assert final.final == "Answer: 3"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from shared.models import build_tokenizer

    return build_tokenizer()  # the project's tokenizer with its chat template, as inference renders


@pytest.mark.parametrize("before", ["", "Let me compute.\n"])
def test_tool_turn_rerenders_as_generated(tokenizer: Any, before: str) -> None:
    # The trainer merges a rollout's calls into one sample only if each prompt extends the
    # previous prompt + response exactly; so the reply `step` sends back must re-render as the
    # text the model generated (parsed by inference's own Hermes parser here).
    from services.inference.tools import parse_tool_calls

    tools, messages = [CALCULATOR_TOOL], first_messages("3 pens at $4.25 each?")
    prompt1 = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    generated = before + '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3 * 4.25"}}\n</tool_call>'
    parsed = parse_tool_calls(generated, tools)
    out = step({"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls})
    prompt2 = tokenizer.apply_chat_template(messages + out.messages, tools=tools, tokenize=False,
                                            add_generation_prompt=True)  # fmt: skip
    assert prompt2.startswith(prompt1 + generated + "<|im_end|>")
    assert prompt2[len(prompt1 + generated) :] == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n12.75\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_first_messages_and_tool_schema() -> None:
    msgs = first_messages("What is 2+2?")
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"] == "What is 2+2?"
    fn = CALCULATOR_TOOL["function"]
    assert CALCULATOR_TOOL["type"] == "function" and fn["name"] == "calculator"
    assert fn["parameters"]["required"] == ["expression"]


# ---------------------------------------------------------------- the agent loop, scripted


class ScriptedClient:
    """Stands in for `ctx.openai(role=...)`: answers with scripted assistant messages, records
    each call as a transition of the context (as the capture proxy would), keeps the requests."""

    def __init__(self, ctx: AgentContext, replies: list[dict[str, Any]]) -> None:
        self.ctx, self.replies, self.requests = ctx, list(replies), []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    async def create(self, **body: Any) -> Any:
        self.requests.append(json.loads(json.dumps(body)))  # a snapshot: the agent keeps appending
        self.ctx.record(Transition(role=ROLE, prompt_ids=pack_i32([1]), response_ids=pack_i32([2]),
                                   response_logprobs=pack_f32([0.0]), response_versions=pack_i32([0])))  # fmt: skip
        from openai.types.chat import ChatCompletionMessage

        message = ChatCompletionMessage.model_validate(self.replies.pop(0))
        return SimpleNamespace(choices=[SimpleNamespace(message=message)])


def scripted(row: dict[str, Any], replies: list[dict[str, Any]]) -> tuple[AgentContext, ScriptedClient]:
    request = RolloutRequest(rollout_id="r.0", run_id="r", task_id="t", group_id="t", sample_index=0,
                             group_size=1, agent=NAME, input=row)  # fmt: skip
    ctx = AgentContext(request=request, client=None)
    client = ScriptedClient(ctx, replies)
    roles: list[str] = []

    def openai(role: str = "assistant", **_: Any) -> ScriptedClient:
        roles.append(role)
        assert role == ROLE
        return client

    ctx.openai = openai  # type: ignore[method-assign]
    return ctx, client


async def test_agent_uses_the_tool_then_answers() -> None:
    row = {"question": "3 pens at $4.25 each?", "answer": 12.75}
    ctx, client = scripted(row, [
        assistant(tool_call('{"expression": "3 * 4.25"}')),
        assistant(tool_call('{"expression": "3 * "}', call_id="call_2")),
        {"role": "assistant", "content": "Answer: $12.75"},
    ])  # fmt: skip
    reward = await calculator_agent(ctx)
    assert reward == 1.0
    assert len(client.requests) == 3
    assert all(r["tools"] == [CALCULATOR_TOOL] and "max_tokens" not in r for r in client.requests)
    # The third prompt holds both turns and their results, in order.
    last = client.requests[2]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert last[3] == {"role": "tool", "tool_call_id": "call_1", "content": "12.75"}
    assert last[5]["content"].startswith("error: ")
    # Each event sits on the call that asked for the tool.
    assert [(e.name, e.transition) for e in ctx.events] == [("tool_success", 0), ("tool_failure", 1), ("answer", 2)]
    assert ctx.events[0].data == {"tool": "calculator", "expression": "3 * 4.25", "result": "12.75"}
    assert ctx.events[2].data == {"value": 12.75, "correct": True}


async def test_agent_wrong_answer_and_per_call_max_tokens() -> None:
    ctx, client = scripted({"question": "q", "answer": 5, "max_tokens": 7}, [{"role": "assistant", "content": "6"}])
    assert await calculator_agent(ctx) == 0.0
    assert client.requests[0]["max_tokens"] == 7
    assert [(e.name, e.data) for e in ctx.events] == [("answer", {"value": 6.0, "correct": False})]


async def test_agent_runs_out_of_turns() -> None:
    calls = [assistant(tool_call('{"expression": "1+1"}', call_id=f"c{i}")) for i in range(2)]
    ctx, client = scripted({"question": "q", "answer": 2, "max_turns": 2}, calls)
    assert await calculator_agent(ctx) == 0.0
    assert len(client.requests) == 2
    assert [e.name for e in ctx.events] == ["tool_success", "tool_success", "answer"]
    assert ctx.events[-1].data == {"value": None, "correct": False}


def test_agent_is_registered() -> None:
    registered = get(NAME)
    assert registered is not None and registered.fn is calculator_agent and registered.is_async


def test_air_credit_from_the_events() -> None:
    # What train.yaml's AIR rules and discounted credit make of a success, then a failure.
    from services.cli.app import load_run_config

    config = RunConfig.model_validate(load_run_config(EXAMPLE / "train.yaml"))
    t = Transition(role=ROLE)
    traj = Trajectory(rollout_id="r.0", run_id="r", task_id="t", group_id="t", sample_index=0, group_size=2,
                      agent=NAME, status="ok", reward=1.0, transitions=[t, t, t], started_at=0, finished_at=1,
                      worker_id="w",
                      events=[Event(name="tool_success", transition=0), Event(name="tool_failure", transition=1),
                              Event(name="answer", transition=2)])  # fmt: skip
    adv = trajectory_credit(traj, 1.0, re.compile(config.trained_roles), config.training.credit,
                            config.training.discount, config.runtime.air_values())  # fmt: skip
    g = config.training.discount
    assert adv == pytest.approx([1.0 + 0.1 - 0.1 * g, 1.0 - 0.1, 1.0])


# ---------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_calculator_end_to_end(agent_stack) -> None:  # type: ignore[no-untyped-def]
    rows = data.make_dataset(3, seed=5)
    trajs = run_tasks(agent_stack, NAME, rows, group_size=2, sampling={"max_tokens": 16})
    assert len(trajs) == 6
    for traj in trajs:
        assert traj.status == "ok", traj.error
        assert traj.agent == NAME
        assert traj.reward in (0.0, 1.0)
        assert 1 <= len(traj.transitions) <= 4
        assert {t.role for t in traj.transitions} == {ROLE}
        assert_captured(traj)
        for t in traj.transitions:
            assert 0 < len(t.response_ids) // 4 <= 16  # packed int32
        # Every call's outcome is an event: tool calls (rare from a random model), then the answer.
        names = [e.name for e in traj.events]
        assert names and names[-1] == "answer" and set(names) <= {"tool_success", "tool_failure", "answer"}
        assert traj.events[-1].data["correct"] == (traj.reward == 1.0)
        assert all(e.transition is not None and 0 <= e.transition < len(traj.transitions) for e in traj.events)
        # The solver is trained: exactly its sampled tokens carry loss; prompts and tool results do not.
        response_tokens = sum(len(t.response_ids) // 4 for t in traj.transitions)
        samples = samples_of(traj, ROLE)
        assert samples and sum(int(s.loss_mask.sum()) for s in samples) == response_tokens
        for s in samples:
            assert np.all(s.versions[s.loss_mask == 1] >= 0) and np.all(s.old_logprobs[s.loss_mask == 1] <= 0)
        # A run that trains some other role leaves every solver token out of the loss.
        assert sum(int(s.loss_mask.sum()) for s in samples_of(traj, "judge")) == 0
    by_task = {}
    for traj in trajs:
        by_task.setdefault(traj.task_id, []).append(traj)
    assert len(by_task) == 3 and all(len(v) == 2 for v in by_task.values())
