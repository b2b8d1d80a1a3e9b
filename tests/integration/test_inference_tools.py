"""OpenAI tool calling through the inference chat endpoint: the Hermes/Qwen2.5-style chat
template, the `<tool_call>` reply parser, and a multi-turn tool conversation through the real
app with the tiny model (whose random weights never write a valid call, so the reply side is
tested on given text)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from services.inference.api import assistant_message
from services.inference.schemas import ChatCompletionRequest
from services.inference.tools import callable_names, parse_tool_calls
from shared.models import ensure_tiny_model, load_tokenizer
from tests.support.inference_app import running, settings as inference_settings
from tests.support.secrets import AUTH, INFERENCE_TOKEN

BASE = "http://inference"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, ADD]

# An OpenAI-SDK-shaped conversation: the assistant called two tools, both answered.
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9C, rain"},
    {"role": "assistant", "content": "Paris: 18C. Oslo: 9C."},
    {"role": "user", "content": "And 2 + 3?"},
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Any:
    return load_tokenizer(model_path)


@pytest.fixture(scope="module")
async def app(model_path: Path) -> AsyncIterator[FastAPI]:
    async with running(inference_settings(model_path), BASE) as app:
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, timeout=60, headers=AUTH) as c:
        yield c


def call(name: str, arguments: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


# --- parser ----------------------------------------------------------------------------------------


def test_single_call() -> None:
    parsed = parse_tool_calls(call("get_weather", {"city": "Paris"}), TOOLS)
    assert parsed.content is None
    [c] = parsed.tool_calls
    assert re.fullmatch(r"call_[0-9a-f]{32}", c["id"]) and c["type"] == "function"
    assert c["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_multiple_calls_and_content_before_them() -> None:
    text = "Let me check.\n" + call("get_weather", {"city": "Paris"}) + "\n" + call("add", {"a": 2, "b": 3}) + "\n"
    parsed = parse_tool_calls(text, TOOLS, "auto")
    assert parsed.content == "Let me check."
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "add"]
    assert json.loads(parsed.tool_calls[1]["function"]["arguments"]) == {"a": 2, "b": 3}
    assert len({c["id"] for c in parsed.tool_calls}) == 2


def test_arguments_object_string_and_missing() -> None:
    as_object = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"x": "日本", "n": [1, 2]}}</tool_call>', TOOLS)
    # Serialized as the template's tojson writes it, so the call re-renders as generated.
    assert as_object.tool_calls[0]["function"]["arguments"] == '{"x": "日本", "n": [1, 2]}'
    as_string = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"x\\":1}"}</tool_call>', TOOLS)
    assert as_string.tool_calls[0]["function"]["arguments"] == '{"x":1}'
    missing = parse_tool_calls('<tool_call>{"name": "add"}</tool_call>', TOOLS)
    assert missing.tool_calls[0]["function"]["arguments"] == "{}"


def test_unterminated_call_at_the_end_still_counts() -> None:
    # A model that stops on EOS (or a `</tool_call>` stop string) right after the JSON.
    parsed = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {}}\n', TOOLS)
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["add"]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>',  # bad JSON
        "<tool_call>not json at all</tool_call>",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # unknown tool
        '<tool_call>{"name": ["add"], "arguments": {}}</tool_call>',  # name not a string
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "add", "arguments": "{oops"}</tool_call>',  # arguments string not JSON
        '<tool_call>["add"]</tool_call>',
        call("add", {}) + "\n" + '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',  # one bad -> none
        "<tool_call>" + "[" * 100_000 + "</tool_call>",  # absurd nesting must not raise
    ],
)
def test_invalid_calls_stay_content(text: str) -> None:
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content == text and parsed.tool_calls == []


def test_no_tools_or_tool_choice_none_never_parses() -> None:
    text = call("add", {"a": 1})
    for tools, choice in [(None, None), ([], "auto"), (TOOLS, "none")]:
        assert parse_tool_calls(text, tools, choice).tool_calls == []
        assert parse_tool_calls(text, tools, choice).content == text
    plain = parse_tool_calls("  just text  ", TOOLS)
    assert plain.content == "  just text  " and plain.tool_calls == []


def test_named_tool_choice_accepts_only_that_tool() -> None:
    named = {"type": "function", "function": {"name": "add"}}
    assert callable_names(TOOLS, named) == {"add"}
    assert callable_names(TOOLS, "required") == callable_names(TOOLS, None) == {"add", "get_weather"}
    assert parse_tool_calls(call("add", {}), TOOLS, named).tool_calls
    assert not parse_tool_calls(call("get_weather", {"city": "x"}), TOOLS, named).tool_calls


# --- api-level message -------------------------------------------------------------------------------


def test_assistant_message_with_calls() -> None:
    text = "On it. " + call("get_weather", {"city": "Paris"})
    message, finish = assistant_message(text, "stop", TOOLS, None)
    assert finish == "tool_calls"
    assert message["role"] == "assistant" and message["content"] == "On it."
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # A cut-off reply keeps "length" even if a complete call came before the cut.
    _, finish = assistant_message(call("add", {}) + "\n<tool_call>{", "length", TOOLS, None)
    assert finish == "length"
    message, finish = assistant_message(call("add", {}), "length", TOOLS, None)
    assert finish == "length" and message["tool_calls"]


def test_assistant_message_without_calls_is_unchanged() -> None:
    for tools, choice in [(None, None), (TOOLS, "none"), (TOOLS, "auto")]:
        text = call("add", {}) if choice == "none" else " plain reply "
        assert assistant_message(text, "stop", tools, choice) == ({"role": "assistant", "content": text}, "stop")


# --- request validation ----------------------------------------------------------------------------


def test_tool_choice_values() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    for choice in ("none", "auto", "required", {"type": "function", "function": {"name": "add"}}):
        assert ChatCompletionRequest(messages=msgs, tools=TOOLS, tool_choice=choice).tool_choice == choice
    assert ChatCompletionRequest(messages=msgs).tool_choice is None
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}, {"function": "add"}):
        with pytest.raises(ValueError):
            ChatCompletionRequest(messages=msgs, tools=TOOLS, tool_choice=bad)
    with pytest.raises(ValueError):
        ChatCompletionRequest(messages=msgs, tool_choice="required")
    with pytest.raises(ValueError):
        ChatCompletionRequest(messages=msgs, tools=[{"type": "function", "function": {"description": "no name"}}])


# --- template ----------------------------------------------------------------------------------------


def test_template_without_tools_is_plain_chatml(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "yo"},
        {"role": "assistant"},
    ]
    expected = (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\na b<|im_end|>\n"
        "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    )
    for tools in (None, []):
        assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == expected
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == expected + "<|im_start|>assistant\n"


def test_template_tools_preamble(tokenizer: Any) -> None:
    user = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(user, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    head, _, rest = rendered.partition("<|im_end|>\n")
    assert head.startswith("<|im_start|>system\n# Tools\n")
    tools_block = head[head.index("<tools>\n") + len("<tools>\n") : head.index("\n</tools>")]
    assert [json.loads(line) for line in tools_block.split("\n")] == TOOLS
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in head
    assert rest == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # The caller's system message leads the same system turn instead of getting its own.
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}, *user], tools=TOOLS,
                                                tokenize=False)  # fmt: skip
    assert with_system.startswith("<|im_start|>system\nbe brief\n\n# Tools\n")
    assert with_system.count("<|im_start|>system") == 1 and with_system.endswith("<|im_start|>user\nhi<|im_end|>\n")


def test_template_assistant_tool_calls_and_tool_responses(tokenizer: Any) -> None:
    rendered = tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False)
    assert rendered == (
        "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response>\n"
        "<tool_response>\n9C, rain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nParis: 18C. Oslo: 9C.<|im_end|>\n"
        "<|im_start|>user\nAnd 2 + 3?<|im_end|>\n"
    )
    # Content before the calls; arguments as a dict; a bare {name, arguments} call; lone tool turn.
    messages = [
        {"role": "assistant", "content": "Checking.",
         "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]},  # fmt: skip
        {"role": "tool", "content": [{"type": "text", "text": "3"}]},
        {"role": "assistant", "tool_calls": [{"name": "add", "arguments": "{}"}]},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_parsed_call_rerenders_as_generated(tokenizer: Any) -> None:
    """The next turn's prompt must extend the previous prompt + reply token for token, or the
    capture proxy could not chain the turns; so a parsed call must re-render as generated."""
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tools=TOOLS, add_generation_prompt=True, tokenize=False)
    generated = "Checking.\n" + call("get_weather", {"city": "Zürich"}) + "\n" + call("add", {"a": 2, "b": 3})
    message, _ = assistant_message(generated, "stop", TOOLS, "auto")
    history = [*CONVERSATION[:2], message, {"role": "tool", "content": "ok"}]
    again = tokenizer.apply_chat_template(history, tools=TOOLS, tokenize=False)
    assert again.startswith(prompt + generated + "<|im_end|>\n")


# --- through the app ---------------------------------------------------------------------------------


async def test_chat_with_tools_multi_turn(client: httpx.AsyncClient, tokenizer: Any) -> None:
    body = {"model": "x", "messages": CONVERSATION, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 8,
            "temperature": 0.0, "logprobs": True, "return_token_ids": True}  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    rendered = tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tools>" in rendered and "<tool_response>\n9C, rain\n</tool_response>" in rendered
    assert tokenizer.decode(out["prompt_token_ids"]) == rendered
    assert out["prompt_token_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    choice = out["choices"][0]
    # The random model writes no valid call: an ordinary reply, token data as sampled.
    text = tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
    assert choice["message"] == {"role": "assistant", "content": text}
    assert len(choice["token_ids"]) == len(choice["logprobs"]["content"]) == len(choice["token_versions"])


async def test_bad_tool_requests_are_400(client: httpx.AsyncClient) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    for extra in ({"tool_choice": "sometimes"}, {"tool_choice": "required"},
                  {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                  {"tools": [{"type": "function"}]}):  # fmt: skip
        r = await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


async def test_openai_sdk_sends_tools_and_tool_history(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), timeout=60) as http:
        sdk = openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=INFERENCE_TOKEN, http_client=http, max_retries=0)
        reply = await sdk.chat.completions.create(  # type: ignore[call-overload]
            model="x", messages=CONVERSATION, tools=TOOLS, tool_choice="auto", max_tokens=4, temperature=0.0
        )
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "length")
