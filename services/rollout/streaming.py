"""Streaming for captured calls: the proxy takes the whole completion from inference (so its
token ids, logprobs and versions are recorded like any other call), then replays it to the
agent as OpenAI server-sent events.

An agent that asks for `stream: true` thus gets the chunk shapes OpenAI SDKs and frameworks
parse (`chat.completion.chunk` / `text_completion`, then `data: [DONE]`), with the usage chunk
when it sets `stream_options.include_usage`. What it does not get is tokens as they are
decoded: the first chunk arrives when the completion is done. Training needs the complete
call anyway; time-to-first-token is not what an RL rollout optimises.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from services.rollout.capture import CHAT

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _chat_chunks(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    base = {"id": data.get("id"), "object": "chat.completion.chunk", "created": data.get("created"),
            "model": data.get("model")}  # fmt: skip
    for choice in data["choices"]:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        yield {**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}  # fmt: skip
        delta: dict[str, Any] = {}
        if message.get("content"):
            delta["content"] = message["content"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        if delta:
            # The captured ids ride along, as in the non-streamed response.
            extra = {k: choice[k] for k in ("token_ids", "token_versions") if k in choice}
            yield {**base, "choices": [{"index": index, "delta": delta, "logprobs": choice.get("logprobs"),
                                        "finish_reason": None, **extra}]}  # fmt: skip
        yield {**base, "choices": [{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}]}
    if "prompt_token_ids" in data:
        yield {**base, "choices": [], "prompt_token_ids": data["prompt_token_ids"],
               "policy_version": data.get("policy_version")}  # fmt: skip


def _completion_chunks(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    base = {"id": data.get("id"), "object": "text_completion", "created": data.get("created"),
            "model": data.get("model")}  # fmt: skip
    for choice in data["choices"]:
        index = choice.get("index", 0)
        extra = {k: choice[k] for k in ("token_ids", "token_versions", "prompt_token_ids") if k in choice}
        yield {**base, "choices": [{"index": index, "text": choice.get("text", ""), "logprobs": choice.get("logprobs"),
                                    "finish_reason": None, **extra}]}  # fmt: skip
        yield {**base, "choices": [{"index": index, "text": "", "logprobs": None,
                                    "finish_reason": choice.get("finish_reason")}]}  # fmt: skip


def events(path: str, data: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """The SSE body replaying the completed response `data` of a call to `path`."""
    chunks = _chat_chunks(data) if path == CHAT else _completion_chunks(data)
    for chunk in chunks:
        yield sse(chunk)
    if include_usage and data.get("usage") is not None:
        obj = "chat.completion.chunk" if path == CHAT else "text_completion"
        yield sse({"id": data.get("id"), "object": obj, "created": data.get("created"), "model": data.get("model"),
                   "choices": [], "usage": data["usage"]})  # fmt: skip
    yield DONE
