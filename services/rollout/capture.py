"""The capture client: calls inference's OpenAI-compatible API and records every call as a transition.

It always asks for token ids, logprobs and per-token policy versions, so the trainer gets the
exact tokens the policy sampled (never re-tokenized text). One rollout sticks to one inference
replica so the replica's prefix cache is reused across its turns.

Every call names the rollout's run (body `run_id`, replacing whatever the agent sent), so
inference samples it only with that run's weights; an answer produced with another run's
weights is refused here as well (502), never recorded.

Every request carries the workers' bearer token (`inference_token`): inference answers 401
without it, and that 401 passes through to the agent like any other refusal.

This is the single recording path: `AgentContext.chat` and the worker's HTTP capture proxy
(`services.rollout.proxy`, what OpenAI-SDK agents talk to) both go through `CaptureClient.capture`.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from dataclasses import dataclass
from typing import Any

import httpx

from shared.config import ConfigError
from shared.messages import Transition, pack_f32, pack_i32

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
MODEL = "policy"  # inference serves one model and ignores the requested name

_RETRY_STATUS = 429  # and every 5xx


def error_body(status: int, message: str, kind: str) -> bytes:
    """OpenAI's error shape, which OpenAI SDKs turn into readable exceptions."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


class InferenceError(RuntimeError):
    """Inference refused or failed a call. `status` and `body` are what an HTTP caller is told:
    inference's own answer for a 4xx, a relayrl error (502/503) once retries are spent.

    `transient` marks the second kind: inference was overloaded (503 `queue_full`), restarting
    or unreachable for the whole retry budget. That says nothing about the task, so a rollout
    that fails because of it is run again rather than recorded as a failed sample (the worker)."""

    def __init__(
        self,
        message: str,
        status: int = 502,
        body: bytes | None = None,
        kind: str = "inference_error",
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else error_body(status, message, kind)
        self.transient = transient


@dataclass
class Captured:
    """One recorded call: inference's response parsed, its transitions, and its bytes as sent
    (the proxy returns those unchanged instead of re-encoding the parsed response)."""

    data: dict[str, Any]
    transitions: list[Transition]
    content: bytes


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str


def force_capture(path: str, body: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
    """The request as sent to inference: token ids and logprobs always on, and the rollout's
    run named (an agent cannot ask for another run's weights); nothing else changes."""
    out = dict(body)
    out["return_token_ids"] = True
    if run_id is not None:
        out["run_id"] = run_id
    if path == CHAT:
        out["logprobs"] = True
    else:  # completions: logprobs is the number of alternatives; 0 still returns the sampled ones
        lp = out.get("logprobs")
        out["logprobs"] = int(lp) if isinstance(lp, (int, float)) and lp > 0 else 0
    return out


def transitions_from(path: str, data: dict[str, Any], role: str, latency_s: float) -> list[Transition]:
    """One transition per choice, exactly the ids/logprobs/versions inference returned."""
    try:
        out = []
        for choice in data["choices"]:
            ids = [int(t) for t in choice["token_ids"]]
            if path == CHAT:
                prompt = data["prompt_token_ids"]
                lps = [float(c["logprob"]) for c in (choice.get("logprobs") or {}).get("content") or []]
            else:
                prompt = choice["prompt_token_ids"]
                lps = [float(x) for x in (choice.get("logprobs") or {}).get("token_logprobs") or []]
            versions = choice.get("token_versions")
            if versions is None:
                versions = [int(data.get("policy_version", 0))] * len(ids)
            out.append(
                Transition(
                    role=role,
                    prompt_ids=pack_i32([int(t) for t in prompt]),
                    response_ids=pack_i32(ids),
                    response_logprobs=pack_f32(lps),
                    response_versions=pack_i32([int(v) for v in versions]),
                    finish_reason=choice.get("finish_reason") or "stop",
                    latency_s=latency_s,
                )
            )
        return out
    except (KeyError, TypeError, ValueError) as exc:  # ValueError: the Transition's alignment check
        raise InferenceError(
            f"inference answered without aligned token ids/logprobs/versions, so the call cannot be captured: "
            f"{type(exc).__name__}: {exc}",
            status=502,
        ) from None


def completion_from(data: dict[str, Any]) -> Completion:
    choice = data["choices"][0]
    content = (choice.get("logprobs") or {}).get("content") or []
    ids = list(choice["token_ids"])
    return Completion(
        text=(choice.get("message") or {}).get("content") or "",
        token_ids=ids,
        logprobs=[float(c["logprob"]) for c in content],
        versions=list(choice.get("token_versions") or [data.get("policy_version", 0)] * len(ids)),
        finish_reason=choice.get("finish_reason") or "stop",
    )


class CaptureClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        base_urls: list[str],
        retries: int,
        backoff_s: float = 0.25,
        backoff_max_s: float = 4.0,
        token: str | None = None,
    ) -> None:
        if not base_urls:
            raise ValueError("no inference URLs configured")
        self.http = http
        # Per request rather than on the shared client: whoever built the client (tests, bench)
        # need not know about it, and it never leaks into requests to anything but inference.
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_urls = base_urls
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s

    async def check_token(self, timeout_s: float = 5.0) -> None:
        """Ask each replica once whether it takes this worker's token: a 401 is a config error
        (`ConfigError`: the worker refuses to start rather than fail every rollout). Anything else,
        a replica not up yet included, is left to the calls' own retries."""
        for url in self.base_urls:
            try:
                resp = await self.http.get(url + MODELS, headers=self.headers, timeout=timeout_s)
            except httpx.HTTPError:
                continue
            if resp.status_code == 401:
                raise ConfigError(
                    f"inference at {url} refuses this worker's token: RELAYRL_INFERENCE_TOKEN must be the value "
                    f"inference has ({resp.text[:300]})"
                )

    def replica_for(self, rollout_id: str) -> str:
        return self.base_urls[zlib.crc32(rollout_id.encode()) % len(self.base_urls)]

    async def capture(
        self, base_url: str, path: str, body: dict[str, Any], role: str, run_id: str | None = None
    ) -> Captured:
        """Send one completion request (capture forced on, sampled with `run_id`'s weights);
        the response and its transitions."""
        start = time.perf_counter()
        resp = await self.request("POST", base_url + path, force_capture(path, body, run_id))
        try:
            data = resp.json()
        except ValueError:
            raise InferenceError(f"inference answered {resp.status_code} with a non-JSON body", status=502) from None
        served = data.get("policy_run_id") if isinstance(data, dict) else None
        if run_id is not None and served is not None and served != run_id:
            # Defence in depth: tokens of another run's policy must never be trained as this run's.
            raise InferenceError(
                f"inference sampled run {run_id!r}'s call with run {served!r}'s weights; not recorded", status=502,
                kind="wrong_run",
            )  # fmt: skip
        return Captured(data, transitions_from(path, data, role, time.perf_counter() - start), resp.content)

    async def request(self, method: str, url: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """With bounded retries and exponential backoff on 429, 5xx and connection errors (a
        `Retry-After`, e.g. inference's 503 `queue_full`, is honoured up to `backoff_max_s`).
        A 4xx other than 429 is inference refusing the request: raised at once with its body.
        Retries spent: a transient `InferenceError` (502 unreachable, 503 unavailable)."""
        last = ""
        unreachable = False
        for attempt in range(self.retries + 1):
            delay = min(self.backoff_max_s, self.backoff_s * 2**attempt)
            try:
                resp = await self.http.request(method, url, json=body, headers=self.headers)
            except httpx.TransportError as exc:  # connect/read errors: the replica may be restarting
                last, unreachable = f"{type(exc).__name__}: {exc}", True
            else:
                if resp.status_code < 400:
                    return resp
                if resp.status_code != _RETRY_STATUS and resp.status_code < 500:
                    raise InferenceError(
                        f"inference {resp.status_code}: {resp.text[:500]}", status=resp.status_code, body=resp.content
                    )
                last, unreachable = f"inference {resp.status_code}: {resp.text[:300]}", False
                delay = max(delay, min(self.backoff_max_s, _retry_after(resp)))
            if attempt < self.retries:
                await asyncio.sleep(delay)
        attempts = self.retries + 1
        if unreachable:
            message = f"inference replica {url} unreachable after {attempts} attempts: {last}"
            raise InferenceError(message, 502, kind="inference_unreachable", transient=True)
        raise InferenceError(
            f"inference unavailable after {attempts} attempts: {last}", 503, kind="inference_unavailable",
            transient=True,
        )  # fmt: skip


def _retry_after(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0
