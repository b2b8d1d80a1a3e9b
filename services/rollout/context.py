"""What an agent sees: its input, an LLM that records transitions, and a way to give rewards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.messages import Reward, RolloutRequest, Transition
from services.rollout.capture import CaptureClient, Completion


@dataclass
class AgentContext:
    request: RolloutRequest
    client: CaptureClient | None
    transitions: list[Transition] = field(default_factory=list)
    rewards: list[Reward] = field(default_factory=list)

    @property
    def input(self) -> dict[str, Any]:
        return self.request.input

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL of this rollout's inference replica."""
        if self.client is None:
            raise RuntimeError("this worker has no inference configured")
        return self.client.replica_for(self.request.rollout_id) + "/v1"

    async def chat(self, messages: list[dict[str, Any]], role: str = "assistant", **sampling: Any) -> Completion:
        """One chat completion through the capture client; recorded as a transition of `role`."""
        if self.client is None:
            raise RuntimeError("this worker has no inference configured")
        params = self.request.sampling.model_dump(exclude_none=True)
        params.update(sampling)
        if not params.get("stop"):
            params.pop("stop", None)
        return await self.client.chat(
            self.client.replica_for(self.request.rollout_id), messages, params, role, self.transitions
        )

    def reward(self, value: float, event: str | None = None, transition: int | None = None) -> None:
        """An intermediate reward, tied to a transition (default: the latest) or a named event."""
        if transition is None and event is None and self.transitions:
            transition = len(self.transitions) - 1
        self.rewards.append(Reward(value=float(value), transition=transition, event=event))

    def record(self, transition: Transition) -> None:
        """Record a transition produced without the capture client (synthetic agents, replays)."""
        self.transitions.append(transition)
