"""Soak: one training run that keeps going for `--minutes`; does anything grow without bound?

    python bench/soak.py                                  # 30 minutes, a sample every 60 s
    python bench/soak.py --minutes 3 --sample-s 20 --json /tmp/soak.json   # a quick check

The embedded stack (`Stack`, the code of `relayrl up`: nats-server and every service its own
process, SQLite) in a temp state dir, and one `echo-digit` run (the demo's task and settings:
group size 32, 10 groups per step, `max_staleness: 1`) with enough rows x epochs that it
cannot end before the time is up. Every `--sample-s` seconds from the run's creation it records:
- the RSS of every process (nats-server, gateway, rollout, store, trainer, inference; with
  their children, if any) and its pid, so a restart is seen;
- the run's step and groups consumed (gateway), the rollouts and other rows stored (SQL,
  read-only);
- the state of every JetStream stream (bytes, messages, consumers), the five relayrl streams
  and the KV / object-store streams alike, listed through the JetStream API;
- bytes on disk of the nats-server store dir, of the SQLite file (+ -wal, -shm), of the
  trainer's checkpoints and of the logs.

Then it prints, as markdown tables: (1) RSS (MiB) per process per sample; (2) streams, disk
and rows at start / middle / end, with the SQL bytes per rollout (the slope from middle to
end). Then a verdict per process (RSS at the end of the last third against the end of the
first third, within 10 % or not), rollout throughput in the first and last thirds, the
largest total of stream bytes seen, supervisor restarts, and the warnings and errors of the
service logs. `--json PATH` also writes every raw sample. The stack is stopped at the end,
on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats  # noqa: E402
import psutil  # noqa: E402

from bench.chaos import ChaosConfig, Watch, _render, notable, run_config  # noqa: E402
from services.cli.client import GatewayClient  # noqa: E402
from services.cli.stack import NATS, Stack, StackConfig  # noqa: E402
from shared import subjects  # noqa: E402

MIB = 1024 * 1024
# An upper bound on groups per second on any machine this runs on (the chaos baseline does
# ~14/s at group size 16 on 2 cores): rows x epochs is sized from it so the run cannot end.
MAX_GROUPS_PER_S = 40.0
RELAYRL_STREAMS = tuple(subjects.STREAM_SUBJECTS)  # TASKS, TRAJECTORIES, GROUPS, METRICS, DLQ
SQL_TABLES = ("rollouts", "transitions", "tasks", "groups", "metrics", "dead_letters", "events", "rewards")
WITHIN = 10.0  # percent: the RSS verdict


@dataclass
class SoakConfig:
    minutes: float = 30.0
    sample_s: float = 60.0
    rows: int = 1000
    epochs: int | None = None  # None: enough for `minutes` at MAX_GROUPS_PER_S
    group_size: int = 32
    batch_size: int = 10
    max_staleness: int = 1
    seed: int = 0
    rollout_replicas: int = 1
    nats_prof_port: int = 0  # with a port: nats-server heap profiles at each third, saved and summarised
    nats_memory_limit_mb: int | None = StackConfig.nats_memory_limit_mb  # 0/None: Go's default, no limit

    @property
    def run_epochs(self) -> int:
        if self.epochs is not None:
            return self.epochs
        return min(10000, max(2, math.ceil(self.minutes * 60 * MAX_GROUPS_PER_S / self.rows) + 1))


@dataclass
class Sample:
    t_s: float  # since the run was created
    at: float  # wall clock
    rss: dict[str, int] = field(default_factory=dict)  # process (with its children) -> bytes
    rss_own: dict[str, int] = field(default_factory=dict)  # the process alone
    pids: dict[str, int | None] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    run: dict[str, Any] | None = None  # state, step, version, groups_consumed
    streams: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> bytes, messages, consumers
    consumers: dict[str, dict[str, int]] = field(default_factory=dict)  # stream/durable -> pending, ack_pending
    disk: dict[str, int] = field(default_factory=dict)  # nats, sqlite, sqlite_db, sqlite_wal, ... -> bytes
    sql: dict[str, int] = field(default_factory=dict)  # table -> rows
    errors: list[str] = field(default_factory=list)  # what could not be read this time

    @property
    def stream_bytes(self) -> int:
        return sum(s["bytes"] for s in self.streams.values())


def label(name: str) -> str:
    return "nats-server" if name == NATS else name


# --- sampling ----------------------------------------------------------------------------


def sample_rss(stack: Stack, s: Sample) -> None:
    for proc in stack.processes():
        name = label(proc.name)
        s.pids[name] = proc.pid
        s.restarts[name] = proc.sup.restarts
        if proc.pid is None or not proc.alive:
            s.errors.append(f"{name}: not running")
            continue
        try:
            p = psutil.Process(proc.pid)
            own = p.memory_info().rss
            kids = 0
            for child in p.children(recursive=True):
                try:
                    kids += child.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error as exc:
            s.errors.append(f"{name}: {exc!r}")
            continue
        s.rss_own[name] = own
        s.rss[name] = own + kids


async def _jetstream_state(url: str) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)
    try:
        jsm = nc.jsm()
        streams: dict[str, dict[str, int]] = {}
        consumers: dict[str, dict[str, int]] = {}
        for info in await jsm.streams_info():
            name = info.config.name
            st = info.state
            streams[name] = {"bytes": st.bytes, "messages": st.messages, "consumers": st.consumer_count}
            if st.consumer_count:
                for c in await jsm.consumers_info(name):
                    consumers[f"{name}/{c.name}"] = {"pending": c.num_pending or 0, "ack_pending": c.num_ack_pending or 0}
        return streams, consumers
    finally:
        await nc.close()


def sample_streams(stack: Stack, s: Sample) -> None:
    try:
        s.streams, s.consumers = asyncio.run(asyncio.wait_for(_jetstream_state(stack.admin_url), 20))
    except Exception as exc:  # noqa: BLE001 - a busy or restarting server: recorded, not fatal
        s.errors.append(f"jetstream: {exc!r}")


def nats_heap(port: int, state_dir: Path, t_s: float, log: Any) -> dict[str, Any]:
    """Save nats-server's heap profile (Go pprof, debug=1) and summarise it: the Go runtime's
    own memory figures and the allocation sites holding the most live bytes."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/pprof/heap?debug=1", timeout=20) as r:
            text = r.read().decode()
    except OSError as exc:
        log(f"  nats heap profile failed: {exc!r}")
        return {"t_s": t_s, "error": repr(exc)}
    (state_dir / f"nats-heap-{t_s / 60:.0f}min.txt").write_text(text)
    stats = {k: int(v) for k, v in re.findall(r"^# (HeapInuse|HeapIdle|HeapReleased|HeapSys|Sys|HeapAlloc) = (\d+)", text, re.M)}
    sites = []
    for record in text.split("\n\n"):
        head = re.match(r"\s*(\d+): (\d+) \[", record)
        if not head or int(head.group(2)) == 0:
            continue
        frames = re.findall(r"^#\s+0x[0-9a-f]+\s+(\S+)", record, re.M)
        where = next((f.rsplit("/", 1)[-1] for f in frames if "nats-server" in f), frames[0] if frames else "?")
        sites.append({"bytes": int(head.group(2)), "objects": int(head.group(1)), "site": where,
                      "stack": [f.rsplit("/", 1)[-1] for f in frames[:6]]})  # fmt: skip
    sites.sort(key=lambda x: -x["bytes"])
    summary = {"t_s": t_s, "runtime": stats, "top": sites[:8]}
    top = ", ".join(f"{x['site']} {x['bytes'] / MIB:.1f} MiB ({x['objects']})" for x in sites[:4])
    log(f"  nats-server heap at {t_s / 60:.1f} min: in use {stats.get('HeapInuse', 0) / MIB:.0f} MiB, idle "
        f"{stats.get('HeapIdle', 0) / MIB:.0f} MiB ({stats.get('HeapReleased', 0) / MIB:.0f} released); top: {top}")
    return summary


def dir_bytes(path: Path) -> int:
    """Bytes on disk (allocated blocks) under `path`; files that vanish meanwhile are skipped."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def sample_disk(stack: Stack, db: Path, s: Sample) -> None:
    s.disk["nats"] = dir_bytes(stack.state_dir / "nats")
    s.disk["checkpoints"] = dir_bytes(stack.state_dir / "checkpoints")
    s.disk["logs"] = dir_bytes(stack.logs)
    s.disk["sqlite_db"] = file_bytes(db)
    s.disk["sqlite_wal"] = file_bytes(db.with_name(db.name + "-wal"))
    s.disk["sqlite_shm"] = file_bytes(db.with_name(db.name + "-shm"))
    s.disk["sqlite"] = s.disk["sqlite_db"] + s.disk["sqlite_wal"]


def sample_sql(db: Path, s: Sample) -> None:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        s.errors.append(f"sql: {exc!r}")
        return
    try:
        for table in SQL_TABLES:
            try:
                s.sql[table] = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
            except sqlite3.Error as exc:
                s.errors.append(f"sql {table}: {exc!r}")
    finally:
        conn.close()


def sample_run(watch: Watch, s: Sample) -> None:
    view = watch.poll()
    if view is None:
        s.errors.append("gateway: run view not available")
        return
    s.run = {k: view.get(k) for k in ("state", "step", "version", "groups_consumed", "reward_mean", "error")}


def take_sample(stack: Stack, watch: Watch, db: Path, t0: float) -> Sample:
    s = Sample(t_s=time.monotonic() - t0, at=time.time())
    sample_rss(stack, s)  # first: the rest adds load of its own
    sample_run(watch, s)
    sample_streams(stack, s)
    sample_disk(stack, db, s)
    sample_sql(db, s)
    return s


# --- the soak ----------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGTERM, handled like Ctrl-C: stop sampling, stop the stack, report what was measured."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted()


@dataclass
class SoakResult:
    config: SoakConfig
    run_id: str
    state_dir: Path
    samples: list[Sample] = field(default_factory=list)
    interrupted: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)  # the supervisor's exits and restarts
    logs: dict[str, list[str]] = field(default_factory=dict)  # process -> notable log lines
    heaps: list[dict[str, Any]] = field(default_factory=list)  # nats-server heap summaries (--nats-prof-port)


def soak(state_dir: Path, cfg: SoakConfig, log: Any = print) -> SoakResult:
    run_id = f"soak-{cfg.seed}"
    result = SoakResult(cfg, run_id, state_dir)
    stack = Stack(StackConfig(state_dir=state_dir, gateway_port=0, log_format="json",
                              rollout_replicas=cfg.rollout_replicas, nats_prof_port=cfg.nats_prof_port,
                              nats_memory_limit_mb=cfg.nats_memory_limit_mb or None))  # fmt: skip
    db = stack.state_dir / "relayrl.db"
    watch: Watch | None = None
    try:
        log(f"starting the stack in {stack.state_dir} ...")
        started = time.monotonic()
        stack.start()
        log(f"stack up in {time.monotonic() - started:.0f}s: {', '.join(label(p.name) for p in stack.processes())}")
        config = run_config(
            ChaosConfig(rows=cfg.rows, epochs=cfg.run_epochs, group_size=cfg.group_size, batch_size=cfg.batch_size,
                        max_staleness=cfg.max_staleness, seed=cfg.seed),
            run_id,
        )  # fmt: skip
        GatewayClient(stack.gateway_url, api_key=stack.api_key).create_run(config)
        t0 = time.monotonic()
        watch = Watch(stack.gateway_url, run_id, stack.api_key)
        log(f"run {run_id}: {cfg.rows} rows x {cfg.run_epochs} epochs, group size {cfg.group_size}, "
            f"{cfg.batch_size} groups per step; sampling every {cfg.sample_s:g}s for {cfg.minutes:g} min")  # fmt: skip
        total_s = cfg.minutes * 60.0
        k = 0
        while True:
            due = min(k * cfg.sample_s, total_s)
            time.sleep(max(0.0, t0 + due - time.monotonic()))
            s = take_sample(stack, watch, db, t0)
            result.samples.append(s)
            run = s.run or {}
            rss = " ".join(f"{n}={v / MIB:.0f}" for n, v in s.rss.items())
            log(f"[{s.t_s / 60:5.1f} min] step {run.get('step', '?')} ({run.get('state', '?')}), "
                f"{s.sql.get('rollouts', '?')} rollouts, streams {s.stream_bytes / MIB:.2f} MiB, "
                f"sqlite {s.disk['sqlite'] / MIB:.1f} MiB; RSS MiB {rss}"
                + (f"; ! {'; '.join(s.errors)}" if s.errors else ""))  # fmt: skip
            if cfg.nats_prof_port and due >= total_s * (len(result.heaps) + 1) / 3:  # at each third
                result.heaps.append(nats_heap(cfg.nats_prof_port, state_dir, s.t_s, log))
            if run.get("state") in ("finished", "cancelled", "failed"):
                log(f"! the run ended ({run.get('state')}: {run.get('error')}) before the soak did; sampling on")
            if due >= total_s:
                break
            k += 1
    except (KeyboardInterrupt, Interrupted):
        result.interrupted = True
        log("\ninterrupted: stopping the stack and reporting what was measured")
    finally:
        # Stopping must not be cut short by a second Ctrl-C: it has its own timeouts.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if watch is not None:
                watch.close()
            log("stopping the stack ...")
            stack.stop()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    result.events = list(stack.events)
    for proc in stack.processes():
        try:
            lines = proc.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        result.logs[label(proc.name)] = notable(lines)
    return result


# --- the report --------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    if n < MIB:
        return f"{n / 1024:.1f} KiB"
    return f"{n / MIB:.2f} MiB"


def pick(samples: list[Sample], t_s: float) -> Sample:
    """The sample nearest to `t_s`."""
    return min(samples, key=lambda s: abs(s.t_s - t_s))


def marks(samples: list[Sample]) -> dict[str, Sample]:
    """start, the end of the first third, middle, end (of the samples taken)."""
    end = samples[-1]
    return {"start": samples[0], "third": pick(samples, end.t_s / 3), "middle": pick(samples, end.t_s / 2), "end": end}


def process_names(samples: list[Sample]) -> list[str]:
    order = ["nats-server", "gateway", "rollout", "store", "trainer", "inference"]
    names = {n for s in samples for n in s.pids}
    return sorted(names, key=lambda n: (next((i for i, p in enumerate(order) if n.startswith(p)), 99), n))


def rss_table(samples: list[Sample]) -> str:
    names = process_names(samples)
    rows = [("min", "step", *names, "total")]
    for s in samples:
        run = s.run or {}
        rows.append((f"{s.t_s / 60:.1f}", str(run.get("step", "-")), *(mib(s.rss.get(n)) for n in names),
                     mib(sum(s.rss.values()))))  # fmt: skip
    return _render(rows)


def stream_names(samples: list[Sample]) -> list[str]:
    seen = {n for s in samples for n in s.streams}
    return [n for n in RELAYRL_STREAMS if n in seen] + sorted(seen - set(RELAYRL_STREAMS))


def state_table(samples: list[Sample]) -> str:
    m = marks(samples)
    cols = [m["start"], m["middle"], m["end"]]
    rows: list[tuple[str, ...]] = [("", *(f"{k} ({s.t_s / 60:.1f} min)" for k, s in zip(("start", "middle", "end"), cols)))]
    rows.append(("step", *(str((s.run or {}).get("step", "-")) for s in cols)))
    for name in stream_names(samples):
        cells = []
        for s in cols:
            st = s.streams.get(name)
            cells.append("-" if st is None else f"{size(st['bytes'])} / {st['messages']:,} msgs")
        rows.append((f"stream {name}", *cells))
    rows.append(("all streams", *(size(s.stream_bytes) if s.streams else "-" for s in cols)))
    rows.append(("JetStream consumers (all streams)",
                 *(str(sum(st["consumers"] for st in s.streams.values())) if s.streams else "-" for s in cols)))  # fmt: skip
    rows.append(("nats-server store dir (on disk)", *(size(s.disk.get("nats")) for s in cols)))
    rows.append(("SQLite db + wal", *(f"{size(s.disk.get('sqlite'))} ({size(s.disk.get('sqlite_wal'))} wal)" for s in cols)))
    rows.append(("trainer checkpoints (on disk)", *(size(s.disk.get("checkpoints")) for s in cols)))
    rows.append(("service logs (on disk)", *(size(s.disk.get("logs")) for s in cols)))
    for table in ("rollouts", "tasks", "groups", "metrics", "dead_letters"):
        rows.append((f"SQL {table} rows", *(f"{s.sql[table]:,}" if table in s.sql else "-" for s in cols)))
    return _render(rows)


def slope(a: Sample, b: Sample, key: str = "sqlite") -> float | None:
    dr = b.sql.get("rollouts", 0) - a.sql.get("rollouts", 0)
    return (b.disk.get(key, 0) - a.disk.get(key, 0)) / dr if dr > 0 else None


def verdicts(result: SoakResult) -> tuple[list[str], dict[str, Any]]:
    samples = result.samples
    m = marks(samples)
    first, last, mid = m["third"], m["end"], m["middle"]
    lines: list[str] = []
    raw: dict[str, Any] = {"rss": {}}
    lines.append(f"RSS, end of the first third ({first.t_s / 60:.1f} min) -> end ({last.t_s / 60:.1f} min), "
                 f"within {WITHIN:.0f} %:")  # fmt: skip
    for name in process_names(samples):
        a, b = first.rss.get(name), last.rss.get(name)
        if a is None or b is None:
            lines.append(f"  {name}: not measured at both points")
            continue
        pct = 100.0 * (b - a) / a
        restarted = first.pids.get(name) != last.pids.get(name)
        ok = abs(pct) <= WITHIN
        verdict = "n/a (restarted in between)" if restarted else ("yes" if ok else ("NO: grew" if pct > 0 else "no: shrank"))
        lines.append(f"  {name}: {mib(a)} -> {mib(b)} MiB ({pct:+.1f} %) within {WITHIN:.0f} %: {verdict}")
        raw["rss"][name] = {"first_third": a, "end": b, "pct": pct, "within": ok, "restarted": restarted}
    sql_slope = slope(mid, last)
    db_slope = slope(mid, last, "sqlite_db")
    per_all = last.disk.get("sqlite", 0) / last.sql["rollouts"] if last.sql.get("rollouts") else None
    lines.append(f"SQL bytes per rollout, middle -> end: {sql_slope:,.0f} (db file alone {db_slope:,.0f}); whole run "
                 f"{per_all:,.0f}" if sql_slope is not None and db_slope is not None and per_all is not None
                 else "SQL bytes per rollout: no rollouts stored between middle and end")  # fmt: skip
    raw["sql_bytes_per_rollout"] = {"middle_to_end": sql_slope, "db_only_middle_to_end": db_slope, "whole_run": per_all}

    def rate(a: Sample, b: Sample) -> float | None:
        dt = b.t_s - a.t_s
        return (b.sql.get("rollouts", 0) - a.sql.get("rollouts", 0)) / dt if dt > 0 else None

    r1, r3 = rate(m["start"], first), rate(pick(samples, 2 * last.t_s / 3), last)
    if r1 is not None and r3 is not None:
        lines.append(f"rollouts stored per second: first third {r1:.1f}, last third {r3:.1f}")
    raw["rollouts_per_s"] = {"first_third": r1, "last_third": r3}
    with_streams = [s for s in samples if s.streams]
    if with_streams:
        top = max(with_streams, key=lambda s: s.stream_bytes)
        biggest = max(top.streams.items(), key=lambda kv: kv[1]["bytes"])
        lines.append(f"max total stream bytes seen: {size(top.stream_bytes)} at {top.t_s / 60:.1f} min "
                     f"(largest: {biggest[0]} {size(biggest[1]['bytes'])}, {biggest[1]['messages']:,} msgs)")  # fmt: skip
        raw["max_stream_bytes"] = {"bytes": top.stream_bytes, "t_s": top.t_s, "streams": top.streams}
    # The relayrl streams' durables only: KV watchers and weight readers are ephemeral.
    backlog = {k: v for k, v in last.consumers.items()
               if k.split("/")[0] in RELAYRL_STREAMS and (v["pending"] or v["ack_pending"])}  # fmt: skip
    if backlog:
        lines.append("durable backlog at the end: " + ", ".join(
            f"{k} {v['pending']:,} pending / {v['ack_pending']:,} unacked" for k, v in sorted(backlog.items())))  # fmt: skip
    end_run = last.run or {}
    lines.append(f"run at the end: {end_run.get('state', '?')}, step {end_run.get('step', '?')}, "
                 f"{end_run.get('groups_consumed', '?')} groups consumed, reward mean {end_run.get('reward_mean')}")  # fmt: skip
    restarts = {n: c for n, c in last.restarts.items() if c}
    lines.append("supervisor restarts: " + (", ".join(f"{n} {c}" for n, c in restarts.items()) if restarts else "none"))
    errs = Counter(e.split(":")[0] for s in samples for e in s.errors)
    if errs:
        lines.append("samples with something unreadable: " + ", ".join(f"{k} x{v}" for k, v in errs.items()))
    return lines, raw


def log_report(result: SoakResult, per_process: int = 6) -> list[str]:
    """Warnings and errors of each service log, the same kinds grouped (timestamps dropped)."""
    out = []
    for name, hits in result.logs.items():
        if not hits:
            continue
        kinds = Counter(_kind(h) for h in hits)
        out.append(f"  {name}: {len(hits)} warning/error lines")
        out += [f"    {n}x {k}" for k, n in kinds.most_common(per_process)]
    return out or ["  none"]


def _kind(line: str) -> str:
    """A log hit without its timestamp and ids, so repeats of one problem count together."""
    head, _, rest = line.partition(" ")
    text = rest if rest.startswith("{") else line
    try:
        event = json.loads(text.split(" -> ")[0])
        exc = text.split(" -> ", 1)[1] if " -> " in text else ""
        keep = {k: v for k, v in event.items() if k in ("level", "event", "logger", "error", "reason", "stream")}
        return (json.dumps(keep) + (f" -> {exc}" if exc else ""))[:300]
    except (ValueError, IndexError):
        return line[:300]


def report(result: SoakResult) -> tuple[str, dict[str, Any]]:
    samples = result.samples
    if not samples:
        return "no samples were taken", {}
    lines, raw = verdicts(result)
    text = [
        f"### RSS (MiB) per process, sampled every {result.config.sample_s:g}s"
        + (" (interrupted)" if result.interrupted else ""),
        "",
        rss_table(samples),
        "",
        "### Streams, disk and rows at start / middle / end",
        "",
        state_table(samples),
        "",
        *lines,
        "service logs:",
        *log_report(result),
    ]
    return "\n".join(text), raw


def write_json(path: Path, result: SoakResult, summary: dict[str, Any]) -> None:
    data = {
        "config": {**asdict(result.config), "run_epochs": result.config.run_epochs},
        "run_id": result.run_id,
        "state_dir": str(result.state_dir),
        "interrupted": result.interrupted,
        "samples": [asdict(s) for s in result.samples],
        "summary": summary,
        "events": result.events,
        "log_hits": result.logs,
        "nats_heaps": result.heaps,
    }
    path.write_text(json.dumps(data, indent=1, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long to soak, from the run's creation")
    p.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples")
    p.add_argument("--rows", type=int, default=1000, help="dataset rows (the demo's 1,000, cycled)")
    p.add_argument("--epochs", type=int, default=None, help="default: enough that the run outlasts the soak")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--max-staleness", type=int, default=1)
    p.add_argument("--rollout-replicas", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the raw samples here")
    p.add_argument("--nats-memory-limit-mb", type=int, default=StackConfig.nats_memory_limit_mb,
                   help="the embedded nats-server's GOMEMLIMIT (0: none, Go's default)")
    p.add_argument("--nats-prof-port", type=int, default=0,
                   help="enable nats-server's pprof on this port and save its heap profile at each third")
    p.add_argument("--state-dir", type=Path, default=None, help="default: a fresh temp dir (kept, for the logs)")
    args = p.parse_args()
    if args.minutes <= 0 or args.sample_s <= 0:
        p.error("--minutes and --sample-s must be positive")
    cfg = SoakConfig(minutes=args.minutes, sample_s=args.sample_s, rows=args.rows, epochs=args.epochs,
                     group_size=args.group_size, batch_size=args.batch_size, max_staleness=args.max_staleness,
                     seed=args.seed, rollout_replicas=args.rollout_replicas,
                     nats_prof_port=args.nats_prof_port, nats_memory_limit_mb=args.nats_memory_limit_mb)  # fmt: skip
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="relayrl-soak-"))
    signal.signal(signal.SIGTERM, _on_sigterm)
    result = soak(state_dir, cfg)
    text, summary = report(result)
    print()
    print(text)
    if args.json:
        write_json(args.json, result, summary)
        print(f"\nraw samples: {args.json}")
    print(f"state and logs: {state_dir}")
    sys.exit(130 if result.interrupted else 0)


if __name__ == "__main__":
    main()
