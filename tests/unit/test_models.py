"""The tiny models and tokenizers: deterministic, atomic, loadable like any HF checkpoint; the
`tiny` preset's tokenizer and prompts fixed; the `agent` preset's compact prompts short, digit by
digit, and continued token for token from one turn to the next."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from examples.calculator.agent import CALCULATOR_TOOL, first_messages, step
from examples.text_to_sql.agent import write_messages
from examples.text_to_sql.databases import SCHEMAS
from services.inference.tools import parse_tool_calls
from shared.models import (
    CHAT_TEMPLATE,
    COMPACT_CHAT_TEMPLATE,
    EOS_TOKEN,
    IM_END,
    IM_START,
    MODEL_INFO_FILE,
    TOOL_TAGS,
    build_tokenizer,
    ensure_tiny_model,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    stop_token_ids,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def test_creation_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = ensure_tiny_model(tmp_path / "again")
    other = ensure_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert sha256(tiny / name) == sha256(again / name), name
    assert sha256(tiny / "model.safetensors") != sha256(other / "model.safetensors")


def test_existing_model_is_reused(tiny: Path) -> None:
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tiny, seed=123) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before


def test_a_cached_model_gets_the_current_chat_template(tmp_path: Path) -> None:
    model = ensure_tiny_model(tmp_path / "old")
    cfg_path = model / "tokenizer_config.json"
    current = cfg_path.read_text()
    cfg = json.loads(current)
    cfg["chat_template"] = "{{ 'an older template' }}"
    cfg_path.write_text(json.dumps(cfg))
    weights = sha256(model / "model.safetensors")
    ensure_tiny_model(model)
    assert cfg_path.read_text() == current and sha256(model / "model.safetensors") == weights
    # Someone else's checkpoint (not relayrl's tokenizer) is never touched.
    cfg["additional_special_tokens"] = ["<other>"]
    cfg_path.write_text(json.dumps(cfg))
    ensure_tiny_model(model)
    assert json.loads(cfg_path.read_text())["chat_template"] == "{{ 'an older template' }}"


def test_concurrent_creation_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "shared" / "tiny"
    results: list[Any] = []

    def build() -> None:
        try:
            results.append(ensure_tiny_model(target))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            results.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temp dirs left behind
    load_causal_lm(target)


def test_tokenizer_and_chat_template(tiny: Path) -> None:
    tok = load_tokenizer(tiny)
    assert len(tok) == 512
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    for special in (EOS_TOKEN, IM_START, IM_END):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == ""
    text = "Hello, world! 12 + 30 = 42\n  def f(x):\n\ttabs, ünïcödé 日本"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: every string round-trips
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
    cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_model_config_and_stop_tokens(tiny: Path) -> None:
    tok = load_tokenizer(tiny)
    model = load_causal_lm(tiny, "cpu", torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok) and model.config.max_position_embeddings == 1024
    expected = {tok.convert_tokens_to_ids(IM_END), tok.eos_token_id}
    assert set(model.generation_config.eos_token_id) == expected
    assert stop_token_ids(model, tok) == expected
    out = model.generate(torch.tensor([tok("hi")["input_ids"]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= len(tok("hi")["input_ids"]) + 3


def test_resolve_model(tiny: Path, tmp_path: Path) -> None:
    assert resolve_model("tiny", tmp_path / "cache") == tmp_path / "cache" / "tiny"
    assert (tmp_path / "cache" / "tiny" / "config.json").exists()
    assert resolve_model(str(tiny), tmp_path / "cache") == tiny
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        resolve_model("org/some-hub-model", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path / "cache")


def test_saved_checkpoint_round_trips(tiny: Path, tmp_path: Path) -> None:
    model = load_causal_lm(tiny)
    model.save_pretrained(tmp_path / "ckpt")
    load_tokenizer(tiny).save_pretrained(tmp_path / "ckpt")
    reloaded = load_causal_lm(resolve_model(str(tmp_path / "ckpt")))
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


# --- the tiny preset's tokenizer and prompts do not move ------------------------------------

# Copies of the calculator agent's prompt and tool as they were when these figures were taken,
# so the fingerprints below change only if the tiny tokenizer or its template does.
CALC_SYSTEM = (
    "You solve math word problems. Use the calculator tool for every arithmetic step instead of "
    "computing in your head. When you know the result, reply with one line: 'Answer: <number>'."
)
CALC_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": (
            "Evaluate an arithmetic expression and return its value. Supports numbers, + - * / // % **, "
            "parentheses and round, abs, min, max, sqrt, floor, ceil. No variables, units or commas in numbers."
        ),
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (3 * 4.5 + 2) * 0.8"}},
            "required": ["expression"],
        },
    },
}
QUESTION = "Ken has 210 cookies and shares them equally among 10 plates. How many cookies are on each plate?"


def calculator_episode(arguments: str = '{"expression": "210 / 10"}') -> list[dict[str, Any]]:
    call = {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": arguments}}
    return [
        {"role": "system", "content": CALC_SYSTEM},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c0", "content": "21"},
        {"role": "assistant", "content": "Answer: 21"},
    ]


def ids_of(tok: Any, messages: list[dict[str, Any]], tools: Any = None, generation: bool = True) -> list[int]:
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def test_the_tiny_tokenizer_and_template_render_as_before_presets_existed(tiny: Path) -> None:
    """Token ids captured before the agent preset was added; trained tiny checkpoints depend on them."""
    tok = load_tokenizer(tiny)
    assert build_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert ids_of(tok, chat) == [1, 87, 353, 201, 284, 2, 201, 1, 282, 349, 201, 91, 81, 2, 201, 1, 282, 349, 201]
    question = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What is 12 + 30?"}]
    assert ids_of(tok, question, generation=False) == [
        1, 85, 359, 201, 59, 269, 509, 314, 78, 82, 72, 87, 78, 16, 2, 201,
        1, 87, 353, 201, 57, 404, 477, 366, 20, 337, 367, 18, 33, 2, 201,
    ]  # fmt: skip
    episode = ids_of(tok, calculator_episode(), [CALC_TOOL])
    assert len(episode) == 817
    assert digest(episode) == "c25bfcea515823a396dcb78600568442a385da59d0f037e11762a1281523e3c3"
    # Two calls (an object and a string as arguments) and two tool results, no system message.
    two_calls = [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "Sure.", "tool_calls": [
            {"function": {"name": "calculator", "arguments": {"expression": "2 + 3"}}},
            {"function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}},
        ]},
        {"role": "tool", "content": "5"},
        {"role": "tool", "content": [{"type": "text", "text": "5"}]},
    ]  # fmt: skip
    rendered = ids_of(tok, two_calls, [CALC_TOOL], generation=False)
    assert len(rendered) == 746
    assert digest(rendered) == "30de26ed879d637f356568be2e585b94d573ac78cb00b50cfbe19548a4b12b20"
    assert json.loads((tiny / MODEL_INFO_FILE).read_text())["chat"] == "hermes"


# --- the agent preset ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent-cache")


@pytest.fixture(scope="module")
def agent(agent_cache: Path) -> Path:
    return resolve_model("tiny:agent", agent_cache)


@pytest.fixture(scope="module")
def agent_tok(agent: Path) -> Any:
    return load_tokenizer(agent)


def test_the_agent_preset_builds_once_and_loads_like_any_checkpoint(
    agent: Path, agent_cache: Path, tmp_path: Path
) -> None:
    assert agent == agent_cache / "tiny-agent"
    again = ensure_tiny_model(tmp_path / "again", preset="agent")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert sha256(agent / name) == sha256(again / name), name
    weights = (agent / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny:agent", agent_cache) == agent
    assert (agent / "model.safetensors").stat().st_mtime_ns == weights
    with pytest.raises(ValueError, match="unknown tiny-model preset"):
        resolve_model("tiny:huge", agent_cache)
    tok = load_tokenizer(agent)
    model = load_causal_lm(agent)
    assert len(tok) == model.config.vocab_size == 1536
    assert model.config.max_position_embeddings == 2048 and tok.model_max_length == 2048
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert stop_token_ids(model, tok) == {tok.convert_tokens_to_ids(IM_END), tok.eos_token_id}
    assert tok.chat_template == COMPACT_CHAT_TEMPLATE
    assert json.loads((agent / MODEL_INFO_FILE).read_text()) == {
        "chat": "compact", "preset": "agent", "seed": 0, "tokenizer": "agent",
    }  # fmt: skip


def test_a_cached_agent_model_is_refreshed_with_its_own_template(agent: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny-agent"
    shutil.copytree(agent, copy)
    cfg_path = copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ 'an older template' }}"
    cfg_path.write_text(json.dumps(cfg))
    ensure_tiny_model(copy)  # the default preset is "tiny": the directory's own preset still wins
    assert json.loads(cfg_path.read_text())["chat_template"] == COMPACT_CHAT_TEMPLATE
    # A directory from before presets were recorded is a tiny/small one: hermes.
    (copy / MODEL_INFO_FILE).unlink()
    ensure_tiny_model(copy)
    assert json.loads(cfg_path.read_text())["chat_template"] == CHAT_TEMPLATE


def test_tool_tags_are_single_tokens_that_decoding_keeps(agent_tok: Any) -> None:
    for tag in TOOL_TAGS:
        assert len(agent_tok(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    reply = '<tool_call>{"name": "calculator", "arguments": {"expression": "2 + 2"}}</tool_call><|im_end|>'
    ids = agent_tok(reply, add_special_tokens=False)["input_ids"]
    # What inference hands the tool-call parser: the tags stay, the stop token goes.
    assert agent_tok.decode(ids, skip_special_tokens=True) == reply.removesuffix(IM_END)


def test_every_digit_is_its_own_token_and_text_round_trips(agent_tok: Any) -> None:
    vocab = agent_tok.get_vocab()
    assert not [t for t in vocab if sum(c.isdigit() for c in t) > 1], "BPE merged digits"
    ids = agent_tok("1234567890", add_special_tokens=False)["input_ids"]
    assert agent_tok.convert_ids_to_tokens(ids) == list("1234567890")
    for text in (
        "Hello,  world!\n\n\t 12 + 30 = 42\n  def f(x):\n\ttabs, ünïcödé 日本  ",
        "SELECT COUNT(*) FROM orders WHERE order_year = 2021 AND status = 'cancelled';\n",
        "  <tool_call>{\"a\": 1}</tool_call>\n<tool_response> 0.75 </tool_response><tools>\n</tools> 007",
        f"{IM_START}user\n3.14159{IM_END}\n{EOS_TOKEN}",
    ):
        assert agent_tok.decode(agent_tok(text, add_special_tokens=False)["input_ids"]) == text


def test_the_compact_template_renders_a_calculator_episode(agent_tok: Any) -> None:
    rendered = agent_tok.apply_chat_template(calculator_episode(), tools=[CALC_TOOL], tokenize=False)
    assert rendered == (
        f"<|im_start|>system\n{CALC_SYSTEM}\n"
        "<tools>calculator(expression: string): Evaluate an arithmetic expression and return its value.</tools>"
        f"<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>{"name": "calculator", "arguments": {"expression": "210 / 10"}}'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>21</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nAnswer: 21<|im_end|>\n"
    )


def test_the_compact_template_lists_several_tools_and_renders_calls_and_results_in_order(agent_tok: Any) -> None:
    tools = [
        CALC_TOOL,
        {"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "required": ["key"],
            "properties": {"key": {"type": "string"}, "limit": {"type": "integer"}},
        }}},
        {"type": "function", "function": {"name": "now", "description": "The time"}},
    ]  # fmt: skip
    messages = [
        {"role": "user", "content": "Go."},
        {"role": "assistant", "content": "Two calls.", "tool_calls": [
            {"function": {"name": "lookup", "arguments": {"key": "ä"}}},
            {"function": {"name": "now", "arguments": "{}"}},
        ]},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": [{"type": "text", "text": "noon"}]},
    ]  # fmt: skip
    assert agent_tok.apply_chat_template(messages, tools=tools, tokenize=False) == (
        "<|im_start|>system\n<tools>"
        "calculator(expression: string): Evaluate an arithmetic expression and return its value.\n"
        "lookup(key: string, limit?: integer)\nnow(): The time.</tools><|im_end|>\n"
        "<|im_start|>user\nGo.<|im_end|>\n"
        '<|im_start|>assistant\nTwo calls.\n<tool_call>{"name": "lookup", "arguments": {"key": "ä"}}</tool_call>\n'
        '<tool_call>{"name": "now", "arguments": {}}</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>1</tool_response>\n<tool_response>noon</tool_response><|im_end|>\n"
    )
    # Without tools, every turn renders as plain ChatML, exactly as the tiny preset does.
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    tiny_text = build_tokenizer().apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert agent_tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False) == tiny_text


def test_agent_prompts_are_a_fraction_of_the_hermes_ones(agent_tok: Any) -> None:
    """Measured when the preset was added: this calculator first prompt 699 -> 106 tokens, the
    text-to-SQL write prompt on `shop` 578 -> 172 (bench/model_presets.py prints the table)."""
    tiny_tok = build_tokenizer()
    calc = first_messages("Noah buys 6 scarves for $13 each and 4 apples for $10.25 each. How much does Noah spend?")
    assert len(ids_of(agent_tok, calc, [CALCULATOR_TOOL])) <= 130
    assert len(ids_of(tiny_tok, calc, [CALCULATOR_TOOL])) >= 600
    schema = "\n".join(f"{statement};" for statement in SCHEMAS["shop"])
    sql = write_messages(schema, "How many orders placed in 2021 have the status cancelled?")
    assert len(ids_of(agent_tok, sql)) <= 200
    assert len(ids_of(tiny_tok, sql)) >= 500


def test_a_tool_call_turn_extends_the_previous_prompt_token_for_token(agent_tok: Any) -> None:
    """Inference parses the generated call, the agent sends it back with the tool's result, and the
    next prompt starts with exactly the ids of the previous prompt and the generated reply, so
    the trainer can merge both calls into one sample."""
    messages = first_messages(QUESTION)
    prompt = ids_of(agent_tok, messages, [CALCULATOR_TOOL])
    generated = agent_tok(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "210/10"}}</tool_call><|im_end|>',
        add_special_tokens=False,
    )["input_ids"]  # JSON spaced as `tojson` writes it (and SFT data shows it), or it re-renders differently
    text = agent_tok.decode(generated, skip_special_tokens=True)
    parsed = parse_tool_calls(text, [CALCULATOR_TOOL])
    assert parsed.content is None and [c["function"] for c in parsed.tool_calls] == [
        {"name": "calculator", "arguments": '{"expression": "210/10"}'}
    ]
    turn = step({"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls})
    assert turn.messages[1]["content"] == "21"
    following = ids_of(agent_tok, messages + turn.messages, [CALCULATOR_TOOL])
    assert following[: len(prompt) + len(generated)] == prompt + list(generated)
    assert len(following) > len(prompt) + len(generated)
