"""What an agent sees: its input, an LLM that records transitions, and a way to give rewards.

Two ways to call the policy, recorded the same way (`CaptureClient.capture`):

- `await ctx.chat(messages)`: the in-process capture client;
- any OpenAI-compatible client pointed at `ctx.base_url` (or `ctx.openai()`, a ready
  `openai.AsyncOpenAI`): the worker's capture proxy, so unchanged OpenAI-SDK agents are captured.

A context lives exactly as long as its rollout: the worker drops it once the trajectory is
built, and `aclose` (run on every way out: ok, error, timeout, cancel) closes what it handed
out. After that it records nothing and makes no more inference calls, so a task the agent
left running (or a sync agent's thread past its timeout) cannot keep the rollout's state
growing or keep inference busy for a rollout that is over.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context

from shared import telemetry
from shared.messages import Event, Reward, RolloutRequest, Transition
from services.rollout.capture import CHAT, MODEL, Captured, CaptureClient, Completion, InferenceError, completion_from

if TYPE_CHECKING:
    import openai

    from services.rollout.proxy import CaptureProxy

API_KEY = "relayrl"  # the proxy checks no key; OpenAI SDKs insist on one


@dataclass
class AgentContext:
    request: RolloutRequest
    client: CaptureClient | None
    # What the rollout recorded: as many as the agent made before its timeout_s, freed with the
    # context when the rollout ends (the trajectory carries them on).
    transitions: list[Transition] = field(default_factory=list)
    rewards: list[Reward] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    proxy: CaptureProxy | None = None
    # Set when the rollout is over: a call still in flight then is answered but not recorded,
    # and a new call is refused.
    closed: bool = False
    # The rollout's trace context: calls arriving through the proxy (another task) are its children.
    trace_context: otel_context.Context = field(default_factory=otel_context.get_current, repr=False)
    # The last call that failed because inference was unavailable past the client's retries
    # (overloaded, restarting, unreachable): the worker runs such a failed rollout again.
    inference_outage: InferenceError | None = None
    # OpenAI clients handed out (one per role, plus one per call with custom kwargs or sync);
    # emptied by `aclose` at the end of the rollout.
    _openai: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def input(self) -> dict[str, Any]:
        return self.request.input

    @property
    def model(self) -> str:
        """A model name to pass to OpenAI clients (inference serves one policy and ignores it)."""
        return MODEL

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL on this worker's capture proxy; calls are recorded as role "assistant"."""
        return self.base_url_for("assistant")

    def base_url_for(self, role: str) -> str:
        """OpenAI-compatible base URL whose calls are recorded as transitions of `role`."""
        if self.proxy is None or self.proxy.url is None:
            raise RuntimeError("this worker's capture proxy is not running")
        return self.proxy.base_url(self.request.rollout_id, role)

    def openai(self, role: str = "assistant", **kwargs: Any) -> openai.AsyncOpenAI:
        """A ready `openai.AsyncOpenAI` on the capture proxy (one per role, closed when the rollout ends).
        The proxy retries toward inference, so the SDK's own retries are off unless `max_retries` is given."""
        key = role if not kwargs else None  # custom kwargs: a fresh client, still closed at the end
        if key is not None and key in self._openai:
            return self._openai[key]  # type: ignore[no-any-return]
        import openai

        kwargs.setdefault("max_retries", 0)
        client = openai.AsyncOpenAI(base_url=self.base_url_for(role), api_key=API_KEY, **kwargs)
        self._openai[key if key is not None else f"{role}#{id(client)}"] = client
        return client

    def openai_sync(self, role: str = "assistant", **kwargs: Any) -> openai.OpenAI:
        """A ready blocking `openai.OpenAI` on the capture proxy, for sync agents (which the worker
        runs in a thread pool). Closed when the rollout ends."""
        import openai

        kwargs.setdefault("max_retries", 0)
        client = openai.OpenAI(base_url=self.base_url_for(role), api_key=API_KEY, **kwargs)
        self._openai[f"{role}#sync#{id(client)}"] = client
        return client

    async def aclose(self) -> None:
        """End of the rollout: stop recording and close the OpenAI clients handed out."""
        self.closed = True
        clients = list(self._openai.values())
        self._openai.clear()
        for client in clients:
            try:
                closed = client.close()
                if inspect.isawaitable(closed):
                    await closed
            except Exception:  # noqa: BLE001 - an agent may have closed it already
                pass

    def with_sampling_defaults(self, body: dict[str, Any]) -> dict[str, Any]:
        """The rollout's sampling params fill what the request leaves unset (the request wins)."""
        defaults = self.request.sampling.model_dump(exclude_none=True)
        if not defaults.get("stop"):
            defaults.pop("stop", None)
        if "max_tokens" in body or "max_completion_tokens" in body:
            defaults.pop("max_tokens", None)
        if self.request.min_version:
            defaults["min_policy_version"] = self.request.min_version
        return {**defaults, **body}

    async def capture(self, path: str, body: dict[str, Any], role: str) -> Captured:
        """One inference call on this rollout's sticky replica, recorded as transitions of `role`;
        inference's response as returned. Raises `InferenceError` (with the HTTP status to report)."""
        if self.client is None:
            raise InferenceError("this worker has no inference configured", 503, kind="inference_unavailable")
        if self.closed:
            raise InferenceError(
                f"rollout {self.request.rollout_id!r} is over (finished, timed out or cancelled): its calls are "
                "no longer sent or recorded", 404, kind="not_found",
            )  # fmt: skip
        replica = self.client.replica_for(self.request.rollout_id)
        with telemetry.child_span("llm_call", self.trace_context, role=role, endpoint=path, replica=replica) as span:
            body = self.with_sampling_defaults(body)
            try:
                captured = await self.client.capture(replica, path, body, role, run_id=self.request.run_id)
            except InferenceError as exc:
                if exc.transient:
                    self.inference_outage = exc
                raise
            if span is not None:
                span.set_attributes({
                    "prompt_tokens": sum(t.num_prompt_tokens for t in captured.transitions),
                    "completion_tokens": sum(t.num_response_tokens for t in captured.transitions),
                    "policy_version": int(captured.data.get("policy_version", 0)),
                })  # fmt: skip
        if not self.closed:
            self.transitions.extend(captured.transitions)
        return captured

    async def chat(self, messages: list[dict[str, Any]], role: str = "assistant", **sampling: Any) -> Completion:
        """One chat completion through the capture client; recorded as a transition of `role`."""
        if self.client is None:
            raise RuntimeError("this worker has no inference configured")
        body = {"model": MODEL, "messages": messages, **sampling, "n": 1}
        return completion_from((await self.capture(CHAT, body, role)).data)

    def reward(self, value: float, source: str | None = None, step: int | None = None) -> None:
        """An intermediate reward for one LLM call: `step` is its index in this rollout's calls
        (default: the latest call so far). `source` labels where it came from ("tool", "format").
        Explicit rewards always count toward `discounted` credit."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"an intermediate reward must be a finite number, got {value!r}")
        self.rewards.append(Reward(value=value, transition=self._step(step), source=source))

    def event(self, name: str, step: int | None = None, **data: Any) -> None:
        """Record what happened (a tool call and its outcome, an environment step), tied to an
        LLM call (default: the latest). With AIR on, `air_rules: [{on: <name>, reward: r}]`
        turns the event into a reward of r for that call. `data` must be JSON-serializable; it is
        kept as it will read back from the store (keys as text, tuples as lists)."""
        try:
            # Round-tripped, not only checked: json.dumps turns {1: x} into {"1": x}, but the
            # wire (MessagePack) would keep the int key and the store's strict decode would
            # dead-letter the whole trajectory over it.
            data = json.loads(json.dumps(data, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"event {name!r} data is not JSON-serializable: {exc}") from None
        self.events.append(Event(name=name, transition=self._step(step), data=data))

    def _step(self, step: int | None) -> int | None:
        if step is not None:
            if step < 0:
                raise ValueError(f"step must be a call index >= 0, got {step}")
            return step
        return len(self.transitions) - 1 if self.transitions else None

    def record(self, transition: Transition) -> None:
        """Record a transition produced without the capture client (synthetic agents, replays)."""
        self.transitions.append(transition)
