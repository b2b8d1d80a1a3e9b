"""OpenAI tool calls from generated text in the Hermes/Qwen2.5 format.

The chat template (shared/models.py) asks the model to answer a tool call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; this module turns such text back
into OpenAI `tool_calls` entries. It only reads text: decoding is never constrained, so
`tool_choice` ("required", a named function) decides which calls are accepted, not what the
model writes. Anything that is not a well-formed call to an offered tool stays plain content,
because a reply the agent can read beats a 500, and the tokens are the same either way.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Lazy body up to the closing tag, or to the end: a model that stops on EOS right after the
# JSON (without writing `</tool_call>`) still made a complete call.
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_OPEN_TAG = "<tool_call>"


@dataclass(frozen=True)
class ParsedReply:
    """What an assistant reply says: text for the user, and the tools it calls (maybe none)."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def tool_names(tools: Sequence[Mapping[str, Any]] | None) -> frozenset[str]:
    """Names of the function tools offered; other tool types and malformed entries offer nothing."""
    names = set()
    for tool in tools or ():
        if tool.get("type", "function") != "function":
            continue
        fn = tool.get("function")
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return frozenset(names)


ToolChoice = str | Mapping[str, Any] | None


def callable_names(tools: Sequence[Mapping[str, Any]] | None, tool_choice: ToolChoice) -> frozenset[str]:
    """The tools a reply may call: none with `tool_choice="none"`, only the named one with a
    named choice, otherwise every offered tool."""
    if tool_choice == "none":
        return frozenset()
    offered = tool_names(tools)
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        return offered & {name} if isinstance(name, str) else frozenset()
    return offered


def parse_tool_calls(
    text: str, tools: Sequence[Mapping[str, Any]] | None, tool_choice: ToolChoice = None
) -> ParsedReply:
    """Split `text` into content and OpenAI `tool_calls`; never raises.

    All or nothing: if any `<tool_call>` block is not JSON naming an allowed tool, the whole
    text is returned as content, since a half-parsed reply would hide what the model wrote.
    With calls, content is the text before the first call (stripped, None if empty); text
    after the calls is dropped, as vLLM's hermes parser does.
    """
    allowed = callable_names(tools, tool_choice)
    if not allowed or _OPEN_TAG not in text:
        return ParsedReply(content=text)
    calls = []
    for match in _TOOL_CALL.finditer(text):
        call = _tool_call(match.group(1), allowed)
        if call is None:
            return ParsedReply(content=text)
        calls.append(call)
    before = text[: text.index(_OPEN_TAG)].strip()
    return ParsedReply(content=before or None, tool_calls=calls)


def _tool_call(body: str, allowed: frozenset[str]) -> dict[str, Any] | None:
    """One OpenAI tool call from a `<tool_call>` body, or None if it is not a valid one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or data["name"] not in allowed:
        return None
    arguments = _arguments(data.get("arguments", {}))
    if arguments is None:
        return None
    function = {"name": data["name"], "arguments": arguments}
    return {"id": f"call_{uuid.uuid4().hex}", "type": "function", "function": function}


def _arguments(value: Any) -> str | None:
    """OpenAI sends arguments as a JSON string of an object. An object is serialized the way the
    chat template's `tojson` writes it (ensure_ascii off, default separators), so re-rendering
    the call in the next turn reproduces the text a Hermes-style model generated; a string that
    already holds a JSON object is kept as written."""
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return None
        return value if isinstance(decoded, dict) else None
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return None
