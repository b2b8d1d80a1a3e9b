"""The multi-hop retrieval QA example: corpus and question generation, BM25 retrieval, the
reward, the hop loop's decision rule and control flow with scripted replies (no model), the
worst-case prompt against the tiny model's context, and one run end to end through the real
services with the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from examples.multihop_rag import data
from examples.multihop_rag.agent import (
    ANSWER_CUE,
    DECIDE_CUE,
    MAX_HOPS,
    MAX_TOKENS,
    MORE,
    NAME,
    NEXT_QUERY_CUE,
    SUFFICIENT,
    Episode,
    Task,
    after_search,
    first_messages,
    multihop_rag_agent,
    parse_decision,
    parse_query,
    results_text,
    run_episode,
    should_answer,
)
from examples.multihop_rag.retrieval import TOP_K, Retriever, get_retriever, tokenize
from examples.multihop_rag.reward import extract_answer, f1_score, format_ok, normalize_answer, qa_reward
from services.rollout import registry
from shared.messages import Trajectory, unpack_i32
from tests.support.agent_stack import assert_captured, run_tasks, samples_of

ROWS_FILE = Path(__file__).resolve().parents[2] / "examples" / "multihop_rag" / "rows.jsonl"

# What each chain fact looks like; a distractor never matches one of these.
FACTS = [
    re.compile(r"^(?P<s>.+) was born in (?P<o>[^.]+)\."),
    re.compile(r"^(?P<s>.+) is a city in (?P<o>[^.]+)\."),
    re.compile(r"^(?P<s>.+) was founded by (?P<o>[^.]+)\."),
    re.compile(r"^The (?P<s>.+) was developed by (?P<o>[^.]+)\."),
]


def fact(text: str) -> tuple[str, str] | None:
    """(subject, object) of a chain fact passage; None for any other passage."""
    for pattern in FACTS:
        m = pattern.match(text)
        if m:
            return m.group("s"), m.group("o")
    return None


def mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


# --- dataset ------------------------------------------------------------------------------------


def test_dataset_is_deterministic_per_seed() -> None:
    assert data.make_dataset(40, seed=3) == data.make_dataset(40, seed=3)
    assert data.build_corpus(3) == data.build_corpus(3)
    assert data.make_dataset(40, seed=3) != data.make_dataset(40, seed=4)
    assert data.build_corpus(3).passages != data.build_corpus(4).passages
    rows = data.make_dataset(40, seed=3)
    assert all(r["corpus_seed"] == 3 and r["corpus_size"] == data.DEFAULT_CORPUS_SIZE for r in rows)
    assert json.loads(json.dumps(rows)) == rows  # rows are task inputs: plain JSON


def test_committed_rows_are_the_generators_output() -> None:
    rows = [json.loads(line) for line in ROWS_FILE.read_text().splitlines()]
    assert rows == data.make_dataset(300, seed=0)
    assert ROWS_FILE.stat().st_size < 300_000
    assert len({r["question"] for r in rows}) == 300  # 364 distinct questions: no repeats in 300
    assert {r["hops"] for r in rows} == {2, 3} and set(r["kind"] for r in rows) == set(data.KINDS)


def test_make_dataset_repeats_only_after_every_question() -> None:
    corpus = data.get_corpus(0, 8)
    rows = data.make_dataset(len(corpus.questions) + 5, seed=0, corpus_size=8)
    first = [r["question"] for r in rows[: len(corpus.questions)]]
    assert sorted(first) == sorted(q["question"] for q in corpus.questions)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_answer_is_reachable_through_its_supporting_passages(seed: int) -> None:
    corpus = data.get_corpus(seed)
    assert len(corpus.by_id) == len(corpus.passages)  # ids are unique
    words = [set(tokenize(p.text)) for p in corpus.passages]
    for row in corpus.questions:
        hops = data.KINDS[row["kind"]][0]
        assert row["hops"] == hops == len(row["supporting"]) == len(row["chain"]) - 1
        assert mentions(row["question"], row["chain"][0]) and row["answer"] == row["chain"][-1]
        # Follow the facts the supporting passages state, from the question's entity on.
        entity = row["chain"][0]
        for pid in row["supporting"]:
            parsed = fact(corpus.text(pid))
            assert parsed is not None and parsed[0] == entity, (row, corpus.text(pid))
            entity = parsed[1]
        assert entity == row["answer"]
        # Each hop's fact is stated once: no other passage names both of its entities.
        for i, pid in enumerate(row["supporting"]):
            a, b = row["chain"][i], row["chain"][i + 1]
            wanted = set(tokenize(a)) | set(tokenize(b))
            both = [
                p.pid for p, w in zip(corpus.passages, words) if wanted <= w and mentions(p.text, a) and mentions(p.text, b)
            ]
            assert both == [pid], (a, b, both)


def test_corpus_has_distractors_that_state_no_fact() -> None:
    corpus = data.get_corpus(0)
    distractors = [p for p in corpus.passages if fact(p.text) is None]
    facts = [p for p in corpus.passages if fact(p.text) is not None]
    assert len(distractors) >= data.DEFAULT_CORPUS_SIZE  # country passages plus the distractors
    subjects = [fact(p.text)[0] for p in facts]  # type: ignore[index]
    assert len(subjects) == len(set(subjects))  # one fact per entity
    # Distractors name question entities (that is what makes them distract).
    people = {r["chain"][0] for r in corpus.questions if r["kind"] == "birth_country"}
    assert sum(any(mentions(p.text, name) for name in people) for p in distractors) >= 20


def test_invented_names_avoid_the_template_words() -> None:
    corpus = data.get_corpus(0)
    names = {w for r in corpus.questions for entity in r["chain"] for w in tokenize(entity)}
    generic = set(tokenize(" ".join([*data._COMPANY_SUFFIXES, *data._INVENTION_NOUNS])))
    assert not (names - generic) & data._reserved_words()


# --- retrieval ----------------------------------------------------------------------------------


def test_tokenize_is_lowercase_words() -> None:
    assert tokenize("Who founded Grokou Foundry? (1875)") == ["who", "founded", "grokou", "foundry", "1875"]


@pytest.mark.parametrize("seed", [0, 5])
def test_bm25_finds_each_supporting_passage_by_its_entity_name(seed: int) -> None:
    corpus = data.get_corpus(seed)
    retriever = get_retriever(seed, data.DEFAULT_CORPUS_SIZE)
    for row in corpus.questions:
        for entity, pid in zip(row["chain"], row["supporting"]):
            ids = retriever.search(entity)
            assert 1 <= len(ids) <= TOP_K and ids[0] == pid, (entity, ids)


def test_bm25_edge_cases() -> None:
    corpus = data.get_corpus(0)
    retriever = Retriever(corpus.passages)
    assert retriever.search("") == [] and retriever.search("?!") == []
    assert retriever.search("zzqx qqzv") == []  # no shared word: nothing, not arbitrary passages
    row = corpus.questions[0]
    assert row["supporting"][0] in retriever.search(row["question"])  # the question names hop 1's entity
    assert len(retriever.search(row["chain"][0], k=1)) == 1
    assert get_retriever(0, data.DEFAULT_CORPUS_SIZE) is get_retriever(0, data.DEFAULT_CORPUS_SIZE)  # cached


# --- reward -------------------------------------------------------------------------------------


def test_normalize_and_f1_by_hand() -> None:
    assert normalize_answer("The  Republic of Kestavia!") == "republic of kestavia"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert f1_score("Kestavia", "kestavia.") == 1.0
    # pred {republic, of, kestavia} vs gold {kestavia}: P = 1/3, R = 1, F1 = 2PR/(P+R) = 0.5
    assert f1_score("the Republic of Kestavia", "Kestavia") == pytest.approx(0.5)
    # pred {sta, bulal} vs gold {sta, tuzor}: P = R = 1/2, F1 = 0.5
    assert f1_score("Sta Bulal", "Sta Tuzor") == pytest.approx(0.5)
    # pred {sta, sta} vs gold {sta, tuzor}: shared counts min(2,1) = 1, P = R = 1/2
    assert f1_score("Sta Sta", "Sta Tuzor") == pytest.approx(0.5)
    # pred {doth, kabrand, of, farodale} vs gold {doth, kabrand}: P = 1/2, R = 1, F1 = 2/3
    assert f1_score("Doth Kabrand of Farodale", "Doth Kabrand") == pytest.approx(2 / 3)
    assert f1_score("Farodale", "Kestavia") == 0.0
    assert f1_score("", "Kestavia") == 0.0 and f1_score("the", "Kestavia") == 0.0


def test_format_and_extraction() -> None:
    assert format_ok("Answer: Kestavia") and format_ok("  answer:Kestavia  ") and format_ok("Answer: Sta Tuzor.")
    assert not format_ok("Kestavia") and not format_ok("Answer:") and not format_ok("Answer: \n")
    assert not format_ok("Answer: Kestavia\nbecause it is") and not format_ok("I think Answer: Kestavia")
    assert extract_answer("Answer: Kestavia\nbecause") == "Kestavia"
    assert extract_answer("I think Answer: Kestavia") == "Kestavia"
    assert extract_answer("  Kestavia  ") == "Kestavia"


@pytest.mark.parametrize(
    "reply, gold, expected",
    [
        ("Answer: Kestavia", "Kestavia", 1.0),  # 0.1 x 1 + 0.9 x 1
        ("Answer: the Republic of Kestavia", "Kestavia", 0.55),  # 0.1 + 0.9 x 0.5
        ("Kestavia", "Kestavia", 0.9),  # no format: 0 + 0.9 x 1
        ("Answer: Sta Bulal", "Sta Tuzor", 0.55),  # half the name: 0.1 + 0.9 x 0.5
        ("Answer: Farodale", "Kestavia", 0.1),  # format only
        ("Answer: Doth Kabrand of Farodale", "Doth Kabrand", 0.7),  # 0.1 + 0.9 x 2/3
        ("Answer: Kestavia\nI am sure.", "Kestavia", 0.9),  # two lines: not the format
        ("", "Kestavia", 0.0),
        ("Answer:", "Kestavia", 0.0),
    ],
)
def test_qa_reward_values(reply: str, gold: str, expected: float) -> None:
    assert qa_reward(reply, gold) == pytest.approx(expected)
    assert 0.0 <= qa_reward(reply, gold) <= 1.0


# --- the hop loop's parts -----------------------------------------------------------------------


def test_parse_decision() -> None:
    assert parse_decision("SUFFICIENT") == SUFFICIENT and parse_decision(" sufficient.") == SUFFICIENT
    assert parse_decision("MORE") == MORE and parse_decision("I need more") == MORE
    assert parse_decision("MORE, not SUFFICIENT") == MORE  # the first one said counts
    assert parse_decision("SUFFICIENT, no more") == SUFFICIENT
    assert parse_decision("") is None and parse_decision("insufficient") is None and parse_decision("moreover") is None


def test_should_answer() -> None:
    assert should_answer(SUFFICIENT, 1) and should_answer(SUFFICIENT, 2)
    assert not should_answer(MORE, 1) and not should_answer(MORE, 2) and should_answer(MORE, 3)
    assert not should_answer(None, 1) and should_answer(None, MAX_HOPS)  # unreadable = MORE, capped
    assert should_answer(MORE, 1, max_hops=1)


def test_parse_query() -> None:
    assert parse_query("Query: Grokou Foundry") == "Grokou Foundry"
    assert parse_query("I will search.\nquery:  Sta Tuzor \nthanks") == "Sta Tuzor"
    assert parse_query("\n  Grokou Foundry founder\nmore") == "Grokou Foundry founder"
    assert parse_query("") == "" and parse_query("Query:") == ""


def test_results_text_shows_each_passage_once() -> None:
    corpus = data.get_corpus(0)
    a, b, c = (p.pid for p in corpus.passages[:3])
    shown: set[str] = set()
    assert results_text([a, b], corpus, shown) == f"{corpus.text(a)}\n{corpus.text(b)}"
    assert results_text([b, c], corpus, shown) == corpus.text(c)
    assert results_text([a, c], corpus, shown) == "No new passages."
    assert results_text([], corpus, shown) == "No passages found."
    assert shown == {a, b, c}
    assert after_search("Query: x", "R") == [
        {"role": "assistant", "content": "Query: x"},
        {"role": "user", "content": f"R\n{DECIDE_CUE}"},
    ]


# --- the hop loop with scripted replies ---------------------------------------------------------


class Script:
    """A stand-in LLM: replies per role from lists (the last one repeats); records every call."""

    def __init__(self, **replies: list[str]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, list[dict[str, Any]]]] = []

    async def __call__(self, role: str, messages: list[dict[str, Any]]) -> str:
        self.calls.append((role, [dict(m) for m in messages]))
        seq = self.replies[role]
        return seq[min(sum(r == role for r, _ in self.calls) - 1, len(seq) - 1)]

    @property
    def roles(self) -> list[str]:
        return [r for r, _ in self.calls]


async def episode_for(row: dict[str, Any], script: Script, events: list[Any] | None = None) -> Episode:
    corpus = data.get_corpus(row["corpus_seed"], row["corpus_size"])
    retriever = get_retriever(row["corpus_seed"], row["corpus_size"])
    sink = events.append if events is not None else (lambda r: None)
    return await run_episode(Task.from_input(row), script, retriever, corpus, sink)


def three_hop_row() -> dict[str, Any]:
    return next(r for r in data.make_dataset(50, seed=0) if r["hops"] == 3)


async def test_sufficient_at_once_answers_after_one_hop() -> None:
    row = three_hop_row()
    script = Script(query=[f"Query: {row['chain'][0]}"], decide=["SUFFICIENT"], answer=["Answer: x"])
    events: list[Any] = []
    episode = await episode_for(row, script, events)
    assert script.roles == ["query", "decide", "answer"]
    assert [r.hop for r in episode.retrievals] == [1] and events == episode.retrievals
    assert episode.retrievals[0].query == row["chain"][0] and episode.retrievals[0].hit
    assert episode.retrievals[0].passage_ids[0] == row["supporting"][0]
    assert episode.decisions == [SUFFICIENT] and episode.answer == "Answer: x"


@pytest.mark.parametrize("decision", ["MORE", "no idea"])
async def test_more_or_unreadable_searches_until_the_hop_cap(decision: str) -> None:
    row = three_hop_row()
    script = Script(query=["Query: zzqx"], decide=[decision], answer=["Answer: x"])
    episode = await episode_for(row, script)
    assert script.roles == ["query", "decide"] * MAX_HOPS + ["answer"]
    assert [r.hop for r in episode.retrievals] == [1, 2, 3]
    assert all(r.passage_ids == [] and not r.hit for r in episode.retrievals)  # nothing matches "zzqx"
    assert len(episode.decisions) == MAX_HOPS


async def test_a_perfect_policy_follows_the_chain_and_scores_one() -> None:
    row = three_hop_row()
    queries = [f"Query: {entity}" for entity in row["chain"][:-1]]
    script = Script(query=queries, decide=["MORE", "MORE", "SUFFICIENT"], answer=[f"Answer: {row['answer']}"])
    episode = await episode_for(row, script)
    assert script.roles == ["query", "decide", "query", "decide", "query", "decide", "answer"]
    assert [r.passage_ids[0] for r in episode.retrievals] == row["supporting"]
    assert all(r.hit for r in episode.retrievals)
    assert qa_reward(episode.answer, row["answer"]) == 1.0
    # Every passage of the chain reached the model, in the decide turns.
    seen = "\n".join(m["content"] for m in episode.messages if m["role"] == "user")
    corpus = data.get_corpus(row["corpus_seed"], row["corpus_size"])
    assert all(corpus.text(pid) in seen for pid in row["supporting"])


async def test_the_conversation_only_grows() -> None:
    """Each call's messages extend the previous call's plus its reply: the prefix the trainer's
    sample merging relies on (token-level merging also needs the template to agree)."""
    row = three_hop_row()
    script = Script(query=["Query: a", "Query: b"], decide=["MORE", "SUFFICIENT"], answer=["Answer: x"])
    episode = await episode_for(row, script)
    calls = script.calls
    assert calls[0][1] == first_messages(row["question"])
    for (_, before), (_, after) in zip(calls, calls[1:]):
        assert after[: len(before)] == before and after[len(before)]["role"] == "assistant"
    assert [m["content"] for m in calls[2][1][-2:]] == ["MORE", NEXT_QUERY_CUE]
    assert calls[-1][1][-1] == {"role": "user", "content": ANSWER_CUE}
    assert episode.messages[-1] == {"role": "assistant", "content": "Answer: x"}


async def test_the_agent_with_a_scripted_client() -> None:
    """The registered function: one OpenAI client per role, each role's token budget, one
    `retrieval` event per hop tied to that hop's query call, the reward of the answer."""
    row = data.make_dataset(5, seed=0)[0]
    hops = row["hops"]
    replies = {
        "query": [f"Query: {e}" for e in row["chain"][:-1]],
        "decide": [MORE] * (hops - 1) + [SUFFICIENT],
        "answer": [f"Answer: {row['answer']}"],
    }
    calls: list[tuple[str, dict[str, Any]]] = []

    def client(role: str) -> Any:
        async def create(**kwargs: Any) -> Any:
            calls.append((role, kwargs))
            n = sum(r == role for r, _ in calls) - 1
            text = replies[role][min(n, len(replies[role]) - 1)]
            return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=text))])

        return SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))

    events: list[tuple[str, int, dict[str, Any]]] = []
    ctx = SimpleNamespace(input=row, model="policy", openai=client)
    ctx.event = lambda name, **d: events.append((name, len(calls) - 1, d))
    reward = await multihop_rag_agent(ctx)  # type: ignore[arg-type]
    assert reward == 1.0
    assert [r for r, _ in calls] == ["query", "decide"] * hops + ["answer"]
    assert all(kw["max_tokens"] == MAX_TOKENS[r] for r, kw in calls)
    assert [(name, step, d["hop"]) for name, step, d in events] == [("retrieval", 2 * i, i + 1) for i in range(hops)]
    assert all(d["hit"] and d["passage_ids"][0] == pid for (_, _, d), pid in zip(events, row["supporting"]))
    assert events[0][2]["query"] == row["chain"][0]


def test_agent_is_registered() -> None:
    assert registry.get(NAME) is not None and registry.get(NAME).fn is multihop_rag_agent  # type: ignore[union-attr]


# --- context budget -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    from shared.models import build_tokenizer

    return build_tokenizer()  # the tiny model's tokenizer and chat template, built in code


def test_worst_conversation_fits_the_tiny_models_context(tiny_tokenizer: Any) -> None:
    """Three hops of the corpus's nine longest passages, every reply at its token budget: the
    last prompt plus the answer budget stays within the tiny model's positions (prompts that
    overflow would fail the rollout)."""
    from shared.models import TINY_MAX_POSITIONS

    tok = tiny_tokenizer

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def at_budget(role: str) -> str:
        text = ""
        while n(text + " zq") <= MAX_TOKENS[role]:
            text += " zq"
        return text

    corpus = data.get_corpus(0)
    longest = sorted((p.text for p in corpus.passages), key=n, reverse=True)[: 3 * MAX_HOPS]
    messages = first_messages(max((r["question"] for r in corpus.questions), key=n))
    for hop in range(MAX_HOPS):
        if hop:
            messages.append({"role": "user", "content": NEXT_QUERY_CUE})
        messages += after_search(at_budget("query"), "\n".join(longest[3 * hop : 3 * hop + 3]))
        messages.append({"role": "assistant", "content": at_budget("decide")})
    messages.append({"role": "user", "content": ANSWER_CUE})
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert n(prompt) + MAX_TOKENS["answer"] <= TINY_MAX_POSITIONS


async def test_each_prompt_extends_the_last_token_for_token(tiny_tokenizer: Any) -> None:
    """Rendered with the chat template, every call's prompt starts with the previous prompt,
    the previous reply's tokens and the end-of-turn token: what lets the trainer merge a whole
    rollout into one sample when the policy's replies re-tokenize as sampled."""
    tok = tiny_tokenizer
    row = three_hop_row()
    replies = {"query": [f"Query: {e}" for e in row["chain"][:-1]], "decide": [MORE, MORE, SUFFICIENT]}
    replies["answer"] = [f"Answer: {row['answer']}"]
    script = Script(**replies)
    await episode_for(row, script)

    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    prompts = [encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)) for _, m in script.calls]
    said = [replies[role][script.roles[:i].count(role)] for i, role in enumerate(script.roles)]
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    for i in range(len(prompts) - 1):
        context = prompts[i] + encode(said[i]) + [end_of_turn]
        assert prompts[i + 1][: len(context)] == context, script.roles[i]


# --- end to end ---------------------------------------------------------------------------------

ROLE_ORDER = re.compile(r"query decide( query decide){0,2} answer")


def expected_samples(traj: Trajectory) -> int:
    """How many samples the trainer should build: a new one wherever a call's prompt does not
    extend the previous call's prompt + response (the template re-rendered a sampled reply)."""
    count, context = 0, np.zeros(0, np.int32)
    for t in traj.transitions:
        prompt = unpack_i32(t.prompt_ids)
        if not (count and len(prompt) >= len(context) and np.array_equal(prompt[: len(context)], context)):
            count += 1
        context = np.concatenate([prompt, unpack_i32(t.response_ids)])
    return count


@pytest.mark.e2e
def test_multihop_rag_end_to_end(agent_stack) -> None:  # type: ignore[no-untyped-def]
    rows = data.make_dataset(2, seed=0)
    trajs = run_tasks(agent_stack, NAME, rows, group_size=2)
    assert len(trajs) == 4
    by_task: dict[str, int] = {}
    merged = 0
    for index, traj in enumerate(trajs):
        row = rows[index // 2]  # run_tasks returns each task's rollouts together, in input order
        by_task[traj.task_id] = by_task.get(traj.task_id, 0) + 1
        assert traj.status == "ok", traj.error
        assert traj.agent == NAME and 0.0 <= traj.reward <= 1.0
        roles = [t.role for t in traj.transitions]
        assert ROLE_ORDER.fullmatch(" ".join(roles)), roles
        hops = roles.count("query")
        assert 1 <= hops <= MAX_HOPS
        assert_captured(traj)
        lengths = [len(unpack_i32(t.response_ids)) for t in traj.transitions]
        assert all(0 < n <= MAX_TOKENS[role] for n, role in zip(lengths, roles))
        # One retrieval event per hop, tied to that hop's query call (call index 2 x (hop - 1)).
        assert [e.name for e in traj.events] == ["retrieval"] * hops
        for i, e in enumerate(traj.events):
            assert e.transition == 2 * i and roles[e.transition] == "query"
            assert e.data["hop"] == i + 1 and isinstance(e.data["query"], str)
            assert len(e.data["passage_ids"]) <= TOP_K
            assert e.data["hit"] == bool(set(e.data["passage_ids"]) & set(row["supporting"]))
        # Trained tokens: every sampled token of the trained roles, nothing of the prompts/passages.
        samples = samples_of(traj, "query|decide|answer")
        assert sum(s.loss_tokens for s in samples) == sum(lengths)
        assert len(samples) == expected_samples(traj)
        merged += len(traj.transitions) - len(samples)
        for s in samples:
            assert np.all(s.versions[s.loss_mask == 1] >= 0) and np.all(s.old_logprobs[s.loss_mask == 1] <= 0)
        answer_only = samples_of(traj, "answer")
        assert sum(s.loss_tokens for s in answer_only) == lengths[-1]
    assert sorted(by_task.values()) == [2, 2]
    print(f"multihop-rag e2e: {merged} of {sum(len(t.transitions) - 1 for t in trajs)} follow-up calls merged")


def test_train_yaml_is_a_valid_run_that_rewards_retrieval_hits() -> None:
    import pathlib

    import yaml

    from services.trainer.credit import air_reward
    from shared.messages import Event, RunConfig

    raw = yaml.safe_load((pathlib.Path(__file__).parents[2] / "examples/multihop_rag/train.yaml").read_text())
    raw["dataset"] = [{"question": "q", "answer": "a"}]
    config = RunConfig.model_validate(raw)
    rules = config.runtime.air_values()
    assert config.agent == "multihop-rag" and config.training.credit == "discounted"
    assert air_reward(Event(name="retrieval", data={"hop": 1, "hit": True}), rules) == 0.05
    assert air_reward(Event(name="retrieval", data={"hop": 1, "hit": False}), rules) is None
