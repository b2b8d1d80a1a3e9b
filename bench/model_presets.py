"""Sizing the `agent` tiny-model preset: prompt lengths and CPU training/decoding speed.

    python bench/model_presets.py [--threads 2] [--reps 5]

Prints two tables:

- prompt lengths in tokens, under the tiny preset (512-token generic BPE, Hermes template)
  and the agent preset (its BPE, compact template): the calculator agent's first prompt (its
  system prompt, a word problem, `CALCULATOR_TOOL`), one whole calculator conversation (tool
  call, tool result, "Answer: N"), and the text-to-SQL agent's write prompt on the `shop`
  database;
- per candidate size (randomly initialised, agent vocabulary): parameters; forward+backward
  tokens/s on 16 sequences of 300 tokens; one SFT step (forward, backward, AdamW) on 16
  calculator conversations rendered with each preset's template and tokenizer; greedy decode
  tokens/s at batch 16 (64 new tokens after the calculator prompt, KV cache on).

Timings are medians of --reps after a warm-up, in float32 with `torch.set_num_threads(--threads)`.

Measured on the 2-core AMD EPYC dev box (torch 2.13 CPU, transformers 5.10), while other
tests ran beside it now and then (four runs: SFT step h128 l4 0.30-0.33 s, h192 l4 0.54-0.60 s):

    python bench/model_presets.py --reps 7

    prompt                                tiny (hermes, 512)   agent (compact, 1536)
    calculator first prompt                              700                      99
    calculator conversation                              817                     145
    text-to-SQL write prompt (shop)                      578                     172

    size                 params  fwd+bwd tok/s   SFT step hermes  SFT step compact   decode tok/s
    h128 l4 (agent)       1.25M          8,715            2.590s            0.330s          2,161
    h192 l4               2.66M          5,131            3.996s            0.540s          1,676
    h256 l6               6.69M          1,957            9.167s            1.384s            833

Step times only; the size `agent` has was chosen by learning per second (bench/sft_sizes.py): h64 l2. Earlier
choice here, by step time alone: h128 l4 (the `small` shape, 1536-token vocabulary). It is the one size whose
SFT step on 16 compact calculator conversations is ~0.3 s; h192 l4 is already ~0.55 s and
h256 l6 ~1.4 s. The same conversations under the Hermes template and the 512-token BPE take
6-8x longer per step: the prompts, not the model's size, were what made CPU training slow.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.calculator.agent import CALCULATOR_TOOL, first_messages  # noqa: E402
from examples.calculator.data import make_dataset  # noqa: E402
from examples.text_to_sql.agent import write_messages  # noqa: E402
from examples.text_to_sql.databases import database_path  # noqa: E402
from examples.text_to_sql.sql import schema_sql  # noqa: E402
from shared.models import AGENT_SIZE, build_tokenizer  # noqa: E402

BATCH = 16
SEQ_LEN = 300
DECODE_TOKENS = 64
SQL_QUESTION = "How many orders placed in 2021 have the status cancelled?"

# Head size 32 throughout (as tiny and small); MLP 4x hidden.
CANDIDATES: dict[str, dict[str, int]] = {
    "h128 l4": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
    "h192 l4": {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 6},
    "h256 l6": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 8},
}

Message = dict[str, Any]


def calculator_conversation(row: dict[str, Any]) -> list[Message]:
    """A solved calculator episode: one call over the question's numbers, its result, the answer.
    The expression is only as long as a real one; its value is not checked."""
    question = str(row["question"])
    numbers = re.findall(r"\d+(?:\.\d+)?", question)
    call = {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": ""}}
    call["function"]["arguments"] = '{"expression": "' + " * ".join(numbers) + '"}'
    return [
        *first_messages(question),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": str(row["answer"])},
        {"role": "assistant", "content": f"Answer: {row['answer']}"},
    ]


def n_tokens(tokenizer: Any, messages: list[Message], tools: list[Message] | None, generation: bool) -> int:
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_table(tokenizers: dict[str, Any]) -> None:
    """Tokens per prompt under each template+tokenizer (keys "hermes": tiny, "compact": agent)."""
    row = make_dataset(1, seed=0)[0]
    sql = write_messages(schema_sql(database_path("shop")), SQL_QUESTION)
    first = first_messages(str(row["question"]))
    cases: list[tuple[str, Callable[[Any], int]]] = [
        ("calculator first prompt", lambda t: n_tokens(t, first, [CALCULATOR_TOOL], True)),
        ("calculator conversation", lambda t: n_tokens(t, calculator_conversation(row), [CALCULATOR_TOOL], False)),
        ("text-to-SQL write prompt (shop)", lambda t: n_tokens(t, sql, None, True)),
    ]
    presets = {"hermes": "tiny", "compact": "agent"}
    heads = [f"{presets[chat]} ({chat}, {len(tok)})" for chat, tok in tokenizers.items()]
    print(f"{'prompt':<32}" + "".join(f"{head:>24}" for head in heads))
    for label, count in cases:
        print(f"{label:<32}" + "".join(f"{count(tok):>24}" for tok in tokenizers.values()))


def conversation_batch(tokenizer: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` calculator conversations as right-padded ids and labels (-100 on padding). The loss
    covers every token here: masking prompt tokens changes no matmul, so not the step time."""
    rows = make_dataset(n, seed=1)
    seqs = []
    for row in rows:
        text = tokenizer.apply_chat_template(calculator_conversation(row), tools=[CALCULATOR_TOOL], tokenize=False)
        seqs.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    width = max(map(len, seqs))
    ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(seq)] = torch.tensor(seq)
    return ids, labels


def build_model(size: dict[str, int], vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, max_position_embeddings=2048, num_key_value_heads=size["num_attention_heads"],
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=0, **size,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.float32)


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_row(label: str, size: dict[str, int], tokenizers: dict[str, Any], reps: int) -> None:
    agent_tok = tokenizers["compact"]
    model = build_model(size, len(agent_tok))
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    model.train()
    random_ids = torch.randint(0, len(agent_tok), (BATCH, SEQ_LEN))

    def fwd_bwd() -> None:
        model(input_ids=random_ids, labels=random_ids).loss.backward()
        model.zero_grad(set_to_none=True)

    fwd_bwd_s = median_seconds(fwd_bwd, reps)

    def sft_step(batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
        ids, labels = batch

        def step() -> None:
            model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    # The hermes batch is tokenized with the tiny tokenizer (ids < 512 fit the agent embedding).
    steps = {name: median_seconds(sft_step(conversation_batch(tok, BATCH)), reps) for name, tok in tokenizers.items()}

    model.eval()
    prompt = agent_tok.apply_chat_template(
        first_messages(str(make_dataset(1)[0]["question"])), tools=[CALCULATOR_TOOL], add_generation_prompt=True,
        tokenize=False,
    )  # fmt: skip
    prompt_ids = torch.tensor([agent_tok(prompt, add_special_tokens=False)["input_ids"]] * BATCH)

    def decode() -> None:
        with torch.no_grad():
            model.generate(
                prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=DECODE_TOKENS,
                min_new_tokens=DECODE_TOKENS, do_sample=False, pad_token_id=0,
            )  # fmt: skip

    decode_s = median_seconds(decode, max(1, reps // 2))
    mark = " (agent)" if size == AGENT_SIZE else ""
    print(
        f"{label + mark:<20}{params / 1e6:>6.2f}M{BATCH * SEQ_LEN / fwd_bwd_s:>15,.0f}"
        + "".join(f"{s:>17.3f}s" for s in steps.values())
        + f"{BATCH * DECODE_TOKENS / decode_s:>15,.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizers = {"hermes": build_tokenizer(), "compact": build_tokenizer(preset="agent")}
    prompt_table(tokenizers)
    print()
    print(
        f"{'size':<20}{'params':>7}{'fwd+bwd tok/s':>15}"
        + "".join(f"{'SFT step ' + chat:>18}" for chat in tokenizers)
        + f"{'decode tok/s':>15}"
    )
    for label in args.sizes:
        speed_row(label, CANDIDATES[label], tokenizers, args.reps)


if __name__ == "__main__":
    main()
