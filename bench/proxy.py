"""Capture proxy overhead: completion tokens/s through the rollout worker's proxy vs straight to inference.

    python -m bench.proxy [--rounds 5] [--requests 256] [--concurrency 16] [--max-tokens 32] [--think-ms 0]

Starts one inference process (`python -m services.inference --model tiny --no-watch-policy`,
--threads torch threads) on loopback and, in this process, the worker's `CaptureProxy` served
by uvicorn on this event loop (uvloop where installed), as in `python -m services.rollout`.
--concurrency clients each send chat completions one after another (--max-tokens tokens,
temperature 1, `ignore_eos`, a fixed seed per request) in two arms:

- direct: httpx straight to inference, the body exactly as the proxy forwards it (the
  rollout's sampling defaults filled in, token ids and logprobs forced on), so inference
  does the same work;
- proxied: httpx to the proxy's base URL of a tracked rollout (one per client per round);
  the proxy forwards to inference and records each call as a transition.

The arms alternate for --rounds rounds (direct first in odd rounds, proxied first in even
ones) after one warm-up round of each. One table, the direct arm being the raw limit: per-arm
median completion tokens/s and requests/s over the rounds, median latency per request and the
proxy's added latency (and how much of the proxied latency was the proxy's own call to
inference), CPU per request of this process and of inference (/proc), and inference's own
counters (/v1/stats: prefills, forward passes, mean decode batch) to show where a difference
comes from. Both arms must generate the same number of tokens and the proxy must record every
call, or the script fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import structlog  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.cli.nats_server import free_port, wait_for_port  # noqa: E402
from services.rollout import proxy as capture_proxy  # noqa: E402
from services.rollout.capture import CHAT, MODEL, CaptureClient, force_capture  # noqa: E402
from services.rollout.context import AgentContext  # noqa: E402
from services.rollout.proxy import CaptureProxy  # noqa: E402
from services.rollout.settings import RolloutSettings  # noqa: E402
from shared.config import new_secret  # noqa: E402
from shared.messages import RolloutRequest, SamplingParams  # noqa: E402
from shared.models import ensure_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The inference this bench starts and its worker share a token, as deployed ones do.
os.environ.setdefault("RELAYRL_INFERENCE_TOKEN", new_secret())
AUTH = {"Authorization": f"Bearer {os.environ['RELAYRL_INFERENCE_TOKEN']}"}
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


@dataclass
class Round:
    arm: str
    wall_s: float
    tokens: int
    latencies: list[float] = field(default_factory=list)
    upstream: list[float] = field(default_factory=list)  # proxied: the proxy's own call to inference (recorded)
    cpu_self_s: float = 0.0  # CPU seconds of this process (agents' client + proxy) during the round
    cpu_inference_s: float = 0.0  # and of the inference process
    prefills: int = 0  # inference's forward passes during the round: prefills (new requests joining)
    decode_steps: int = 0  # and decode steps
    decoded_rows: int = 0  # sum of the decode steps' batch sizes

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.wall_s


def process_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/<pid>/stat)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def engine_stats(http: httpx.AsyncClient, url: str) -> tuple[int, int, int]:
    """Inference's counters: (prefills, decode steps, rows decoded)."""
    stats = (await http.get(url)).json()
    rows = sum(int(size) * n for size, n in stats["batch_sizes"].items())
    return stats["prefills"], stats["decode_steps"], rows


def messages(i: int) -> list[dict[str, Any]]:
    """Request i's prompt: a handful of short prompts, the same in both arms."""
    return [{"role": "user", "content": f"Say {WORDS[i % len(WORDS)]} {i % 10} times."}]


def sampling(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=max_tokens)


def rollout(rollout_id: str, max_tokens: int) -> RolloutRequest:
    return RolloutRequest(rollout_id=rollout_id, run_id="bench", task_id="proxy", group_id="proxy", sample_index=0,
                          group_size=1, agent="bench", input={}, sampling=sampling(max_tokens))  # fmt: skip


def agent_body(i: int, max_tokens: int) -> dict[str, Any]:
    """What an agent sends to its base URL (OpenAI SDK shape plus vLLM's ignore_eos)."""
    return {"model": MODEL, "messages": messages(i), "max_tokens": max_tokens, "temperature": 1.0,
            "seed": 1000 + i, "ignore_eos": True}  # fmt: skip


def forwarded_body(i: int, max_tokens: int) -> dict[str, Any]:
    """The body the proxy sends inference for agent_body(i): sampling defaults, then capture forced on."""
    ctx = AgentContext(request=rollout("template", max_tokens), client=None)
    return force_capture(CHAT, ctx.with_sampling_defaults(agent_body(i, max_tokens)))


async def run_round(
    arm: str,
    http: httpx.AsyncClient,
    urls: list[str],
    bodies: list[dict[str, Any]],
    think: list[float],
    concurrency: int,
    inference_pid: int,
    stats_url: str,
) -> Round:
    """Client c sends requests c, c+C, c+2C, ... one after another to urls[c], waiting think[i] seconds
    before request i (the agent's own work between calls); all clients at once."""
    result = Round(arm, 0.0, 0, [])
    tokens = [0] * len(bodies)

    async def client(c: int) -> None:
        for i in range(c, len(bodies), concurrency):
            if think[i]:
                await asyncio.sleep(think[i])
            start = time.perf_counter()
            resp = await http.post(urls[c], json=bodies[i])
            result.latencies.append(time.perf_counter() - start)
            if resp.status_code != 200:
                raise RuntimeError(f"{arm} request {i}: {resp.status_code} {resp.text[:300]}")
            data = resp.json()
            tokens[i] = data["usage"]["completion_tokens"]
            assert len(data["choices"][0]["token_ids"]) == tokens[i], "token ids not returned"

    before = await engine_stats(http, stats_url)
    cpu_self, cpu_inf = process_cpu_s(), process_cpu_s(inference_pid)
    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    result.wall_s = time.perf_counter() - start
    result.cpu_self_s = process_cpu_s() - cpu_self
    result.cpu_inference_s = process_cpu_s(inference_pid) - cpu_inf
    after = await engine_stats(http, stats_url)
    result.prefills, result.decode_steps, result.decoded_rows = (a - b for a, b in zip(after, before))
    result.tokens = sum(tokens)
    return result


async def measure(args: argparse.Namespace, inference: str, pid: int) -> tuple[list[Round], int]:
    # The worker's defaults (retries, connections) unless --http-connections says otherwise.
    overrides = {"http_connections": args.http_connections} if args.http_connections else {}
    settings = RolloutSettings(inference_urls=inference, **overrides)
    conns = min(args.concurrency, settings.http_connections)
    worker_limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    agent_limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    direct_bodies = [forwarded_body(i, args.max_tokens) for i in range(args.requests)]
    agent_bodies = [agent_body(i, args.max_tokens) for i in range(args.requests)]
    think = [random.Random(i).uniform(0, args.think_ms / 1000) for i in range(args.requests)]  # same in both arms
    stats = inference + "/v1/stats"
    rounds: list[Round] = []
    transitions = 0
    # The worker's connection pool toward inference (the proxy's CaptureClient), and the agents' client.
    async with (
        httpx.AsyncClient(timeout=settings.inference_timeout_s, limits=worker_limits) as worker_http,
        # The direct arm calls inference itself, so it sends the token as the worker does.
        httpx.AsyncClient(timeout=settings.inference_timeout_s, limits=agent_limits, headers=AUTH) as agents,
    ):
        client = CaptureClient(worker_http, settings.inference_url_list(), settings.inference_retries,
                               settings.inference_backoff_s, settings.inference_backoff_max_s,
                               token=os.environ["RELAYRL_INFERENCE_TOKEN"])  # fmt: skip
        proxy = CaptureProxy(client)
        async with capture_proxy.serve(proxy, settings.proxy_host, 0):

            async def direct() -> Round:
                url = inference + CHAT
                urls = [url] * args.concurrency
                return await run_round("direct", agents, urls, direct_bodies, think, args.concurrency, pid, stats)

            async def proxied(n: int) -> Round:
                nonlocal transitions
                ctxs = [AgentContext(request=rollout(f"proxy.{n}.{c}", args.max_tokens), client=client, proxy=proxy)
                        for c in range(args.concurrency)]  # fmt: skip
                urls = [proxy.base_url(ctx.request.rollout_id) + "/chat/completions" for ctx in ctxs]
                with contextlib.ExitStack() as live:  # each client's rollout in flight, as in the worker
                    for ctx in ctxs:
                        live.enter_context(proxy.track(ctx))
                    out = await run_round("proxied", agents, urls, agent_bodies, think, args.concurrency, pid, stats)
                transitions += sum(len(ctx.transitions) for ctx in ctxs)
                out.upstream = [t.latency_s for ctx in ctxs for t in ctx.transitions]
                return out

            await direct()  # warm-up: connections, the engine's first batches, the proxy's first requests
            await proxied(-1)
            transitions = 0
            for n in range(args.rounds):
                if n % 2 == 0:
                    rounds += [await direct(), await proxied(n)]
                else:
                    rounds += [await proxied(n), await direct()]
    return rounds, transitions


def start_inference(args: argparse.Namespace, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    model = ensure_tiny_model(root / "models" / "tiny")
    port = free_port()
    cmd = [sys.executable, "-m", "services.inference", "--port", str(port), "--model", str(model),
           "--model-dir", str(root / "models"), "--threads", str(args.threads), "--device", "cpu",
           "--dtype", "float32", "--no-watch-policy"]  # fmt: skip
    env = {**os.environ, "RELAYRL_LOG_FORMAT": "console", "PYTHONUNBUFFERED": "1"}
    log = open(root / "inference.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_port("127.0.0.1", port, 120, proc)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"inference exited:\n{(root / 'inference.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} never became ready")


def run(coro: Any) -> Any:
    """On uvloop where installed, as the rollout worker runs (`shared.config.run_service`)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per arm (after one warm-up round of each)")
    parser.add_argument("--requests", type=int, default=256, help="chat completions per round")
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending at once")
    parser.add_argument("--http-connections", type=int, default=0,
                        help="the proxy's connections to inference (default: the worker's http_connections)")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request (ignore_eos)")
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="each client waits a random 0..think-ms before each request (same waits in both arms)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads of the inference process (default: half the cores, as the stack)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_inference(args, Path(tmp))
        try:
            rounds, transitions = run(measure(args, url, proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    load_after = os.getloadavg()[0]
    by_arm = {arm: [r for r in rounds if r.arm == arm] for arm in ("direct", "proxied")}
    tokens = {arm: {r.tokens for r in rs} for arm, rs in by_arm.items()}
    if tokens["direct"] != tokens["proxied"] or len(tokens["direct"]) != 1:
        raise AssertionError(f"the arms generated different token counts per round: {tokens}")
    expected = args.rounds * args.requests
    if transitions != expected:
        raise AssertionError(f"the proxy recorded {transitions} transitions, expected {expected}")

    def med(arm: str, key: str) -> float:
        return statistics.median(getattr(r, key) for r in by_arm[arm])

    def lat(arm: str) -> float:
        return statistics.median(x for r in by_arm[arm] for x in r.latencies)

    def busy(rs: list[Round], key: str) -> float:
        return sum(getattr(r, key) for r in rs) / sum(r.wall_s for r in rs)

    def per_request(rs: list[Round], key: str) -> float:
        return sum(getattr(r, key) for r in rs) / sum(len(r.latencies) for r in rs)

    def mean_batch(rs: list[Round]) -> float:
        return sum(r.decoded_rows for r in rs) / sum(r.decode_steps for r in rs)

    d_tok, p_tok = med("direct", "tokens_per_s"), med("proxied", "tokens_per_s")
    d_req, p_req = med("direct", "requests_per_s"), med("proxied", "requests_per_s")
    d_lat, p_lat = lat("direct"), lat("proxied")
    per_round = [p.tokens_per_s / d.tokens_per_s for d, p in zip(by_arm["direct"], by_arm["proxied"])]

    title = (f"relayrl capture proxy, {os.cpu_count()} cores, inference tiny on {args.threads} torch thread(s); "
             f"{args.rounds} rounds x {args.requests} requests, {args.concurrency} clients, "
             f"{args.max_tokens} tokens each ({next(iter(tokens['direct']))} per round)"
             + (f", think 0-{args.think_ms:g} ms" if args.think_ms else ""))  # fmt: skip
    table = Table(title=title)
    for col in ("measurement", "direct", "proxied", "proxied / direct"):
        table.add_column(col)
    table.add_row("completion tokens/s, median of rounds", f"{d_tok:,.0f}", f"{p_tok:,.0f}", f"{p_tok / d_tok:.3f}")
    table.add_row("requests/s, median of rounds", f"{d_req:,.1f}", f"{p_req:,.1f}", f"{p_req / d_req:.3f}")
    table.add_row("latency per request, median (ms)", f"{d_lat * 1000:,.1f}", f"{p_lat * 1000:,.1f}",
                  f"{p_lat / d_lat:.3f}")  # fmt: skip
    table.add_row("proxy's added latency, median (ms)", "", f"{(p_lat - d_lat) * 1000:,.1f}", "")
    up = statistics.median(x for r in by_arm["proxied"] for x in r.upstream)  # request + response JSON decode
    table.add_row("  proxied latency spent in the proxy's call to inference, median (ms)", "",
                  f"{up * 1000:,.1f}", f"{up / d_lat:.3f}")  # fmt: skip
    cpu_rows = (("bench process (agents' client + proxy)", "cpu_self_s"), ("inference process", "cpu_inference_s"))
    for label, key in cpu_rows:
        d_cpu, p_cpu = (1000 * per_request(by_arm[arm], key) for arm in ("direct", "proxied"))
        table.add_row(f"CPU ms per request: {label}", f"{d_cpu:.2f}", f"{p_cpu:.2f}", f"{p_cpu / d_cpu:.2f}")
    d_pf, p_pf = per_request(by_arm["direct"], "prefills"), per_request(by_arm["proxied"], "prefills")
    table.add_row("inference prefills per request", f"{d_pf:.3f}", f"{p_pf:.3f}", f"{p_pf / d_pf:.2f}")
    d_fw, p_fw = (per_request(by_arm[arm], "prefills") + per_request(by_arm[arm], "decode_steps")
                  for arm in ("direct", "proxied"))  # fmt: skip
    table.add_row("inference forward passes per request", f"{d_fw:.2f}", f"{p_fw:.2f}", f"{p_fw / d_fw:.2f}")
    d_bs, p_bs = mean_batch(by_arm["direct"]), mean_batch(by_arm["proxied"])
    table.add_row("inference mean decode batch size", f"{d_bs:.1f}", f"{p_bs:.1f}", f"{p_bs / d_bs:.2f}")
    for label, key in (("bench process", "cpu_self_s"), ("inference process", "cpu_inference_s")):
        d_busy, p_busy = busy(by_arm["direct"], key), busy(by_arm["proxied"], key)
        table.add_row(f"cores busy: {label}", f"{d_busy:.2f}", f"{p_busy:.2f}", "")
    table.add_row("tokens/s per round pair, proxied / direct", "", "", " ".join(f"{x:.3f}" for x in per_round))
    table.add_row("  median of the round pairs", "", "", f"{statistics.median(per_round):.3f}")
    table.add_row("throughput overhead (1 - tokens/s ratio)", "", "", f"{(1 - p_tok / d_tok) * 100:.1f} %")
    table.caption = f"1-minute load average: {load_before:.2f} before the run, {load_after:.2f} after"
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
