"""The worker's capture proxy: an OpenAI-compatible HTTP server in front of inference.

Each rollout in flight on this worker gets its own base URL,

    http://<host>:<port>/r/<rollout_id>/<role>/v1

so an unchanged OpenAI-SDK agent (`AsyncOpenAI(base_url=ctx.base_url)`) is captured exactly:
the proxy forwards `chat/completions` and `completions` to the rollout's sticky inference
replica with token ids and logprobs forced on, records each choice as a transition of
`<role>` in that rollout's `AgentContext` (the same code path as `ctx.chat`), and returns
inference's OpenAI-shaped response unchanged (plus the extra token fields). `GET models`
passes through.

`stream: true` is served captured: the proxy records the whole completion, then replays it as
server-sent events (`services.rollout.streaming`). An unknown (or finished) rollout answers 404,
never an uncaptured call. Inference's own 4xx (e.g. a request it cannot serve) passes through with its body;
429/5xx/connection errors are retried with backoff (honouring `Retry-After`, as inference's 503
`queue_full` sends), then answered 502 (unreachable) or 503; the worker then runs a rollout that
failed over it again instead of recording it as a failed sample (see `Worker._run_agent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from services.rollout import streaming
from services.rollout.capture import CHAT, COMPLETIONS, MODELS, CaptureClient, InferenceError, error_body

if TYPE_CHECKING:
    from services.rollout.context import AgentContext

log = structlog.get_logger("rollout.proxy")

def _error(status: int, message: str, kind: str) -> Response:
    return Response(error_body(status, message, kind), status_code=status, media_type="application/json")


class CaptureProxy:
    """The rollouts in flight on this worker and the FastAPI app that serves their base URLs."""

    def __init__(self, client: CaptureClient | None) -> None:
        self.client = client
        # The rollouts in flight on this worker, by id. An entry lives exactly as long as its
        # `track` block (removed on every way out: ok, error, timeout, cancel, a transient
        # failure retried later), so it holds at most as many as the worker runs at once
        # (`concurrency`, the task consumer's max_in_flight). A second attempt of one id on this
        # worker replaces the first, and the first's exit leaves the second's entry alone.
        self.rollouts: dict[str, AgentContext] = {}
        self.url: str | None = None  # http://host:port once serving
        self.app = self._build_app()

    def base_url(self, rollout_id: str, role: str = "assistant") -> str:
        if self.url is None:
            raise RuntimeError("the capture proxy is not serving")
        return f"{self.url}/r/{quote(rollout_id, safe='')}/{quote(role, safe='')}/v1"

    @contextlib.contextmanager
    def track(self, ctx: AgentContext) -> Iterator[None]:
        """Serve `ctx`'s base URLs while the block runs; afterwards they answer 404."""
        rollout_id = ctx.request.rollout_id
        self.rollouts[rollout_id] = ctx
        try:
            yield
        finally:
            ctx.closed = True
            if self.rollouts.get(rollout_id) is ctx:
                del self.rollouts[rollout_id]

    def _context(self, rollout_id: str) -> AgentContext | Response:
        ctx = self.rollouts.get(rollout_id)
        if ctx is None:
            return _error(
                404,
                f"unknown rollout {rollout_id!r}: it is not in flight on this worker (finished, timed out, "
                "or never here), so its calls cannot be captured",
                "not_found",
            )
        return ctx

    async def _complete(self, rollout_id: str, role: str, path: str, request: Request) -> Response:
        ctx = self._context(rollout_id)
        if isinstance(ctx, Response):
            return ctx
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object", "invalid_request_error")
        stream = bool(body.pop("stream", False))
        include_usage = streaming.wants_usage(body)
        body.pop("stream_options", None)  # inference answers whole; the replay honours include_usage
        try:
            captured = await ctx.capture(path, body, role)
        except InferenceError as exc:
            log.debug("proxied call failed", rollout_id=rollout_id, role=role, status=exc.status, error=str(exc))
            return Response(exc.body, status_code=exc.status, media_type="application/json")
        if stream:
            return StreamingResponse(
                streaming.events(path, captured.data, include_usage), media_type="text/event-stream"
            )
        return Response(captured.content, media_type="application/json")

    async def _models(self, rollout_id: str) -> Response:
        ctx = self._context(rollout_id)
        if isinstance(ctx, Response):
            return ctx
        if self.client is None:
            return _error(503, "this worker has no inference configured", "inference_unavailable")
        try:
            resp = await self.client.request("GET", self.client.replica_for(rollout_id) + MODELS)
        except InferenceError as exc:
            return Response(exc.body, status_code=exc.status, media_type="application/json")
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="relayrl capture proxy", docs_url=None, redoc_url=None, openapi_url=None)
        prefix = "/r/{rollout_id:path}/{role}/v1"

        @app.post(prefix + "/chat/completions")
        async def chat(rollout_id: str, role: str, request: Request) -> Response:
            return await self._complete(rollout_id, role, CHAT, request)

        @app.post(prefix + "/completions")
        async def completions(rollout_id: str, role: str, request: Request) -> Response:
            return await self._complete(rollout_id, role, COMPLETIONS, request)

        @app.get(prefix + "/models")
        async def models(rollout_id: str, role: str) -> Response:
            return await self._models(rollout_id)

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            return {"status": "ok", "rollouts_in_flight": len(self.rollouts)}

        return app


class _Server(uvicorn.Server):
    """uvicorn inside the worker's loop: the worker owns SIGINT/SIGTERM, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve(proxy: CaptureProxy, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `proxy` on host:port (0: a free port) in the running loop; yields its URL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        proxy.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises the startup failure
            raise RuntimeError("the capture proxy exited at startup")
        await asyncio.sleep(0.01)
    advertised = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    if ":" in advertised:
        advertised = f"[{advertised}]"
    proxy.url = f"http://{advertised}:{bound}"
    try:
        yield proxy.url
    finally:
        proxy.url = None
        server.should_exit = True
        await task
        sock.close()
