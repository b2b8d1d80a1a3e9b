"""Weight sync: trainer publish -> inference replicas serving it, next to the raw object store.

    python bench/weight_sync.py [--big-mib 1024] [--publishes 10] [--swaps 12]

Starts its own nats-server in a temp dir and prints one table:

- tiny model, end to end: `publish_weights` (safetensors, chunked put, KV) until both of 2
  inference replicas (separate `python -m services.inference` processes following the run)
  report the new version in /v1/stats; median of --publishes publishes.
- the same bytes moved by nats-py's own `ObjectStore.put` + `get(writeinto=...)` (the raw
  limit) and by relayrl's `put_weight_bytes` + `read_weights`; each read by 2 reader
  processes at once (one connection each, as 2 replicas), digest checked.
- a synthetic --big-mib file: the same two ways. Not a model swap.
- the pause an in-flight request sees: per-token timestamps of one long greedy request on an
  in-process engine whose PolicyWatcher loads --swaps versions while it decodes (weights
  stored beforehand, only the KV put happens mid-request, so the trainer's own work does
  not share this process); the gap at the step where the version changed vs normal gaps.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import structlog  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.cli.nats_server import NatsServer, free_port, wait_for_port  # noqa: E402
from services.inference.engine import TorchEngine, load_engine  # noqa: E402
from services.inference.policy import PolicyWatcher  # noqa: E402
from services.inference.sampling import SamplingConfig  # noqa: E402
from shared import subjects  # noqa: E402
from shared.bus import Bus  # noqa: E402
from shared.config import ServiceSettings, new_secret  # noqa: E402
from shared.messages import PolicyVersion  # noqa: E402
from shared.models import ensure_tiny_model, load_causal_lm  # noqa: E402
from shared.weights import publish_weights, put_weight_bytes, read_weights, serialize_state_dict, sign_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN = "bench"
# The replicas this bench starts share the key its "trainer" signs with, and a token, as deployed ones do.
os.environ.setdefault("RELAYRL_WEIGHTS_KEY", new_secret())
os.environ.setdefault("RELAYRL_INFERENCE_TOKEN", new_secret())
AUTH = {"Authorization": f"Bearer {os.environ['RELAYRL_INFERENCE_TOKEN']}"}


# --- raw object store vs relayrl transport -------------------------------------------------


class Readers:
    """Reader processes, one connection each, as 2 replicas would be: reads run in parallel
    on separate cores instead of sharing one event loop. Each waits for a command on stdin."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.n = url, n
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> Readers:
        for _ in range(self.n):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--reader", self.url,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
            )  # fmt: skip
            self.procs.append(proc)
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            assert line.strip() == b"ready", line
        return self

    async def read(self, mode: str, name: str, size: int, sha: str, readers: int | None = None) -> float:
        """Wall time from asking the first `readers` (default: all) for `name` until all have it (verified)."""
        procs = self.procs[:readers]
        start = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{mode} {name} {size} {sha}\n".encode())
            await proc.stdin.drain()
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 600)
            assert line.startswith(b"done"), line
        return time.perf_counter() - start

    async def stop(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            await asyncio.wait_for(proc.wait(), 30)


async def reader_main(url: str) -> None:
    """`--reader URL`: read objects as the parent asks, one per stdin line."""
    bus = await Bus.connect(ServiceSettings(nats_url=url, request_timeout_s=30), "bench-reader")
    store = await bus.object_store(subjects.OBJ_WEIGHTS)
    print("ready", flush=True)
    while line := await asyncio.to_thread(sys.stdin.readline):
        mode, name, size, sha = line.split()
        if mode == "relayrl":
            run, version = name.split("/")
            pv = PolicyVersion(run_id=run, version=int(version), object=name, sha256=sha, size=int(size), step=0)
            data = await read_weights(bus, pv)  # checks size and sha256
            assert len(data) == int(size)
        else:
            out = io.BytesIO()
            await store.get(name, writeinto=out)  # nats-py checks the object's digest
            assert out.getbuffer().nbytes == int(size)
        del line
        print("done", flush=True)
    await bus.close()


async def raw_nats_py(bus: Bus, readers: Readers, data: bytes, name: str, single: bool = False) -> tuple[float, ...]:
    """nats-py ObjectStore.put, then every reader's get(writeinto=) at once (and, with
    `single`, one reader alone): (put, all readers[, one reader]) seconds."""
    store = await bus.object_store(subjects.OBJ_WEIGHTS)
    start = time.perf_counter()
    await store.put(name, io.BytesIO(data))
    put_s = time.perf_counter() - start
    times = [put_s, await readers.read("nats-py", name, len(data), "-")]
    if single:
        times.append(await readers.read("nats-py", name, len(data), "-", readers=1))
    await store.delete(name)
    return tuple(times)


async def relayrl_transport(bus: Bus, readers: Readers, data: bytes, run: str, single: bool = False) -> tuple[float, ...]:
    """put_weight_bytes, then every reader's read_weights (size + sha256 checked) at once
    (and, with `single`, one reader alone): (put, all readers[, one reader]) seconds."""
    start = time.perf_counter()
    stored = await put_weight_bytes(bus, run, 1, data)
    put_s = time.perf_counter() - start
    times = [put_s, await readers.read("relayrl", stored.name, stored.size, stored.sha256)]
    if single:
        times.append(await readers.read("relayrl", stored.name, stored.size, stored.sha256, readers=1))
    await (await bus.object_store(subjects.OBJ_WEIGHTS)).delete(stored.name)
    return tuple(times)


def median_of(runs: list[tuple[float, ...]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


# --- end to end: publish -> 2 replica processes serving ---------------------------------------


def start_replicas(n: int, model: Path, nats_url: str, logs: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, urls = [], []
    for i in range(n):
        port = free_port()
        log = open(logs / f"inference-{i + 1}.log", "wb")
        cmd = [sys.executable, "-m", "services.inference", "--port", str(port), "--model", str(model),
               "--device", "cpu", "--dtype", "float32", "--run-id", RUN, "--nats-url", nats_url]  # fmt: skip
        env = {**os.environ, "RELAYRL_LOG_FORMAT": "console", "NATS_URL": nats_url}
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")
    for proc, url in zip(procs, urls):
        wait_for_port("127.0.0.1", int(url.rsplit(":", 1)[1]), 120, proc)
        wait_ready(url)
    return procs, urls


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} never became ready")


async def end_to_end(settings: ServiceSettings, model: Path, urls: list[str], publishes: int) -> dict[str, list[float]]:
    """Publish `publishes` versions; per publish: publish_weights time and time until all replicas serve it."""
    bus = await Bus.connect(settings, "bench-trainer")
    policy = load_causal_lm(model)
    out: dict[str, list[float]] = {"publish": [], "all_serving": [], "first_serving": []}
    try:
        async with httpx.AsyncClient(timeout=10, headers=AUTH) as http:
            for version in range(1, publishes + 1):
                with torch.no_grad():
                    for p in policy.parameters():
                        p.add_(torch.randn_like(p) * 1e-3)  # a trainer step's worth of change
                start = time.perf_counter()
                await publish_weights(bus, RUN, version, version, policy.state_dict(), keep=2,
                                      signing_key=os.environ["RELAYRL_WEIGHTS_KEY"])
                out["publish"].append(time.perf_counter() - start)
                seen = await asyncio.gather(*(serving_at(http, url, version, start) for url in urls))
                out["all_serving"].append(max(seen))
                out["first_serving"].append(min(seen))
    finally:
        await bus.close()
    return out


async def serving_at(http: httpx.AsyncClient, url: str, version: int, start: float, poll_s: float = 0.002) -> float:
    deadline = start + 60
    while time.perf_counter() < deadline:
        stats = (await http.get(f"{url}/v1/stats")).json()
        if stats["policy_version"] == version:
            return time.perf_counter() - start
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"{url} did not serve version {version} within 60 s")


# --- the pause of an in-flight request -------------------------------------------------------


async def pause(settings: ServiceSettings, model: Path, swaps: int) -> dict[str, float]:
    engine, _ = load_engine(str(model), model_dir=model.parent, device="cpu", dtype="float32")
    stamps: list[float] = []
    accept = engine._accept
    loop = asyncio.get_running_loop()
    reached: dict[int, asyncio.Event] = {}

    def timed(*args: Any) -> None:  # one timestamp per decode step of the (single) running row
        accept(*args)
        stamps.append(time.perf_counter())
        if (event := reached.get(len(stamps))) is not None:
            loop.call_soon_threadsafe(event.set)  # no polling: it would contend for the GIL

    engine._accept = timed  # type: ignore[method-assign]
    copies: list[float] = []
    apply_swap = engine._apply_swap

    def timed_swap() -> None:  # the part of a swap the decode loop itself waits for
        pending = bool(engine._pending_swaps)  # one pending swap per run's weight set
        start = time.perf_counter()
        apply_swap()
        if pending:
            copies.append(time.perf_counter() - start)

    engine._apply_swap = timed_swap  # type: ignore[method-assign]
    watcher = PolicyWatcher(settings, RUN + "-pause")
    await watcher.connect()

    async def ready() -> TorchEngine:
        return engine

    watcher.start(ready)
    await watcher.wait_synced(30)
    bus = await Bus.connect(settings, "bench-pause")
    try:
        versions = await store_versions(bus, model, swaps)
        kv = await bus.kv(subjects.KV_POLICY)
        per_request = 4
        swap_gaps: list[float] = []
        normal: list[float] = []
        load_window_max: list[float] = []
        for first in range(0, swaps, per_request):
            batch = versions[first : first + per_request]
            stamps.clear()
            reached.clear()
            reached.update((150 + k * 200, asyncio.Event()) for k in range(len(batch)))
            job = asyncio.create_task(engine.generate([5, 17, 42, 99, 7], SamplingConfig(max_tokens=1000, temperature=0, ignore_eos=True)))
            windows = []
            for k, pv in enumerate(batch):
                await reached[150 + k * 200].wait()  # swap points spread through the request
                put_at = time.perf_counter()
                await kv.put(subjects.policy_key(pv.run_id), pv.encode())
                deadline = time.perf_counter() + 30
                while engine.version != pv.version:
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"version {pv.version} never swapped in: {watcher.last_error}")
                    await asyncio.sleep(0.005)
                windows.append((put_at, time.perf_counter()))
            gen = await job
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            # gaps[i] ends at token i+1; the first token of a new version ends the swap's gap
            changes = {i for i in range(1, len(gen.versions)) if gen.versions[i] != gen.versions[i - 1]}
            swap_gaps += [gaps[i - 1] for i in changes]
            in_window = set()
            for lo, hi in windows:
                idx = [i for i, (a, b) in enumerate(zip(stamps, stamps[1:])) if b >= lo and a <= hi]
                in_window.update(idx)
                load_window_max.append(max((gaps[i] for i in idx), default=0.0))
            normal += [g for i, g in enumerate(gaps) if i not in in_window and (i + 1) not in changes]
        normal.sort()
        return {
            "normal_p50": statistics.median(normal),
            "normal_p99": normal[int(0.99 * (len(normal) - 1))],
            "swap_gap_max": max(swap_gaps),
            "swap_gap_median": statistics.median(swap_gaps),
            "load_window_max": max(load_window_max),
            "swaps": float(len(swap_gaps)),
            "copy_max": max(copies),
            "tokens": float(len(normal)),
        }
    finally:
        await watcher.close()
        await bus.close()
        engine.stop()


async def store_versions(bus: Bus, model: Path, n: int) -> list[PolicyVersion]:
    """n perturbed versions of the model put into the object store (no KV put yet)."""
    policy = load_causal_lm(model)
    out = []
    for version in range(1, n + 1):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        stored = await put_weight_bytes(bus, RUN + "-pause", version, serialize_state_dict(policy.state_dict()))
        out.append(PolicyVersion(run_id=RUN + "-pause", version=version, object=stored.name, sha256=stored.sha256,
                                 size=stored.size, step=version,
                                 signature=sign_weights(os.environ["RELAYRL_WEIGHTS_KEY"], RUN + "-pause", version,
                                                        stored.sha256)))  # fmt: skip
    return out


# --- main -------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def main() -> None:
    # Only warnings, on stderr: the table is the output (and readers answer on stdout).
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    if len(sys.argv) == 3 and sys.argv[1] == "--reader":
        asyncio.run(reader_main(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the synthetic weight file")
    parser.add_argument("--publishes", type=int, default=10, help="tiny-model publishes timed end to end")
    parser.add_argument("--swaps", type=int, default=12, help="swaps during in-flight requests (pause)")
    parser.add_argument("--repeat", type=int, default=5, help="repeats of the tiny raw/transport measurements")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = NatsServer(store_dir=root / "nats").start(log_file=root / "nats.log")
        settings = ServiceSettings(nats_url=server.url, log_format="console", log_level="warning", request_timeout_s=30)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            rows = asyncio.run(measure(settings, root, args, procs))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            server.stop()
    table = Table(title=f"relayrl weight sync, {os.cpu_count()} cores, nats-server on loopback")
    for col in ("payload", "measurement", "time (ms)", "ratio"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console(width=150).print(table)


async def measure(settings: ServiceSettings, root: Path, args: argparse.Namespace, procs: list[Any]) -> list[tuple[str, ...]]:
    setup = await Bus.connect(settings, "bench-setup")
    await setup.ensure_topology()
    await setup.close()
    model = ensure_tiny_model(root / "models" / "tiny")
    tiny_bytes = serialize_state_dict(load_causal_lm(model).state_dict())
    label = f"tiny ({len(tiny_bytes) / 2**20:.2f} MiB)"

    bus = await Bus.connect(settings, "bench-writer")
    readers = await Readers(settings.nats_url, 2).start()
    raw = median_of([await raw_nats_py(bus, readers, tiny_bytes, f"raw-tiny-{i}") for i in range(args.repeat)])
    ours = median_of([await relayrl_transport(bus, readers, tiny_bytes, f"tiny-{i}") for i in range(args.repeat)])
    started, urls = start_replicas(2, model, settings.nats_url, root)
    procs.extend(started)
    e2e = await end_to_end(settings, model, urls, args.publishes)
    for proc in started:
        proc.terminate()
    raw_total = sum(raw)
    rows: list[tuple[str, ...]] = [
        (label, "raw nats-py put + get(writeinto) x 2 readers", ms(raw_total), "1.00"),
        (label, "relayrl put_weight_bytes + read_weights x 2 readers", ms(sum(ours)), f"{sum(ours) / raw_total:.2f}"),
        (label, "publish_weights call (serialize, put, KV, prune), median", ms(statistics.median(e2e["publish"])), ""),
        (label, f"publish -> both replicas serving, median of {args.publishes}", ms(statistics.median(e2e["all_serving"])),
         f"{statistics.median(e2e['all_serving']) / raw_total:.2f}"),
        (label, "publish -> both replicas serving, max", ms(max(e2e["all_serving"])), f"{max(e2e['all_serving']) / raw_total:.2f}"),
    ]  # fmt: skip

    big = os.urandom(args.big_mib << 20)
    big_label = f"synthetic {args.big_mib} MiB"
    raw_put, raw_read, raw_one = await raw_nats_py(bus, readers, big, "raw-big", single=True)
    our_put, our_read, our_one = await relayrl_transport(bus, readers, big, "big", single=True)
    del big
    await readers.stop()
    await bus.close()
    rows += [
        (big_label, "raw nats-py put", ms(raw_put), "1.00"),
        (big_label, "raw nats-py get(writeinto) + digest, 2 readers at once", ms(raw_read), "1.00"),
        (big_label, "raw total", ms(raw_put + raw_read), "1.00"),
        (big_label, "raw nats-py get(writeinto) + digest, 1 reader", ms(raw_one), "1.00"),
        (big_label, "relayrl put_weight_bytes", ms(our_put), f"{our_put / raw_put:.2f}"),
        (big_label, "relayrl read_weights + sha256, 2 readers at once", ms(our_read), f"{our_read / raw_read:.2f}"),
        (big_label, "relayrl total", ms(our_put + our_read), f"{(our_put + our_read) / (raw_put + raw_read):.2f}"),
        (big_label, "relayrl read_weights + sha256, 1 reader", ms(our_one), f"{our_one / raw_one:.2f}"),
    ]

    p = await pause(settings, model, args.swaps)
    rows += [
        ("tiny, in flight", "gap between tokens, normal p50", ms(p["normal_p50"]), "1.00"),
        ("tiny, in flight", "gap between tokens, normal p99", ms(p["normal_p99"]), f"{p['normal_p99'] / p['normal_p50']:.2f}"),
        ("tiny, in flight", f"gap at the swap step, median of {int(p['swaps'])}", ms(p["swap_gap_median"]),
         f"{p['swap_gap_median'] / p['normal_p50']:.2f}"),
        ("tiny, in flight", "gap at the swap step, max (the pause)", ms(p["swap_gap_max"]), f"{p['swap_gap_max'] / p['normal_p50']:.2f}"),
        ("tiny, in flight", "max gap while a version loads (KV put -> swapped)", ms(p["load_window_max"]),
         f"{p['load_window_max'] / p['normal_p50']:.2f}"),
        ("tiny, in flight", "weight copy inside the decode loop, max", ms(p["copy_max"]),
         f"{p['copy_max'] / p['normal_p50']:.2f}"),
    ]  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
