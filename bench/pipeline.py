"""End-to-end pipeline throughput next to the raw limits measured in the same run.

    python bench/pipeline.py [--n 20000] [--rollout-replicas 1]

Prints one table: raw JetStream publish+fetch rate, raw SQL batched-insert rate, and the
pipeline rate (null-agent trajectories/s from HTTP submission to rows in SQL) for 1 KB and
20 KB trajectories, each with its ratio to the raw JetStream rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table as SqlTable, insert  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from services.cli.client import GatewayClient  # noqa: E402
from services.cli.nats_server import NatsServer  # noqa: E402
from services.cli.stack import Stack, StackConfig  # noqa: E402


async def raw_jetstream(url: str, n: int, size: int) -> float:
    """Publish n messages (acked, 256 in flight) then fetch+ack them all: messages/s."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = f"RAW{size}"
    await js.add_stream(name=stream, subjects=[f"raw.{size}"])
    payload = os.urandom(size)
    sem = asyncio.Semaphore(256)

    async def pub(i: int) -> None:
        async with sem:
            await js.publish(f"raw.{size}", payload, timeout=10, headers={"Nats-Msg-Id": str(i)})

    start = time.perf_counter()
    await asyncio.gather(*(pub(i) for i in range(n)))
    sub = await js.pull_subscribe(f"raw.{size}", durable="raw", stream=stream)
    got = 0
    while got < n:
        msgs = await sub.fetch(256, timeout=5)
        for m in msgs:
            await m.ack()
        got += len(msgs)
    elapsed = time.perf_counter() - start
    await js.delete_stream(stream)
    await nc.close()
    return n / elapsed


async def raw_sql(path: Path, n: int, size: int, batch: int = 256) -> float:
    """Batched INSERTs of n rows carrying a `size`-byte blob into SQLite: rows/s."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    meta = MetaData()
    table = SqlTable("raw", meta, Column("id", String, primary_key=True), Column("n", Integer), Column("data", LargeBinary))
    async with engine.begin() as conn:
        await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        await conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
        await conn.run_sync(meta.create_all)
    blob = os.urandom(size)
    start = time.perf_counter()
    for i in range(0, n, batch):
        async with engine.begin() as conn:
            await conn.execute(insert(table), [{"id": f"r{j}", "n": j, "data": blob} for j in range(i, min(i + batch, n))])
    elapsed = time.perf_counter() - start
    await engine.dispose()
    return n / elapsed


def pipeline(state_dir: Path, n: int, size: int, replicas: int) -> float:
    """null-agent trajectories/s: from the first HTTP submission until all n rows are in SQL."""
    stack = Stack(
        StackConfig(state_dir=state_dir, gateway_port=0, inference_replicas=0, rollout_replicas=replicas,
                    rollout_concurrency=256)
    ).start()
    try:
        client = GatewayClient(stack.gateway_url, timeout_s=120, api_key=stack.api_key)
        tasks = [{"agent": "null", "input": {"size_bytes": size}, "group_size": 8} for _ in range(n // 8)]
        db = stack.state_dir / "relayrl.db"
        start = time.perf_counter()
        client.submit(tasks, chunk=500)
        total = (n // 8) * 8
        while _count(db) < total:
            if time.perf_counter() - start > 600:
                raise TimeoutError(f"only {_count(db)} of {total} stored after 600 s")
            time.sleep(0.02)
        return total / (time.perf_counter() - start)
    finally:
        stack.stop()


def _count(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM rollouts").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="trajectories per pipeline measurement")
    parser.add_argument("--raw-n", type=int, default=20000, help="messages/rows per raw measurement")
    parser.add_argument("--rollout-replicas", type=int, default=1)
    args = parser.parse_args()
    console = Console()
    table = Table(title=f"relayrl pipeline, {os.cpu_count()} cores, SQLite")
    for col in ("measurement", "payload", "rate (/s)", "vs raw JetStream"):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = NatsServer(store_dir=root / "raw-nats").start()
        try:
            raw_js = {size: asyncio.run(raw_jetstream(server.url, args.raw_n, size)) for size in (1024, 20480)}
        finally:
            server.stop()
        raw_db = {size: asyncio.run(raw_sql(root / f"raw{size}.db", args.raw_n, size)) for size in (1024, 20480)}
        for size, label in ((1024, "1 KB"), (20480, "20 KB")):
            rate = pipeline(root / f"stack{size}", args.n, size, args.rollout_replicas)
            table.add_row("raw JetStream publish+fetch", label, f"{raw_js[size]:,.0f}", "1.00")
            table.add_row("raw SQL batched insert", label, f"{raw_db[size]:,.0f}", f"{raw_db[size] / raw_js[size]:.2f}")
            table.add_row(f"pipeline HTTP -> SQL ({args.rollout_replicas} rollout)", label, f"{rate:,.0f}",
                          f"{rate / raw_js[size]:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
