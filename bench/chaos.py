"""Chaos: kill every part of the embedded stack during a training run and check, from SQL,
that the run finished with nothing lost and nothing trained twice.

    python bench/chaos.py --groups 1000 --kills-per-part 3       # the long version
    python bench/chaos.py --groups 200 --group-size 4 --batch-size 4 --kills-per-part 1 --no-baseline  # ~CI

One `echo-digit` run that ends by data (rows x epochs groups, no `max_steps`) on the embedded
stack (`Stack`: every service its own process, SQLite, the supervisor of `relayrl up`). At
seeded random points of the run it SIGKILLs gateway, rollout, inference, store, trainer and
nats-server (each restarted by the supervisor `--restart-after-s` later) and publishes one
garbage trajectory. After the run it opens the database read-only and checks:
- the run finished; steps are contiguous (1..N);
- no group was consumed twice (a group id in at most one step, trained or dropped), and each
  step's trained/dropped counts match its group lists;
- trained + dropped = rows x epochs (lost and duplicated counts);
- every trained group has `group_size` distinct rollouts (sample indexes 0..n-1);
- dead letters: exactly the injected garbage, nothing else.

Prints one table: each fault with its recovery time (from the fault to the next training
step, from the trainer's step timestamps) and its stall (the longest gap between steps from
the fault until 4 steps after it: a part whose loss the pipeline's buffers hide for a step
still shows there), then the run against a fault-free run of the same config measured in
the same script (slowdown), how late its last steps reached SQL, lost / duplicated counts
and the checks. On a failed check it prints why, the trainer's own progress counters, and
the warning and error lines of the service logs.

tests/e2e/test_chaos.py runs this same code at CI size (and the longer outages as cases).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import msgpack  # noqa: E402
import nats  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402

from services.cli.app import load_run_config  # noqa: E402
from services.cli.client import GatewayClient  # noqa: E402
from services.cli.stack import Stack, StackConfig  # noqa: E402
from services.store.tables import DeadLetterRow, GroupRow, MetricRow, RolloutRow, RunRow, TaskRow  # noqa: E402
from shared import subjects  # noqa: E402
from shared.messages import TrainerProgress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("gateway", "rollout", "inference", "store", "trainer", "nats")
ENDED = ("finished", "cancelled", "failed")
# Which logs explain a failed check (all of them for anything else).
LOGS_FOR = {"dead letters": ("store", "rollout", "trainer"), "full groups": ("store", "rollout")}


@dataclass
class Fault:
    """One fault: which part, when (the share of the run's groups consumed), and how.

    kill: SIGKILL, the supervisor restarts it `restart_after_s` later.
    down: stopped on purpose (SIGTERM), started again `down_s` later (an outage).
    pause_kill: SIGSTOP for `down_s` (past ack_wait and the lease TTL), then SIGKILL while
    still stopped, so it dies before its next checkpoint; the supervisor restarts it. With
    `wake_s`, SIGCONT first and SIGKILL `wake_s` later: a holder that slept through its
    lease wakes up while another trainer has the run, and must not write.
    """

    part: str
    at: float
    kind: Literal["kill", "down", "pause_kill"] = "kill"
    down_s: float = 0.0
    wake_s: float = 0.0


@dataclass
class FaultRecord:
    fault: Fault
    process: str = ""
    pid: int | None = None
    struck_at: float | None = None  # wall clock (time.time), comparable with the metrics' `at`
    step_before: int = 0
    groups_before: int = 0
    recovered: bool = False  # a new step seen while the script watched
    recovery_s: float | None = None  # from SQL: first step timestamp after the fault
    stall_s: float | None = None  # the longest gap between steps from the fault to 4 steps after it
    note: str = ""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class ChaosConfig:
    rows: int = 60
    epochs: int = 1
    group_size: int = 4
    batch_size: int = 4
    max_staleness: int = 1
    seed: int = 0
    restart_after_s: float = 2.0
    rollout_replicas: int = 1
    trainers: int = 1
    # Short enough that a killed worker's tasks come back soon (the recovery target is 15 s).
    rollout_ack_wait_s: float = 5.0
    inject_garbage: bool = True
    jitter_s: float = 1.0  # a fault strikes up to this long after its point, off the step boundary
    timeout_s: float = 900.0
    recovery_timeout_s: float = 180.0
    settle_s: float = 75.0  # after the run: how long to wait for every group to be in a stored step

    @property
    def groups(self) -> int:
        return self.rows * self.epochs


@dataclass
class ChaosResult:
    name: str
    config: ChaosConfig
    run_id: str
    state_dir: Path
    records: list[FaultRecord] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    wall_s: float = 0.0  # run created -> run ended
    state: str = "?"
    steps: int = 0
    lost: int = 0
    duplicated: int = 0
    redelivered: int = 0  # rollouts stored from a second or later attempt
    step_gap_s: float | None = None  # the median time between steps (compare with the stalls)
    restarts: dict[str, int] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)  # the trainer's own counters at the end
    late_s: float = 0.0  # how long after the run ended its last steps reached SQL
    logs: str = ""  # error lines of the service logs, kept when a check failed

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> str:
        lines = [f"chaos '{self.name}' failed (state dir {self.state_dir}):"]
        lines += [f"  FAILED {c.name}: {c.detail}" for c in self.checks if not c.ok]
        lines += [f"  fault {r.fault.kind} {r.process or r.fault.part} at {r.fault.at:.2f}: {r.note}" for r in self.records if r.note]
        return "\n".join(lines) + ("\n" + self.logs if self.logs else "")


def schedule(parts: tuple[str, ...] | list[str], kills_per_part: int, seed: int, spread: float = 0.85) -> list[Fault]:
    """Every part killed `kills_per_part` times, in a seeded order, one per window of the run.

    The windows cover the first `spread` of the run's groups so the last fault still has
    steps left to recover into (each fault also waits for a step after the one before it).
    """
    rng = random.Random(seed)
    order = [p for p in parts for _ in range(kills_per_part)]
    rng.shuffle(order)
    n = len(order)
    return [Fault(part, at=round(spread * (i + rng.uniform(0.1, 0.9)) / n, 3)) for i, part in enumerate(order)]


def run_config(cfg: ChaosConfig, run_id: str) -> dict[str, Any]:
    """The demo's echo-digit run, cut to `rows` rows, ending by data (no max_steps)."""
    config = load_run_config(ROOT / "examples" / "echo_digit" / "train.yaml")
    config["run_id"] = run_id
    config["seed"] = cfg.seed
    config["dataset"] = [config["dataset"][i % len(config["dataset"])] for i in range(cfg.rows)]
    config["max_staleness"] = cfg.max_staleness
    training = config["training"]
    training.pop("max_steps", None)
    training.update(group_size=cfg.group_size, batch_size=cfg.batch_size, epochs=cfg.epochs)
    return config


class Watch:
    """Follows the run through the gateway; a gateway or store that is down reads as None."""

    def __init__(self, url: str, run_id: str, api_key: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=3.0, headers={"Authorization": f"Bearer {api_key}"})
        self.run_id = run_id
        self.last: dict[str, Any] | None = None

    def poll(self) -> dict[str, Any] | None:
        try:
            r = self.http.get(f"/v1/runs/{self.run_id}")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        self.last = r.json()
        return self.last

    @property
    def ended(self) -> bool:
        return self.last is not None and self.last["state"] in ENDED

    def close(self) -> None:
        self.http.close()


def process_for(stack: Stack, part: str, rng: random.Random, db: Path, run_id: str) -> str:
    """The process a fault on `part` hits: a random rollout replica, the trainer holding the run."""
    names = [s.name for s in stack.services if s.name.split("-")[0] == part] if part != "nats" else ["nats"]
    if not names:
        raise KeyError(f"no {part} process in this stack")
    if part == "trainer" and len(names) > 1:
        # The trainer of the latest step holds the run; hitting an idle one would test nothing.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if (holder := last_trainer(db, run_id)) in names:
                return holder
            time.sleep(0.5)
    return rng.choice(names)


def last_trainer(db: Path, run_id: str) -> str | None:
    try:
        with _engine(db).connect() as conn:
            row = conn.execute(
                select(MetricRow.trainer_id).where(MetricRow.run_id == run_id).order_by(MetricRow.step.desc()).limit(1)
            ).first()
    except Exception:  # noqa: BLE001 - the database may be mid-write or not there yet
        return None
    return row[0] if row else None


def strike(stack: Stack, rec: FaultRecord, restart_after_s: float) -> None:
    f = rec.fault
    rec.struck_at = time.time()
    if f.kind == "kill":
        rec.pid = stack.kill(rec.process, signal.SIGKILL, restart_after_s=restart_after_s)
    elif f.kind == "down":
        rec.pid = stack.process(rec.process).pid
        stack.stop_service(rec.process)
        time.sleep(f.down_s)
        stack.start_service(rec.process)
    elif f.kind == "pause_kill":
        rec.pid = stack.kill(rec.process, signal.SIGSTOP)
        time.sleep(f.down_s)
        if f.wake_s:
            stack.kill(rec.process, signal.SIGCONT)
            time.sleep(f.wake_s)
        stack.kill(rec.process, signal.SIGKILL, restart_after_s=restart_after_s)
    else:
        raise ValueError(f"unknown fault kind {f.kind}")


async def _read_progress(url: str, run_id: str) -> dict[str, Any]:
    """The trainer's progress record (KV): what it believes it consumed, trained and dropped."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        kv = await nc.jetstream().key_value(subjects.KV_POLICY)
        entry = await kv.get(subjects.progress_key(run_id))
        return TrainerProgress.decode(entry.value).model_dump() if entry.value else {}
    finally:
        await nc.close()


async def _publish_garbage(url: str, run_id: str) -> tuple[bytes, int]:
    """One undecodable trajectory on the run's subject; returns its bytes and stream sequence."""
    data = msgpack.packb({"chaos": "injected garbage", "run_id": run_id, "at": time.time()})
    nc = await nats.connect(url, connect_timeout=5)
    try:
        ack = await nc.jetstream().publish(subjects.trajectories(run_id), data, timeout=10)
        return data, ack.seq
    finally:
        await nc.close()


def run_chaos(
    state_dir: Path, cfg: ChaosConfig, faults: list[Fault], name: str = "chaos", log: Any = print
) -> ChaosResult:
    """Start a stack in a fresh `state_dir`, train one run while the faults strike, check it from SQL."""
    # A state dir left by an earlier run holds its database and NATS store: its dead letters
    # and runs would be counted against this one.
    if state_dir.exists():
        shutil.rmtree(state_dir)
    run_id = f"{name}-{cfg.seed}".replace("_", "-")
    result = ChaosResult(name=name, config=cfg, run_id=run_id, state_dir=state_dir)
    stack = Stack(
        StackConfig(
            state_dir=state_dir,
            gateway_port=0,
            log_format="json",
            rollout_replicas=cfg.rollout_replicas,
            trainers=cfg.trainers,
            rollout_ack_wait_s=cfg.rollout_ack_wait_s,
        )
    ).start()
    db = stack.state_dir / "relayrl.db"
    rng = random.Random(cfg.seed + 1)
    injected: bytes | None = None
    watch = Watch(stack.gateway_url, run_id, stack.api_key)
    try:
        client = GatewayClient(stack.gateway_url, api_key=stack.api_key)
        client.create_run(run_config(cfg, run_id))
        started = time.time()
        deadline = time.monotonic() + cfg.timeout_s
        if cfg.inject_garbage:
            injected, seq = asyncio.run(_publish_garbage(stack.admin_url, run_id))
            log(f"[{name}] injected one garbage trajectory (TRAJECTORIES seq {seq})")
        for fault in sorted(faults, key=lambda f: f.at):
            rec = FaultRecord(fault)
            result.records.append(rec)
            if not _wait_for_groups(watch, fault.at * cfg.groups, cfg.batch_size, deadline):
                rec.note = f"not injected: run {watch.last['state'] if watch.last else '?'} before it was due"
                log(f"[{name}] {rec.note}")
                continue
            time.sleep(rng.uniform(0.0, cfg.jitter_s))  # off the step boundary
            rec.process = process_for(stack, fault.part, rng, db, run_id)
            view = watch.poll() or watch.last or {"step": 0, "groups_consumed": 0}
            rec.step_before, rec.groups_before = view["step"], view["groups_consumed"]
            if rec.groups_before >= cfg.groups:
                rec.note = "struck after the trainer had taken the last group"
            log(f"[{name}] {fault.kind} {rec.process} at step {rec.step_before}, {rec.groups_before}/{cfg.groups} groups")
            strike(stack, rec, cfg.restart_after_s)
            if fault.kind != "kill" and (watch.poll() or {}).get("state") in ENDED:
                # Still counted, but said: the fault's end came after the run's.
                rec.note = "the run had ended before the fault was over"
                log(f"[{name}] {rec.note}")
            rec.recovered = _wait_for_step(watch, rec.step_before, min(deadline, time.monotonic() + cfg.recovery_timeout_s))
            if not rec.recovered and not watch.ended:
                rec.note = f"no training step within {cfg.recovery_timeout_s:.0f}s of the fault"
                log(f"[{name}] {rec.note}")
        while not watch.ended and time.monotonic() < deadline:
            watch.poll()
            time.sleep(0.5)
        result.state = watch.last["state"] if watch.last else "?"
        result.wall_s = time.time() - started
        result.late_s = _settle(db, run_id, cfg.groups, cfg.settle_s if result.state == "finished" else 5.0)
        # Let a restart the last fault scheduled happen, so the count shows it.
        until = time.monotonic() + cfg.restart_after_s + 10.0
        while any(p.sup.restart_at is not None or not (p.alive or p.sup.held) for p in stack.processes()):
            if time.monotonic() > until:
                break
            time.sleep(0.2)
        result.restarts = {p.name: p.sup.restarts for p in stack.processes()}
        try:
            result.progress = asyncio.run(asyncio.wait_for(_read_progress(stack.admin_url, run_id), 15))
        except Exception as exc:  # noqa: BLE001 - only for the report
            result.progress = {"error": repr(exc)}
    finally:
        watch.close()
        stack.stop()
    check_sql(db, run_id, cfg, injected, result)
    if not result.ok:
        result.logs = error_lines(stack, [c.name for c in result.checks if not c.ok])
    return result


def _wait_for_groups(watch: Watch, groups: float, batch_size: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        view = watch.poll()
        if watch.ended:
            return False
        # Steps x batch as well: the run view has shown groups_consumed 0 at step 9 after a
        # trainer restart, and a schedule must not stall on a counter that lags.
        if view is not None and max(view["groups_consumed"], view["step"] * batch_size) >= groups:
            return True
        time.sleep(0.2)
    return False


def _wait_for_step(watch: Watch, step: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        view = watch.poll()
        if watch.ended:
            return True
        if view is not None and view["step"] > step:
            return True
        time.sleep(0.2)
    return False


def _settle(db: Path, run_id: str, groups: int, timeout_s: float) -> float:
    """Wait until every group is in a stored step, at most `timeout_s`; returns the wait.

    A store killed after fetching a step's metrics and before writing them gets them back
    only after its consumer's ack_wait (60 s by default): waiting that long tells a late
    step from a lost one.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            with _engine(db).connect() as conn:
                rows = conn.execute(select(MetricRow.group_ids, MetricRow.dropped).where(MetricRow.run_id == run_id)).all()
        except Exception:  # noqa: BLE001 - mid-write; try again
            rows = None
        if rows is not None and sum(len(g) + len(d) for g, d in rows) >= groups:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def _engine(db: Path):  # type: ignore[no-untyped-def]
    return create_engine(f"sqlite:///file:{db}?mode=ro&uri=true")


def check_sql(db: Path, run_id: str, cfg: ChaosConfig, injected: bytes | None, result: ChaosResult) -> None:
    """The invariants, read from the database alone (read-only)."""
    engine = _engine(db)
    with engine.connect() as conn:
        run = conn.execute(select(RunRow.state, RunRow.error).where(RunRow.run_id == run_id)).first()
        metrics = conn.execute(
            select(MetricRow.step, MetricRow.group_ids, MetricRow.dropped, MetricRow.values, MetricRow.at)
            .where(MetricRow.run_id == run_id).order_by(MetricRow.step)
        ).all()  # fmt: skip
        tasks = {t for (t,) in conn.execute(select(TaskRow.task_id).where(TaskRow.run_id == run_id, TaskRow.eval.is_(False)))}
        published = conn.execute(select(GroupRow.group_id).where(GroupRow.run_id == run_id)).all()
        members = conn.execute(
            select(RolloutRow.group_id, RolloutRow.sample_index, RolloutRow.attempt).where(RolloutRow.run_id == run_id)
        ).all()
        dead = conn.execute(select(DeadLetterRow.stream, DeadLetterRow.subject, DeadLetterRow.reason, DeadLetterRow.data)).all()
    engine.dispose()
    checks = result.checks

    state, error = (run.state, run.error) if run else ("missing", None)
    checks.append(Check("run finished", state == "finished", f"state {state}" + (f", error: {error}" if error else "")))

    steps = [m.step for m in metrics]
    result.steps = len(steps)
    gaps = sorted(set(range(1, max(steps, default=0) + 1)) - set(steps))
    checks.append(Check("steps contiguous", steps == list(range(1, len(steps) + 1)) and bool(steps),
                        f"{len(steps)} steps" + (f", missing {gaps[:10]}" if gaps else "")))  # fmt: skip

    where: dict[str, list[int]] = {}
    bad_counts = []
    for m in metrics:
        for g in [*m.group_ids, *m.dropped]:
            where.setdefault(g, []).append(m.step)
        trained, dropped = m.values.get("groups_trained"), m.values.get("groups_dropped")
        if trained != len(m.group_ids) or dropped != len(m.dropped):
            bad_counts.append(f"step {m.step}: values say {trained}/{dropped}, lists hold {len(m.group_ids)}/{len(m.dropped)}")
    twice = {g: s for g, s in where.items() if len(s) > 1}
    result.duplicated = sum(len(s) - 1 for s in twice.values())
    checks.append(Check("no group trained twice", not twice,
                        f"{len(twice)} groups in more than one step, e.g. {dict(list(twice.items())[:5])}" if twice else ""))  # fmt: skip
    checks.append(Check("step counts match group lists", not bad_counts, "; ".join(bad_counts[:5])))

    consumed = set(where)
    result.lost = cfg.groups - len(consumed & tasks) if len(tasks) == cfg.groups else cfg.groups - len(consumed)
    total = sum(len(s) for s in where.values())
    unknown = consumed - tasks
    detail = (f"trained + dropped = {total} ({len(consumed)} distinct) of {cfg.groups}; {len(tasks)} tasks published, "
              f"{len(published)} groups published by the store")  # fmt: skip
    if unknown:
        detail += f"; not tasks of this run: {sorted(unknown)[:5]}"
    if result.lost:
        detail += f"; not in any step: {sorted(tasks - consumed)[:10]}"
    if result.progress:
        p = result.progress
        detail += (f"; the trainer's progress says consumed {p.get('groups_consumed')} (trained "
                   f"{p.get('groups_trained')}, dropped {p.get('groups_dropped')}) at step {p.get('step')}")  # fmt: skip
    checks.append(Check("trained + dropped = rows x epochs", total == cfg.groups and not unknown and not result.lost, detail))

    samples: dict[str, set[int]] = {}
    for g, idx, attempt in members:
        samples.setdefault(g, set()).add(idx)
        result.redelivered += attempt > 1
    trained_groups = {g for m in metrics for g in m.group_ids}
    short = {g: sorted(samples.get(g, ())) for g in trained_groups if samples.get(g, set()) != set(range(cfg.group_size))}
    checks.append(Check("full groups", not short,
                        f"{len(short)} trained groups without {cfg.group_size} distinct samples, e.g. "
                        f"{dict(list(short.items())[:5])}" if short else ""))  # fmt: skip

    expected = [d for d in dead if injected is not None and d.data == injected]
    others = [d for d in dead if injected is None or d.data != injected]
    want = 1 if injected is not None else 0
    detail = f"{len(expected)} injected (want {want}), {len(others)} others"
    if others:
        kinds = Counter((d.stream, d.reason[:160]) for d in others)
        detail += ": " + "; ".join(f"{n}x {s}: {r}" for (s, r), n in kinds.most_common(5))
    checks.append(Check("dead letters only the injected one", len(expected) == want and not others, detail))

    at = sorted(m.at for m in metrics)
    gaps = sorted(b - a for a, b in zip(at, at[1:]))
    result.step_gap_s = gaps[len(gaps) // 2] if gaps else None
    for rec in result.records:
        if rec.struck_at is not None:
            after = [rec.struck_at] + [t for t in at if t > rec.struck_at][:4]
            rec.recovery_s = (after[1] - rec.struck_at) if len(after) > 1 else None
            rec.stall_s = max((b - a for a, b in zip(after, after[1:])), default=None)
    missed = [r for r in result.records if r.struck_at is None]
    # A fault that struck after the trainer had taken the last group has no step to wait for.
    unrecovered = [r for r in result.records
                   if r.struck_at is not None and r.recovery_s is None and r.groups_before < cfg.groups]  # fmt: skip
    checks.append(Check("every fault struck", not missed,
                        ", ".join(f"{r.fault.part} at {r.fault.at:.2f}" for r in missed)))  # fmt: skip
    if unrecovered:
        checks.append(Check("a step after every fault", False, ", ".join(r.process for r in unrecovered)))


def error_lines(stack: Stack, failed: list[str], per_log: int = 12) -> str:
    """The last warnings and errors of each relevant service log, one line each: structured
    events with their exception's last line, Python tracebacks by their exception, and the
    supervisor's restart markers (for the timeline). nats-py's own reconnect noise is left out."""
    wanted = {p for name in failed for p in LOGS_FOR.get(name, PARTS)}
    out = []
    for proc in stack.processes():
        if proc.name.split("-")[0] not in wanted:
            continue
        try:
            lines = proc.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        hits = notable(lines)
        if hits:
            out.append(f"--- {proc.log_path} ({len(hits)} notable lines, last {min(per_log, len(hits))}):")
            out += ["  " + ln[:400] for ln in hits[-per_log:]]
    return "\n".join(out)


def notable(lines: list[str]) -> list[str]:
    hits: list[str] = []
    in_traceback = skip = False
    for line in lines:
        if in_traceback:
            if line[:1].isspace() or not line.strip() or line.startswith(("During handling", "The above exception")):
                continue
            if not skip:
                hits.append(f"Traceback -> {line.strip()}")
            in_traceback = skip = False
            continue
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("level") in ("warning", "error", "critical", "exception"):
                exc = str(event.pop("exception", "")).strip().splitlines()
                text = json.dumps({k: v for k, v in event.items() if k != "timestamp"})
                hits.append(f"{event.get('timestamp', '')[11:23]} {text}" + (f" -> {exc[-1]}" if exc else ""))
        elif line.startswith("Traceback"):
            in_traceback = True
        elif line.startswith("-----"):
            hits.append(line)
        # nats-py logs "encountered error" and a traceback on every reconnect attempt: noise.
        skip = "nats: encountered error" in line if not in_traceback else skip
    return hits


def table(results: list[ChaosResult], baseline: ChaosResult | None) -> str:
    """One plain table: a row per fault, then a row per run."""
    rows = [("run", "fault", "process", "at groups", "step", "recovery (s)", "stall (s)", "note")]
    for res in results:
        for r in res.records:
            rec = "-" if r.recovery_s is None else f"{r.recovery_s:.1f}"
            stall = "-" if r.stall_s is None else f"{r.stall_s:.1f}"
            kind = r.fault.kind + (f" {r.fault.down_s:.0f}s" if r.fault.down_s else "") + (
                f" +wake {r.fault.wake_s:.0f}s" if r.fault.wake_s else "")  # fmt: skip
            rows.append((res.name, kind, r.process or r.fault.part, f"{r.groups_before}/{res.config.groups}",
                         str(r.step_before), rec, stall, r.note))  # fmt: skip
    head = ("run", "state", "groups", "steps", "step gap (s)", "wall (s)", "slowdown", "steps late (s)", "lost",
            "duplicated", "redelivered", "restarts", "checks")  # fmt: skip
    runs = [head]
    for res in ([baseline] if baseline else []) + results:
        slow = f"{res.wall_s / baseline.wall_s:.2f}x" if baseline and baseline.wall_s and res is not baseline else "-"
        restarts = ",".join(f"{k}:{v}" for k, v in sorted(res.restarts.items()) if v) or "0"
        checks = "all passed" if res.ok else "FAILED: " + ", ".join(c.name for c in res.checks if not c.ok)
        gap = "-" if res.step_gap_s is None else f"{res.step_gap_s:.2f}"
        runs.append((res.name, res.state, str(res.config.groups), str(res.steps), gap, f"{res.wall_s:.0f}", slow,
                     f"{res.late_s:.1f}", str(res.lost), str(res.duplicated), str(res.redelivered), restarts,
                     checks))  # fmt: skip
    return _render(rows) + "\n\n" + _render(runs)


def _render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=1000, help="rows x epochs of the run")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--max-staleness", type=int, default=1)
    p.add_argument("--kills-per-part", type=int, default=3)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--restart-after-s", type=float, default=2.0)
    p.add_argument("--rollout-replicas", type=int, default=1)
    p.add_argument("--trainers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="chaos runs (seeds seed..seed+repeat-1)")
    p.add_argument("--baseline", default=True, action=argparse.BooleanOptionalAction, help="also a fault-free run")
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p.add_argument("--state-dir", type=Path, default=None, help="default: a temp dir (kept when a check fails)")
    args = p.parse_args()
    if args.groups % args.epochs:
        p.error("--groups must be a multiple of --epochs")
    root = args.state_dir or Path(tempfile.mkdtemp(prefix="relayrl-chaos-"))
    base_cfg = dict(
        rows=args.groups // args.epochs, epochs=args.epochs, group_size=args.group_size, batch_size=args.batch_size,
        max_staleness=args.max_staleness, restart_after_s=args.restart_after_s, rollout_replicas=args.rollout_replicas,
        trainers=args.trainers, timeout_s=args.timeout_s,
    )  # fmt: skip
    baseline = None
    if args.baseline:
        cfg = ChaosConfig(**base_cfg, seed=args.seed, inject_garbage=False)
        baseline = run_chaos(root / "baseline", cfg, [], name="fault-free")
        if not baseline.ok:
            print(baseline.failures())
    results = []
    parts = tuple(x for x in args.parts.split(",") if x)
    for i in range(args.repeat):
        cfg = ChaosConfig(**base_cfg, seed=args.seed + i)
        res = run_chaos(root / f"chaos-{i}", cfg, schedule(parts, args.kills_per_part, cfg.seed), name=f"chaos-{i}")
        results.append(res)
        if not res.ok:
            print(res.failures())
    print()
    print(table(results, baseline))
    print(f"\nstate and logs: {root}")
    sys.exit(0 if all(r.ok for r in results) and (baseline is None or baseline.ok) else 1)


if __name__ == "__main__":
    main()
