"""Multi-hop retrieval QA agent (`multihop-rag`): search, judge, search again, answer.

One conversation, three roles, up to `MAX_HOPS` hops:

    query   writes a search query: `Query: <keywords>`
            -> BM25 retrieves the top `TOP_K` passages (recorded as a `retrieval` event)
    decide  says whether the passages so far answer the question: SUFFICIENT or MORE
    ...     MORE (or an unreadable decision) and hops left: query again
    answer  writes `Answer: <text>`, scored by `reward.qa_reward` (0.1 format + 0.9 F1)

All calls extend one chat, so each prompt is the previous prompt plus the previous reply plus
what the environment added (passages, the next instruction). The trainer can then merge a
rollout into one training sample with the retrieved passages as context (loss mask 0), rather
than re-reading the same prefix once per call.

Prompts are kept short on purpose: the tiny test model has a 1024-token context, and three
hops of passages must fit in it (a passage already shown is not repeated). For the same
reason the agent speaks plain text rather than offering a `search` tool: the tool schema
alone would take ~450 tokens of that context on every call.

The retriever is real (rank_bm25 over `data.get_corpus(corpus_seed, corpus_size)`); the
corpus and its index are built on a worker's first rollout and cached in memory.

The hop loop (`run_episode`) takes the LLM as a function, so its control flow is tested with
scripted replies; `parse_decision` / `should_answer` are the decision rule and stop condition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from examples.multihop_rag.data import DEFAULT_CORPUS_SIZE, Corpus, get_corpus
from examples.multihop_rag.retrieval import TOP_K, Retriever, get_retriever
from examples.multihop_rag.reward import ANSWER_PREFIX, qa_reward
from services.rollout.context import AgentContext
from services.rollout.registry import agent

NAME = "multihop-rag"
MAX_HOPS = 3
SUFFICIENT, MORE = "SUFFICIENT", "MORE"
# Token budgets per role: a query is an entity's name, a decision one word, an answer a name.
# Sized for the tiny model's byte-level tokenizer (a two-word name is ~10 tokens there,
# "SUFFICIENT" alone 10); a real model's tokenizer needs a third of that.
MAX_TOKENS = {"query": 20, "decide": 12, "answer": 20}

# The protocol is stated once, in the system prompt; the turns only cue the next step. (The
# tiny model's byte-level tokenizer spends ~30 tokens on one spelled-out instruction.)
SYSTEM = (
    f"Search for one fact at a time: reply Query: <keywords>. After results, reply {SUFFICIENT} if you can "
    f"answer, else {MORE}. Finally reply {ANSWER_PREFIX} <name>."
)
QUERY_CUE = "Search."
NEXT_QUERY_CUE = "Search again."
DECIDE_CUE = f"{SUFFICIENT} or {MORE}?"
ANSWER_CUE = "Answer now."

_QUERY_LINE = re.compile(r"query\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_DECISION = re.compile(rf"\b({SUFFICIENT}|{MORE})\b", re.IGNORECASE)


# --- the task -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    question: str
    answer: str
    supporting: tuple[str, ...]
    corpus_seed: int = 0
    corpus_size: int = DEFAULT_CORPUS_SIZE

    @classmethod
    def from_input(cls, data: dict[str, Any]) -> Task:
        return cls(
            question=str(data["question"]),
            answer=str(data["answer"]),
            supporting=tuple(str(p) for p in data.get("supporting", ())),
            corpus_seed=int(data.get("corpus_seed", 0)),
            corpus_size=int(data.get("corpus_size", DEFAULT_CORPUS_SIZE)),
        )


# --- what the model wrote -----------------------------------------------------------------------


def parse_query(text: str) -> str:
    """The query in a plain-text reply: what follows `Query:` on its line, else the first
    non-empty line. Searched as written, even when empty or nonsense: what the policy asks
    for is what it gets."""
    match = _QUERY_LINE.search(text)
    if match:
        return match.group(1).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def parse_decision(text: str) -> str | None:
    """SUFFICIENT or MORE, whichever the reply says first (any case); None when it says neither."""
    match = _DECISION.search(text)
    return match.group(1).upper() if match else None


def should_answer(decision: str | None, hop: int, max_hops: int = MAX_HOPS) -> bool:
    """Stop searching when the model says SUFFICIENT or the hop budget is spent. An unreadable
    decision counts as MORE: nothing claimed the evidence suffices, and the budget bounds it."""
    return decision == SUFFICIENT or hop >= max_hops


# --- what the environment writes ----------------------------------------------------------------


def first_messages(question: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Question: {question}\n{QUERY_CUE}"},
    ]


def results_text(ids: Sequence[str], corpus: Corpus, shown: set[str]) -> str:
    """The search results as the model reads them, one passage a line; adds the ids to `shown`.
    A passage already in the conversation is not repeated (context budget), and ids are not
    shown: the model never needs to name a passage."""
    if not ids:
        return "No passages found."
    new = [pid for pid in ids if pid not in shown]
    shown.update(ids)
    return "\n".join(corpus.text(pid) for pid in new) if new else "No new passages."


def after_search(query_reply: str, results: str) -> list[dict[str, Any]]:
    """The messages that follow a query reply: the reply as written, then the results and the
    decide instruction in one user turn."""
    return [
        {"role": "assistant", "content": query_reply},
        {"role": "user", "content": f"{results}\n{DECIDE_CUE}"},
    ]


# --- the loop -----------------------------------------------------------------------------------

# (role, messages) -> the model's reply text.
Complete = Callable[[str, list[dict[str, Any]]], Awaitable[str]]


@dataclass(frozen=True)
class Retrieval:
    hop: int
    query: str
    passage_ids: list[str]
    hit: bool  # a supporting passage was among them


@dataclass
class Episode:
    answer: str = ""
    retrievals: list[Retrieval] = field(default_factory=list)
    decisions: list[str | None] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)


async def run_episode(
    task: Task,
    complete: Complete,
    retriever: Retriever,
    corpus: Corpus,
    on_retrieval: Callable[[Retrieval], None] = lambda r: None,
    max_hops: int = MAX_HOPS,
    top_k: int = TOP_K,
) -> Episode:
    """query -> retrieve -> decide, until SUFFICIENT or `max_hops` hops; then answer."""
    episode = Episode(messages=first_messages(task.question))
    messages = episode.messages
    shown: set[str] = set()
    for hop in range(1, max_hops + 1):
        if hop > 1:
            messages.append({"role": "user", "content": NEXT_QUERY_CUE})
        reply = await complete("query", messages)
        query = parse_query(reply)
        ids = retriever.search(query, top_k)
        retrieval = Retrieval(hop, query, ids, any(pid in task.supporting for pid in ids))
        episode.retrievals.append(retrieval)
        on_retrieval(retrieval)  # now, so the event is tied to this hop's query call
        messages.extend(after_search(reply, results_text(ids, corpus, shown)))
        verdict = await complete("decide", messages)
        messages.append({"role": "assistant", "content": verdict})
        decision = parse_decision(verdict)
        episode.decisions.append(decision)
        if should_answer(decision, hop, max_hops):
            break
    messages.append({"role": "user", "content": ANSWER_CUE})
    episode.answer = await complete("answer", messages)
    messages.append({"role": "assistant", "content": episode.answer})
    return episode


@agent(NAME, description="multi-hop retrieval QA: BM25 search over invented passages in up to 3 hops, then answer")
async def multihop_rag_agent(ctx: AgentContext) -> float:
    task = Task.from_input(ctx.input)
    corpus = get_corpus(task.corpus_seed, task.corpus_size)
    retriever = get_retriever(task.corpus_seed, task.corpus_size)

    async def complete(role: str, messages: list[dict[str, Any]]) -> str:
        # One client per role: the capture proxy records each call as a transition of that role.
        response = await ctx.openai(role).chat.completions.create(
            model=ctx.model, messages=messages, max_tokens=MAX_TOKENS[role]
        )
        return response.choices[0].message.content or ""

    def on_retrieval(r: Retrieval) -> None:
        ctx.event("retrieval", hop=r.hop, query=r.query, passage_ids=r.passage_ids, hit=r.hit)

    episode = await run_episode(task, complete, retriever, corpus, on_retrieval)
    return qa_reward(episode.answer, task.answer)
