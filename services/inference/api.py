"""FastAPI app: health, models, stats and the OpenAI-compatible completion endpoints.

The model loads in a background thread after startup, so `/healthz` answers at once and
`/readyz` turns 200 only when the engine is serving and, when the replica follows the
trainer's weights (`watch_policy`), has loaded the latest published version. Every response
carries the token ids exactly as sampled, a logprob and a policy version per token, which is
what an RL trainer needs and what re-tokenizing text can never give back.

Run isolation: a request names its run (body `run_id` or header `X-Relayrl-Run`; the rollout
worker's capture client always does) and is sampled only with that run's weights: a pinned
replica refuses other runs (409 `wrong_run`), a following one loads the run's weights first
(503 `run_loading` while they cannot be had). The response says whose weights served it:
`policy_run_id` (null: the checkpoint's own weights, every run's version 0) and
`policy_sha256`. See `services.inference.policy` for the two replica modes and their memory.

Authentication: every `/v1` route needs `Authorization: Bearer <inference_token>` (the
rollout workers' shared secret, `RELAYRL_INFERENCE_TOKEN`); without it, or with another, the
answer is 401 with the reason. `/healthz` and `/readyz` stay open for probes. A replica with
no token configured refuses to start (`ConfigError`), and so does one that follows the
trainer's weights without the key that verifies their signatures (`RELAYRL_WEIGHTS_KEY`).

Overload: the engine holds at most `max_queued_requests` waiting sequences; past that a request
is refused at once with 503 `queue_full` and `Retry-After` (the capture client waits and
retries), so a burst costs the replica nothing it has to keep.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jinja2
import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.inference.engine import (
    EngineUnavailable,
    Generation,
    InvalidRequest,
    Key,
    QueueFull,
    RunNotLoaded,
    TorchEngine,
    check_engine_kind,
    load_engine,
)
from services.inference.policy import PolicySyncError, PolicyWatcher, RunLoading, WrongRun
from services.inference.sampling import SamplingConfig
from services.inference.schemas import ChatCompletionRequest, CompletionRequest, _Common
from services.inference.settings import Settings
from services.inference.text import TokenTexts
from services.inference.tools import parse_tool_calls
from shared import subjects
from shared.config import require_secret

# Unbound lazy logger: binding at import would freeze structlog's config before telemetry.setup.
log = structlog.get_logger("inference.api")

MAX_CHOICES = 256
RUN_HEADER = "x-relayrl-run"
# Seconds a refused caller is told to wait: about the time a batch of short agent turns takes.
OVERLOAD_RETRY_AFTER_S = 1


class Unauthorized(Exception):
    """A /v1 request without the workers' bearer token, or with another one (401)."""


class Runtime:
    """What the endpoints need: the engine once loaded, or why it is not."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.served_name = settings.served_model_name or settings.model
        self.engine: TorchEngine | None = None
        self.texts: TokenTexts | None = None
        self.model_path: Path | None = None
        self.error: str | None = None
        self.created = int(time.time())
        self.watcher: PolicyWatcher | None = None

    def load(self) -> None:
        s = self.settings
        try:
            check_engine_kind(s.engine)
            engine, path = load_engine(
                s.model,
                model_dir=s.model_dir,
                device=s.device,
                dtype=s.dtype,
                max_batch_size=s.max_batch_size,
                batch_wait_s=s.batch_wait_ms / 1000.0,
                max_model_len=s.max_model_len,
                version=s.initial_version,
                max_queued_requests=s.max_queued_requests,
                # A following replica holds each run's weights; a pinned or fixed one only its own.
                max_sets=s.max_runs if s.watch_policy and s.run_id is None else 1,
            )
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and /readyz
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model load failed", model=s.model)
            return
        self.texts = TokenTexts(engine.tokenizer)
        self.model_path = path
        self.engine = engine

    def ready_engine(self) -> TorchEngine:
        if self.engine is None:
            raise EngineUnavailable(self.error or "the model is still loading")
        return self.engine

    def failure(self) -> str | None:
        """Why this replica cannot do its job, if it cannot (what /healthz reports)."""
        if self.error:
            return self.error
        if self.engine is not None and not self.engine.alive:
            return f"engine stopped: {self.engine.error}"
        if self.watcher is not None and self.watcher.error:
            return self.watcher.error
        return None

    def policy(self) -> dict[str, Any]:
        if self.watcher is not None:
            return self.watcher.status()
        version = self.engine.version if self.engine is not None else None
        return {"policy_run_id": None, "policy_version": version, "policy_synced": None}

    def advert(self) -> dict[str, Any] | None:
        """What this replica serves, for the gateway's model check (None while loading)."""
        if self.engine is None:
            return None
        return {"model": self.settings.model, "served_model_name": self.served_name, "path": str(self.model_path)}

    async def weights_for(self, engine: TorchEngine, req: _Common, header_run: str | None) -> Key:
        """The weight set that serves `req` (its run's, see the module docstring)."""
        run = req.run_id
        if header_run is not None:
            header_run = header_run.strip() or None
        if header_run is not None and run is not None and header_run != run:
            raise InvalidRequest(f"the body names run {run!r} and the {RUN_HEADER} header run {header_run!r}")
        run = run or header_run
        if run is not None:
            try:
                subjects.check_token(run)
            except ValueError as exc:
                raise InvalidRequest(f"run: {exc}") from None
        if self.watcher is None:  # fixed weights (--no-watch-policy): every run gets them
            await _await_version(engine, req.min_policy_version, self.settings.version_wait_s)
            return None
        return await self.watcher.resolve(engine, run, req.min_policy_version, self.settings.version_wait_s)

    def served_by(self, engine: TorchEngine, key: Key) -> dict[str, Any]:
        applied = self.watcher.served(key) if self.watcher is not None else None
        return {"policy_run_id": applied.run_id if applied else None, "policy_sha256": applied.sha256 if applied else None}


def create_app(settings: Settings) -> FastAPI:
    """The app; raises `shared.config.ConfigError` when a required secret is not configured."""
    token = require_secret(settings.inference_token, "inference_token", "the token the rollout workers send")
    if settings.watch_policy:
        # Checked here, not at the first publish: a replica that could not verify weights
        # would otherwise start, look healthy, and refuse every version it is sent.
        require_secret(settings.weights_key, "weights_key", "the trainer's weights signing key")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        app.state.runtime = runtime
        runtime.watcher = await _connect_watcher(settings)
        loading = asyncio.create_task(asyncio.to_thread(runtime.load))

        async def loaded_engine() -> TorchEngine | None:
            await asyncio.shield(loading)  # shielded: stopping the watcher must not cancel the load
            return runtime.engine

        if runtime.watcher is not None:
            runtime.watcher.start(loaded_engine, runtime.advert)
        try:
            yield
        finally:
            if runtime.watcher is not None:
                await runtime.watcher.close()
            # uvicorn has already drained in-flight HTTP requests; now let the worker end.
            await asyncio.wait({loading}, timeout=settings.graceful_timeout_s)
            if runtime.engine is not None:
                await asyncio.to_thread(runtime.engine.stop, settings.graceful_timeout_s)

    app = FastAPI(title="relayrl inference", version="0.1.0", lifespan=lifespan)
    app.include_router(_health_router())
    app.include_router(_openai_router(token))
    _install_error_handlers(app)
    return app


async def _connect_watcher(settings: Settings) -> PolicyWatcher | None:
    """Connect the policy watcher, or fail startup: a replica that was asked to follow the
    trainer must not quietly serve stale weights because NATS is unreachable."""
    if not settings.watch_policy:
        return None
    watcher = PolicyWatcher(settings, settings.run_id, initial_version=settings.initial_version)
    try:
        await watcher.connect()
    except PolicySyncError as exc:
        log.error("cannot start", error=str(exc))
        raise
    return watcher


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


# --- errors --------------------------------------------------------------------------------


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    # OpenAI's error shape, which OpenAI SDKs turn into readable exceptions.
    body = {"error": {"message": message, "type": kind, "code": code or status}}
    return JSONResponse(body, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            parts.append(f"{loc}: {err.get('msg')}")
        return _error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        response = _error(401, str(exc), "authentication_error", code="invalid_token")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(InvalidRequest)
    async def _bad(_: Request, exc: InvalidRequest) -> JSONResponse:
        return _error(400, str(exc), code=exc.code)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(_: Request, exc: EngineUnavailable) -> JSONResponse:
        code = "run_loading" if isinstance(exc, RunNotLoaded) else None
        return _error(503, str(exc), "service_unavailable", code=code)

    @app.exception_handler(WrongRun)
    async def _wrong_run(_: Request, exc: WrongRun) -> JSONResponse:
        return _error(409, str(exc), "invalid_request_error", code=exc.code)

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        response = _error(503, str(exc), "service_unavailable", code=exc.code)
        response.headers["Retry-After"] = str(OVERLOAD_RETRY_AFTER_S)
        return response

    @app.exception_handler(RunLoading)
    async def _run_loading(_: Request, exc: RunLoading) -> JSONResponse:
        response = _error(503, str(exc), "service_unavailable", code=exc.code)
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


# --- health, models, stats -------------------------------------------------------------------


def _health_router() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        failed = _runtime(request).failure()
        if failed:
            return JSONResponse({"status": "failed", "error": failed}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        rt = _runtime(request)
        failed = rt.failure()
        body = {"model": rt.served_name, **rt.policy()}
        if failed:
            return JSONResponse({"status": "failed", "error": failed, **body}, status_code=503)
        if rt.engine is None:
            return JSONResponse({"status": "loading", "error": None, **body}, status_code=503)
        if rt.watcher is not None and not rt.watcher.synced:
            # A replica started after a publish serves only once it has the latest weights.
            return JSONResponse({"status": "syncing", "error": None, **body}, status_code=503)
        return JSONResponse({"status": "ready", **body})

    return router


def _bearer_check(token: str) -> Callable[[Request], Awaitable[None]]:
    expected = token.encode()

    async def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("inference requires the rollout workers' token: send Authorization: Bearer "
                               "<RELAYRL_INFERENCE_TOKEN>")  # fmt: skip
        # Constant-time: how long a refusal takes must not tell how much of a guess was right.
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise Unauthorized("the bearer token is not this inference service's token (RELAYRL_INFERENCE_TOKEN)")

    return check


def _openai_router(token: str) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_bearer_check(token))])

    @router.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        rt = _runtime(request)
        engine = rt.ready_engine()
        return {
            "object": "list",
            "data": [
                {
                    "id": rt.served_name,
                    "object": "model",
                    "created": rt.created,
                    "owned_by": "relayrl",
                    "root": str(rt.model_path),
                    "max_model_len": engine.max_model_len,
                    "policy_version": rt.policy().get("policy_version"),
                }
            ],
        }

    @router.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        rt = _runtime(request)
        engine = rt.ready_engine()
        return {
            **rt.policy(),
            "active_rows": engine.active_rows,
            "max_batch_size": engine.max_batch_size,
            "queued_requests": engine.queued_requests,
            "max_queued_requests": engine.max_queued_requests,
            "requests_in_flight": engine.requests_in_flight,
            **engine.stats.snapshot(),
        }

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
        return await _completions(_runtime(request), body, request.headers.get(RUN_HEADER))

    @router.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        return await _chat(_runtime(request), body, request.headers.get(RUN_HEADER))

    return router


# --- completions -------------------------------------------------------------------------------


async def _completions(rt: Runtime, req: CompletionRequest, header_run: str | None = None) -> dict[str, Any]:
    engine = rt.ready_engine()
    _reject_unsupported(req)
    if req.echo:
        raise InvalidRequest("echo is not supported")
    prompts = _completion_prompts(engine, req.prompt)
    if len(prompts) * req.n > MAX_CHOICES:
        raise InvalidRequest(f"at most {MAX_CHOICES} choices per request (prompts x n)")
    jobs = []
    for ids in prompts:
        budget = req.max_tokens if req.max_tokens is not None else engine.max_model_len - len(ids)
        for i in range(req.n):
            cfg = _sampling(req, max(budget, 1), top_logprobs=req.logprobs or 0, choice=i)
            engine.validate(ids, cfg)
            jobs.append((ids, cfg))
    key = await rt.weights_for(engine, req, header_run)
    gens = await _generate_all(engine, jobs, key)
    assert rt.texts is not None
    choices = []
    for index, gen in enumerate(gens):
        choice: dict[str, Any] = {
            "index": index,
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "logprobs": _completion_logprobs(rt.texts, gen) if req.logprobs is not None else None,
            "token_versions": gen.versions,
        }
        if req.return_token_ids:
            choice["token_ids"] = gen.token_ids
            choice["prompt_token_ids"] = gen.prompt_ids
        choices.append(choice)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": rt.served_name,
        "choices": choices,
        "usage": _usage(prompts, gens),
        "policy_version": _policy_version(engine, gens, key),
        **rt.served_by(engine, key),
    }


def _completion_prompts(engine: TorchEngine, prompt: str | list[int] | list[str] | list[list[int]]) -> list[list[int]]:
    tokenizer = engine.tokenizer
    if isinstance(prompt, str):
        return [tokenizer(prompt)["input_ids"]]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]


def _completion_logprobs(texts: TokenTexts, gen: Generation) -> dict[str, Any]:
    tokens = [texts.text(t) for t in gen.token_ids]
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    top: list[dict[str, float]] = []
    for i, tid in enumerate(gen.token_ids):
        alts = {texts.text(a): lp for a, lp in gen.top_logprobs[i]} if gen.top_logprobs else {}
        alts.setdefault(tokens[i], gen.logprobs[i])
        top.append(alts)
    return {"tokens": tokens, "token_logprobs": gen.logprobs, "top_logprobs": top, "text_offset": offsets}


# --- chat --------------------------------------------------------------------------------------


async def _chat(rt: Runtime, req: ChatCompletionRequest, header_run: str | None = None) -> dict[str, Any]:
    engine = rt.ready_engine()
    _reject_unsupported(req)
    prompt_ids = _chat_prompt(engine, req)
    budget = req.token_budget()
    if budget is None:
        budget = max(engine.max_model_len - len(prompt_ids), 1)
    top_k = (req.top_logprobs or 0) if req.logprobs else 0
    jobs = []
    for i in range(req.n):
        cfg = _sampling(req, budget, top_logprobs=top_k, choice=i)
        engine.validate(prompt_ids, cfg)
        jobs.append((prompt_ids, cfg))
    key = await rt.weights_for(engine, req, header_run)
    gens = await _generate_all(engine, jobs, key)
    assert rt.texts is not None
    choices = []
    for index, gen in enumerate(gens):
        message, finish_reason = assistant_message(gen.text, gen.finish_reason, req.tools, req.tool_choice)
        choice: dict[str, Any] = {
            "index": index,
            "message": message,
            "finish_reason": finish_reason,
            "logprobs": {"content": _chat_logprobs(rt.texts, gen)} if req.logprobs else None,
            "token_versions": gen.versions,
        }
        if req.return_token_ids:
            choice["token_ids"] = gen.token_ids
        choices.append(choice)
    response: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": rt.served_name,
        "choices": choices,
        "usage": _usage([prompt_ids], gens),
        "policy_version": _policy_version(engine, gens, key),
        **rt.served_by(engine, key),
    }
    if req.return_token_ids:
        response["prompt_token_ids"] = prompt_ids
    return response


def assistant_message(
    text: str,
    finish_reason: str,
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
) -> tuple[dict[str, Any], str]:
    """The OpenAI message and finish reason for one generated reply.

    Only the message text is reinterpreted: the choice's token ids, logprobs and versions stay
    exactly as sampled, which is what the capture proxy records for training. "tool_calls"
    replaces only "stop": a reply cut off by max_tokens must still say "length".
    """
    parsed = parse_tool_calls(text, tools, tool_choice)
    if not parsed.tool_calls:
        return {"role": "assistant", "content": text}, finish_reason
    message = {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


def _chat_prompt(engine: TorchEngine, req: ChatCompletionRequest) -> list[int]:
    """Render with the checkpoint's own chat template, then tokenize without extra specials
    (the template already wrote any BOS it wants)."""
    tokenizer = engine.tokenizer
    try:
        messages = [m.for_template() for m in req.messages]
        text = tokenizer.apply_chat_template(
            messages,
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
            tokenize=False,
            **(req.chat_template_kwargs or {}),
        )
    except (ValueError, TypeError, KeyError, jinja2.TemplateError) as exc:
        raise InvalidRequest(f"cannot apply the chat template: {exc}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_logprobs(texts: TokenTexts, gen: Generation) -> list[dict[str, Any]]:
    content = []
    for i, tid in enumerate(gen.token_ids):
        alts = gen.top_logprobs[i] if gen.top_logprobs else []
        content.append(
            {
                "token": texts.text(tid),
                "logprob": gen.logprobs[i],
                "bytes": texts.bytes(tid),
                "top_logprobs": [{"token": texts.text(a), "logprob": lp, "bytes": texts.bytes(a)} for a, lp in alts],
            }
        )
    return content


# --- shared --------------------------------------------------------------------------------------


def _reject_unsupported(req: _Common) -> None:
    if req.stream:
        raise InvalidRequest("stream=true is not supported by this server; send stream=false")


def _sampling(req: _Common, max_tokens: int, *, top_logprobs: int, choice: int) -> SamplingConfig:
    return SamplingConfig(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=req.stop_list(),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        # n > 1 with a seed: choice i uses seed + i, so each choice is reproducible alone.
        seed=None if req.seed is None else req.seed + choice,
        top_logprobs=top_logprobs,
        ignore_eos=req.ignore_eos,
    )


async def _await_version(engine: TorchEngine, version: int | None, timeout_s: float) -> None:
    """Hold a request until the engine serves `version` (a swap the trainer already announced
    may still be loading). After `timeout_s` it runs anyway: token stamps tell the truth."""
    if version is None or engine.version >= version:
        return
    deadline = time.monotonic() + timeout_s
    while engine.version < version and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


async def _generate_all(engine: TorchEngine, jobs: list[tuple[list[int], SamplingConfig]], key: Key) -> list[Generation]:
    if len(jobs) > engine.max_queued_requests:
        # Its choices all wait at once: it could never be admitted, so retrying would not help.
        raise InvalidRequest(f"{len(jobs)} choices (prompts x n) exceed this replica's queue of "
                             f"{engine.max_queued_requests} (max_queued_requests)")  # fmt: skip
    # A TaskGroup cancels the siblings if one fails, so no orphaned rows keep decoding (and a
    # request refused for a full queue gives back the places its first choices took).
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(engine.generate(ids, cfg, key)) for ids, cfg in jobs]
    except ExceptionGroup as group_error:
        raise group_error.exceptions[0] from None  # so the error handlers see the real error
    return [t.result() for t in tasks]


def _usage(prompts: list[list[int]], gens: list[Generation]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(g.token_ids) for g in gens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _policy_version(engine: TorchEngine, gens: list[Generation], key: Key) -> int:
    return max((g.policy_version for g in gens), default=engine.versions.get(key, engine.version))
