"""SFT warm-start data of the calculator and text-to-SQL examples: demonstrations are the very
conversations the agents have (replayed through the real agent loops with the demonstrations'
replies as the model), their imperfections are real and as frequent as `DemoMix` says, the
held-out splits never meet the demonstrations or the RL rows, and the calculator's tool calls
survive the project's chat template and inference's tool-call parser.

Frequencies are checked within 4 binomial standard deviations, sqrt(p (1 - p) / n), of the
mix's probability: a correct generator fails that about once in 16,000 checks, and the
samples are fixed by their seeds, so a pass is a pass for good.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessage

from examples.calculator import data as calc_data
from examples.calculator import demos as calc_demos
from examples.calculator.agent import CALCULATOR_TOOL, SYSTEM_PROMPT, calculator_agent, first_messages
from examples.calculator.calc import calculator, evaluate
from examples.calculator.reward import answer_reward
from examples.text_to_sql import demos as sql_demos
from examples.text_to_sql.agent import (
    APPROVAL,
    CHECK_SYSTEM,
    DEFAULT_MAX_TURNS,
    WRITE_SYSTEM,
    approved,
    text_to_sql_agent,
)
from examples.text_to_sql.data import make_dataset as make_sql_dataset
from examples.text_to_sql.databases import database_path
from examples.text_to_sql.reward import execution_reward
from examples.text_to_sql.sql import execute_sql, extract_sql
from services.inference.tools import parse_tool_calls

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SIGMAS = 4


def assert_rate(hits: int, n: int, p: float, what: str) -> None:
    """`hits` out of `n` is within SIGMAS binomial standard deviations of probability `p`."""
    assert n > 0, what
    tolerance = SIGMAS * math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) <= tolerance, f"{what}: {hits}/{n} = {hits / n:.3f}, expected {p:.3f} +- {tolerance:.3f}"


class ScriptedModel:
    """A model that answers each role's calls with the next scripted assistant message, and
    keeps every request the agent sent (a snapshot: the agents keep appending to their lists)."""

    def __init__(self, inp: dict[str, Any], replies: dict[str, list[dict[str, Any]]]) -> None:
        self.input = inp
        self.model = "scripted"
        self.replies = {role: list(messages) for role, messages in replies.items()}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    def openai(self, role: str = "assistant", **_: Any) -> Any:
        async def create(**body: Any) -> Any:
            self.requests.append((role, json.loads(json.dumps(body))))
            message = ChatCompletionMessage.model_validate(self.replies[role].pop(0))
            return SimpleNamespace(choices=[SimpleNamespace(message=message)])

        return SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))

    def event(self, name: str, step: int | None = None, **data: Any) -> None:
        self.events.append((name, data))


# ================================================================ calculator: the problems


def test_rows_jsonl_is_still_what_the_generator_writes() -> None:
    written = "".join(json.dumps(row) + "\n" for row in calc_data.make_dataset(400, 0))
    assert written == (EXAMPLES / "calculator" / "rows.jsonl").read_text()


@pytest.mark.parametrize("seed", [0, 3, 17])
def test_problems_are_the_dataset_rows_with_kinds_and_expressions(seed: int) -> None:
    problems = calc_data.make_problems(250, seed)
    assert [calc_data.as_row(p) for _, p in problems] == calc_data.make_dataset(250, seed)
    # The (question, answer) view draws exactly what the problem generators draw.
    for kind in calc_data.PROBLEMS:
        a, b = random.Random(seed), random.Random(seed)
        for _ in range(20):
            problem = calc_data.PROBLEMS[kind](a)
            assert calc_data.TEMPLATES[kind](b) == (problem.question, problem.answer)


def test_every_expression_computes_its_problems_answer() -> None:
    kinds: Counter[str] = Counter()
    for seed in (1, 2, 3):
        for kind, problem in calc_data.make_problems(2000, seed):
            kinds[kind] += 1
            shown = calculator(problem.expression)
            assert not shown.startswith("error"), (problem.expression, shown)
            assert abs(float(shown) - float(problem.answer)) <= 0.01, (problem, shown)
            assert abs(evaluate(problem.expression) - float(problem.answer)) < 1e-6, problem
    assert set(kinds) == set(calc_data.PROBLEMS) and min(kinds.values()) == 1200


# ================================================================ calculator: demonstrations


@pytest.fixture(scope="module")
def calc_rows() -> list[dict[str, Any]]:
    return calc_demos.demonstrations(2000, seed=1)


def test_a_tool_demonstration_is_the_agents_conversation(calc_rows: list[dict[str, Any]]) -> None:
    row = next(r for r in calc_rows if r["meta"]["tool"] and r["meta"]["correct"])
    system, user, call, tool, final = row["messages"]
    assert [system, user] == first_messages(user["content"]) and system["content"] == SYSTEM_PROMPT
    assert row["tools"] == [CALCULATOR_TOOL]
    assert call["role"] == "assistant" and call["content"] is None
    [tool_call] = call["tool_calls"]
    assert tool_call["id"] == tool["tool_call_id"] == "call_0" and tool_call["type"] == "function"
    assert tool_call["function"]["name"] == "calculator"
    expression = json.loads(tool_call["function"]["arguments"])["expression"]
    assert tool == {"role": "tool", "tool_call_id": "call_0", "content": calculator(expression)}
    assert final == {"role": "assistant", "content": f"Answer: {tool['content']}"}
    assert answer_reward(final["content"], row["meta"]["answer"]) == 1.0


async def test_demonstrations_replay_through_the_agent_with_the_reward_they_claim(
    calc_rows: list[dict[str, Any]],
) -> None:
    # The agent, given the demonstration's assistant turns as the model's replies, sends the
    # demonstration's prompts word for word, computes the same tool results, and scores the
    # answer as the demonstration's `correct` says.
    for row in calc_rows[:300]:
        messages = row["messages"]
        replies = [m for m in messages if m["role"] == "assistant"]
        inp = {"question": messages[1]["content"], "answer": row["meta"]["answer"]}
        model = ScriptedModel(inp, {"solver": replies})
        reward = await calculator_agent(model)  # type: ignore[arg-type]
        assert reward == (1.0 if row["meta"]["correct"] else 0.0), row
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert [body["messages"] for _, body in model.requests] == [messages[:i] for i in turns]
        assert all(body["tools"] == row["tools"] == [CALCULATOR_TOOL] for _, body in model.requests)
        assert [name for name, _ in model.events][:-1] == (["tool_success"] if row["meta"]["tool"] else [])


def test_head_math_answers_skip_the_tool_and_are_always_wrong(calc_rows: list[dict[str, Any]]) -> None:
    direct = [r for r in calc_rows if not r["meta"]["tool"]]
    assert direct
    for row in direct:
        assert len(row["messages"]) == 3 and "tool_calls" not in row["messages"][2]
        assert row["messages"][2]["content"].startswith("Answer: ")
        assert answer_reward(row["messages"][2]["content"], row["meta"]["answer"]) == 0.0
        assert not row["meta"]["correct"]


def test_slips_and_mistaken_expressions_are_never_right() -> None:
    rng = random.Random(5)
    for _kind, problem in calc_data.make_problems(3000, 8):
        slip = calc_demos.head_math_slip(problem, rng)
        assert float(slip) >= 0 and answer_reward(f"Answer: {slip}", float(problem.answer)) == 0.0, (problem, slip)
        expression, shown = calc_demos.mistaken_expression(problem, rng)
        assert expression != problem.expression and shown == calculator(expression) and not shown.startswith("error")
        assert answer_reward(f"Answer: {calc_demos.plain(float(shown))}", float(problem.answer)) == 0.0


def test_mistaken_tool_demonstrations_answer_with_the_tools_wrong_result(calc_rows: list[dict[str, Any]]) -> None:
    wrong = [r for r in calc_rows if r["meta"]["tool"] and not r["meta"]["correct"]]
    assert wrong
    for row in wrong:
        tool, final = row["messages"][3], row["messages"][4]
        assert final["content"] == f"Answer: {calc_demos.plain(float(tool['content']))}"
        assert answer_reward(final["content"], row["meta"]["answer"]) == 0.0


def test_the_mix_sets_how_often_the_tool_is_used_and_misused(calc_rows: list[dict[str, Any]]) -> None:
    mix = calc_demos.DemoMix()
    for kind, p in mix.tool_use.items():
        of_kind = [r for r in calc_rows if r["meta"]["kind"] == kind]
        assert_rate(sum(r["meta"]["tool"] for r in of_kind), len(of_kind), p, f"tool use on {kind}")
    tool_rows = [r for r in calc_rows if r["meta"]["tool"]]
    wrong = sum(not r["meta"]["correct"] for r in tool_rows)
    assert_rate(wrong, len(tool_rows), mix.wrong_expression, "mistaken expressions")
    right = sum(r["meta"]["correct"] for r in calc_rows)
    assert_rate(right, len(calc_rows), calc_demos.expected_accuracy(mix), "imitation accuracy")


def test_the_default_mix_implies_the_documented_imitation_accuracy() -> None:
    mix = calc_demos.DemoMix()
    by_formula = sum(p * (1 - mix.wrong_expression) for p in mix.tool_use.values()) / len(calc_data.PROBLEMS)
    assert calc_demos.expected_accuracy(mix) == pytest.approx(by_formula) == pytest.approx(0.378)
    assert "37.8%" in (calc_demos.__doc__ or "")
    assert 0.2 <= calc_demos.expected_accuracy(mix) <= 0.4
    everything = calc_demos.DemoMix(tool_use=dict.fromkeys(calc_data.PROBLEMS, 1.0), wrong_expression=0.0)
    assert calc_demos.expected_accuracy(everything) == 1.0
    assert all(r["meta"]["correct"] for r in calc_demos.demonstrations(50, 2, everything))
    with pytest.raises(ValueError, match="one probability per kind"):
        calc_demos.DemoMix(tool_use={"shopping": 0.5})


def test_calculator_demonstrations_are_deterministic_per_seed(calc_rows: list[dict[str, Any]]) -> None:
    assert calc_demos.demonstrations(2000, seed=1) == calc_rows
    assert calc_demos.demonstrations(150, seed=1) == calc_rows[:150]  # a prefix: n changes no draw
    assert calc_demos.demonstrations(150, seed=2) != calc_rows[:150]


def test_calculator_held_out_questions_are_never_demonstrated_nor_rl_rows(calc_rows: list[dict[str, Any]]) -> None:
    held_out = calc_demos.eval_rows(200)
    assert held_out == calc_demos.eval_rows(200) and len(held_out) == 200
    assert all(set(r) == {"question", "answer"} for r in held_out)
    questions = [r["question"] for r in held_out]
    assert len(set(questions)) == 200
    rl = {json.loads(line)["question"] for line in (EXAMPLES / "calculator" / "rows.jsonl").read_text().splitlines()}
    demonstrated = {r["messages"][1]["content"] for r in calc_rows}
    for seed in (0, 2, calc_demos.EVAL_SEED):  # any seed: the reserved share is never demonstrated
        demonstrated |= {r["messages"][1]["content"] for r in calc_demos.demonstrations(1000, seed)}
    assert not set(questions) & rl and not set(questions) & demonstrated
    # Problems of the evaluation seed, as the generator made them, every kind once per block of five.
    drawn = {p.question: (kind, p) for kind, p in calc_data.make_problems(20_000, calc_demos.EVAL_SEED)}
    assert [drawn[q][0] for q in questions] == list(calc_data.PROBLEMS) * 40
    assert held_out == [calc_data.as_row(drawn[q][1]) for q in questions]


def test_calculator_command_line_writes_jsonl(tmp_path: Path) -> None:
    calc_demos.main(["demos", "--n", "7", "--seed", "4", "--out", str(tmp_path / "demos.jsonl")])
    calc_demos.main(["eval", "--n", "5", "--out", str(tmp_path / "eval.jsonl")])
    read = [json.loads(line) for line in (tmp_path / "demos.jsonl").read_text().splitlines()]
    assert read == calc_demos.demonstrations(7, 4)
    assert [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == calc_demos.eval_rows(5)


# ================================================================ calculator: the model's side


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from shared.models import build_tokenizer

    return build_tokenizer()


def test_tool_calls_render_through_the_chat_template_and_parse_back(
    tokenizer: Any, calc_rows: list[dict[str, Any]]
) -> None:
    # What the model learns to write for a tool call is exactly what inference turns back into
    # that call: same tool, same arguments.
    tool_rows = [r for r in calc_rows if r["meta"]["tool"]][:60]
    assert any(not r["meta"]["correct"] for r in tool_rows)
    for row in tool_rows:
        messages, tools = row["messages"], row.get("tools")
        tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:2], tools=tools, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages[:3], tools=tools, tokenize=False)
        assert full.startswith(prompt)
        parsed = parse_tool_calls(full[len(prompt) :], tools)
        [call] = parsed.tool_calls
        [wanted] = messages[2]["tool_calls"]
        assert call["function"]["name"] == wanted["function"]["name"] == "calculator"
        assert call["function"]["arguments"] == wanted["function"]["arguments"]
        assert json.loads(call["function"]["arguments"]) == json.loads(wanted["function"]["arguments"])
    for row in calc_rows[:200]:  # head-math rows too
        tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)


def test_demonstrations_become_sft_samples(tokenizer: Any, calc_rows: list[dict[str, Any]]) -> None:
    from services.trainer.sft import render_conversations

    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    samples = render_conversations(tokenizer, calc_rows[:40] + sql_demos.demonstrations(6, seed=1), stops)
    assert len(samples) == 46 and all(s.loss_mask.sum() > 0 for s in samples)


# ================================================================ text-to-SQL: demonstrations


@pytest.fixture(scope="module")
def sql_rows() -> list[dict[str, Any]]:
    return sql_demos.demonstrations(2000, seed=1)


def episodes(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by episode, in order; the last one dropped (`n` may have cut it short)."""
    grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["meta"]["episode"]].append(row)
    return list(grouped.values())[:-1]


def question_of(row: dict[str, Any]) -> str:
    """The question a text-to-SQL demonstration's first user message asks."""
    return str(row["messages"][1]["content"].split("\n\nQuestion: ", 1)[1].split("\n\n", 1)[0])


def query_is_right(meta: dict[str, Any], answer: str) -> bool:
    db = database_path(meta["db_id"])
    gold = execute_sql(db, meta["gold_sql"])
    return execution_reward(execute_sql(db, extract_sql(answer)), gold, meta["gold_sql"]) == 1.0


def test_each_role_gets_the_agents_prompt(sql_rows: list[dict[str, Any]]) -> None:
    systems = {"write": WRITE_SYSTEM, "rewrite": WRITE_SYSTEM, "check": CHECK_SYSTEM}
    for row in sql_rows:
        role, messages = row["meta"]["role"], row["messages"]
        assert set(row) == {"messages", "meta"}  # no tools: the agent offers none
        assert messages[0] == {"role": "system", "content": systems[role]}
        assert messages[-1]["role"] == "assistant" and messages[-2]["role"] == "user"
        assert "Schema:\nCREATE TABLE" in messages[1]["content"]
        if role != "check":
            assert messages[-1]["content"].startswith("```sql\n") and messages[-1]["content"].endswith("\n```")


def test_written_queries_are_right_exactly_when_marked_correct(sql_rows: list[dict[str, Any]]) -> None:
    # Wrong SQL is really wrong: it fails, or returns what the reward does not accept.
    for row in sql_rows:
        if row["meta"]["role"] != "check":
            assert query_is_right(row["meta"], row["messages"][-1]["content"]) == row["meta"]["correct"], row


async def test_episodes_replay_through_the_agent_loop(sql_rows: list[dict[str, Any]]) -> None:
    # The agent, answered with an episode's replies, makes exactly the episode's calls (same
    # roles, same messages, real query results in them), and its reward is the last query's.
    for episode in episodes(sql_rows)[:150]:
        meta = episode[0]["meta"]
        replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in episode:
            replies[row["meta"]["role"]].append(row["messages"][-1])
        inp = {"db_id": meta["db_id"], "gold_sql": meta["gold_sql"], "question": question_of(episode[0])}
        model = ScriptedModel(inp, replies)
        reward = await text_to_sql_agent(model)  # type: ignore[arg-type]
        assert [(role, body["messages"]) for role, body in model.requests] == [
            (row["meta"]["role"], row["messages"][:-1]) for row in episode
        ]
        queries = [row for row in episode if row["meta"]["role"] != "check"]
        assert reward == (1.0 if queries[-1]["meta"]["correct"] else 0.0)


def test_verdicts_are_right_exactly_when_marked_correct(sql_rows: list[dict[str, Any]]) -> None:
    for episode in episodes(sql_rows):
        assert episode[0]["meta"]["role"] == "write"
        assert len([r for r in episode if r["meta"]["role"] != "check"]) <= DEFAULT_MAX_TURNS
        answer = episode[0]["messages"][-1]["content"]
        for row in episode[1:]:
            if row["meta"]["role"] == "check":
                verdict = row["messages"][-1]["content"]
                assert approved(verdict) == (verdict == APPROVAL)
                assert (approved(verdict) == query_is_right(row["meta"], answer)) == row["meta"]["correct"]
                assert row is episode[-1] or not approved(verdict)  # approval ends the loop
            else:
                answer = row["messages"][-1]["content"]


def test_the_mix_sets_how_often_each_role_is_wrong(sql_rows: list[dict[str, Any]]) -> None:
    mix = sql_demos.DemoMix()
    by_role: dict[str, list[bool]] = defaultdict(list)
    for row in sql_rows:
        by_role[row["meta"]["role"]].append(row["meta"]["correct"])
    for role, p in (("write", mix.wrong_write), ("check", mix.wrong_verdict), ("rewrite", mix.unfixed_rewrite)):
        assert_rate(by_role[role].count(False), len(by_role[role]), p, f"wrong {role}s")
    finals = [[r for r in e if r["meta"]["role"] != "check"][-1]["meta"]["correct"] for e in episodes(sql_rows)]
    assert_rate(sum(finals), len(finals), sql_demos.expected_accuracy(mix), "imitation accuracy of the loop")
    assert 0.2 <= 1 - mix.wrong_write <= 0.4  # the write step's imitation accuracy
    assert sql_demos.expected_accuracy(mix) == pytest.approx(0.43125) and "43.1%" in (sql_demos.__doc__ or "")
    assert sql_demos.expected_accuracy(mix, max_turns=1) == pytest.approx(1 - mix.wrong_write)


def test_mistakes_are_plausible_and_really_wrong() -> None:
    kinds: Counter[str] = Counter()
    for row in make_sql_dataset(300, 2):
        for kind, mistakes in sql_demos.mistakes(row["db_id"], row["gold_sql"]).items():
            kinds[kind] += 1
            for m in mistakes:
                result = execute_sql(database_path(row["db_id"]), m.sql)
                assert not query_is_right(row, sql_demos.sql_answer(m.sql)), m
                assert (not result.ok) == (kind == "typo"), m  # only typos fail to run
                assert m.feedback.endswith(".") and m.sql != row["gold_sql"]
    assert {"typo", "condition", "column", "aggregate", "comparison", "order"} <= set(kinds)


def test_sql_demonstrations_are_deterministic_per_seed(sql_rows: list[dict[str, Any]]) -> None:
    assert sql_demos.demonstrations(2000, seed=1) == sql_rows
    assert sql_demos.demonstrations(300, seed=1) == sql_rows[:300]
    assert sql_demos.demonstrations(300, seed=2) != sql_rows[:300]


def test_sql_held_out_questions_are_never_demonstrated_nor_rl_rows(sql_rows: list[dict[str, Any]]) -> None:
    held_out = sql_demos.eval_rows(150)
    assert held_out == sql_demos.eval_rows(150) and len(held_out) == 150
    assert all(set(r) == {"db_id", "question", "gold_sql", "kind"} for r in held_out)
    keys = [(r["db_id"], r["question"]) for r in held_out]
    assert len(set(keys)) == 150 and {r["db_id"] for r in held_out} == {"shop", "school", "library"}
    rl = {(r["db_id"], r["question"]) for r in map(json.loads, (EXAMPLES / "text_to_sql" / "rows.jsonl").open())}
    demonstrated = set()
    for rows in (sql_rows, sql_demos.demonstrations(1500, 0), sql_demos.demonstrations(1500, sql_demos.EVAL_SEED)):
        demonstrated |= {(r["meta"]["db_id"], question_of(r)) for r in rows}
    assert not set(keys) & rl and not set(keys) & demonstrated
    for row in held_out:  # every gold query runs on the agent's database
        assert execute_sql(database_path(row["db_id"]), row["gold_sql"]).ok


def test_sql_command_line_writes_jsonl(tmp_path: Path) -> None:
    sql_demos.main(["demos", "--n", "7", "--seed", "4", "--out", str(tmp_path / "demos.jsonl")])
    sql_demos.main(["eval", "--n", "5", "--out", str(tmp_path / "eval.jsonl")])
    read = [json.loads(line) for line in (tmp_path / "demos.jsonl").read_text().splitlines()]
    assert read == sql_demos.demonstrations(7, 4)
    assert [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == sql_demos.eval_rows(5)
