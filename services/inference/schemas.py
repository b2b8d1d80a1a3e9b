"""Request bodies of the OpenAI-compatible endpoints.

Unknown fields are ignored because OpenAI SDKs and agent frameworks send extras; known
fields are validated so a bad value is a 400 with a reason, never a 500. Extension
fields (`return_token_ids`, `top_k`-style knobs) are named as vLLM names them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from services.inference.sampling import MAX_TOP_LOGPROBS
from services.inference.tools import tool_names

MAX_N = 16
MAX_STOPS = 16


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=64)
    ignore_eos: bool = False
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1, le=MAX_N)
    return_token_ids: bool = False
    # relayrl: wait (bounded by the server's version_wait_s) until this policy version is live.
    min_policy_version: int | None = Field(None, ge=0)
    # relayrl: the run whose weights must serve this request (also the `X-Relayrl-Run` header).
    # Unset: the replica's default (its pinned run, or the run that published last).
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    stream: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Common):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value


class ChatMessage(BaseModel):
    # Extra keys (name, tool_calls, tool_call_id, ...) pass through to the chat template.
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
                texts.append(part["text"])
            msg["content"] = "".join(texts)
        return msg


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    # Only decides which `<tool_call>` blocks in the reply become `tool_calls` ("none": none,
    # a named function: only that one). Decoding is not constrained, so "required" or a named
    # choice cannot force the model to call anything; a reply without a call stays content.
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        # The reply parser finds function tools by `function.name`; one without could never be
        # called. Other tool types pass (the template still lists them) but are never parsed.
        for i, tool in enumerate(value or []):
            if tool.get("type", "function") != "function":
                continue
            fn = tool.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError(f"tools[{i}] needs a named function: {{'function': {{'name': ...}}}}")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _named_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, dict):
            fn = value.get("function")
            if value.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError("a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
        return value

    @model_validator(mode="after")
    def _choice_needs_tools(self) -> ChatCompletionRequest:
        # As OpenAI does: a choice that asks for a call must have a tool it could call.
        names = tool_names(self.tools)
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if isinstance(self.tool_choice, dict) and self.tool_choice["function"]["name"] not in names:
            raise ValueError(f"tool_choice names {self.tool_choice['function']['name']!r}, which is not in tools")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
