"""The capture client: calls inference's OpenAI-compatible API and records every call as a transition.

It always asks for token ids, logprobs and per-token policy versions, so the trainer gets the
exact tokens the policy sampled (never re-tokenized text). One rollout sticks to one inference
replica so the replica's prefix cache is reused across its turns.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass
from typing import Any

import httpx

from shared.messages import Transition, pack_f32, pack_i32


class InferenceError(RuntimeError):
    pass


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str


class CaptureClient:
    def __init__(self, http: httpx.AsyncClient, base_urls: list[str], retries: int) -> None:
        if not base_urls:
            raise ValueError("no inference URLs configured")
        self.http = http
        self.base_urls = base_urls
        self.retries = retries

    def replica_for(self, rollout_id: str) -> str:
        return self.base_urls[zlib.crc32(rollout_id.encode()) % len(self.base_urls)]

    async def chat(
        self,
        base_url: str,
        messages: list[dict[str, Any]],
        sampling: dict[str, Any],
        role: str,
        transitions: list[Transition],
    ) -> Completion:
        body = {
            "model": "policy",
            "messages": messages,
            **sampling,
            "logprobs": True,
            "return_token_ids": True,
            "n": 1,
        }
        start = time.perf_counter()
        data = await self._post(base_url + "/v1/chat/completions", body)
        choice = data["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        completion = Completion(
            text=choice["message"].get("content") or "",
            token_ids=list(choice["token_ids"]),
            logprobs=[float(c["logprob"]) for c in content],
            versions=list(choice.get("token_versions") or [data.get("policy_version", 0)] * len(choice["token_ids"])),
            finish_reason=choice.get("finish_reason") or "stop",
        )
        transitions.append(
            Transition(
                role=role,
                prompt_ids=pack_i32(data["prompt_token_ids"]),
                response_ids=pack_i32(completion.token_ids),
                response_logprobs=pack_f32(completion.logprobs),
                response_versions=pack_i32(completion.versions),
                finish_reason=completion.finish_reason,
                latency_s=time.perf_counter() - start,
            )
        )
        return completion

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                resp = await self.http.post(url, json=body)
            except httpx.TransportError as exc:  # connect/read errors: the replica may be restarting
                last = exc
            else:
                if resp.status_code < 500:
                    if resp.status_code >= 400:
                        raise InferenceError(f"inference {resp.status_code}: {resp.text[:500]}")
                    return resp.json()
                last = InferenceError(f"inference {resp.status_code}: {resp.text[:200]}")
            await asyncio.sleep(0.2 * (attempt + 1))
        raise InferenceError(f"inference failed after {self.retries + 1} attempts: {last}")
