"""`relayrl`: start the embedded stack, submit tasks, run the demo."""

from __future__ import annotations

import json
import random
import signal
import string
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.client import GatewayClient, gateway_url, read_tasks_file
from services.cli.stack import Stack, StackConfig

app = typer.Typer(help="relayrl: train LLM agents with GRPO over NATS JetStream.", no_args_is_help=True)
console = Console()

StateDir = typer.Option(Path(".relayrl"), "--state-dir", help="where logs, data and stack.json live")


@app.command()
def up(
    rollout_replicas: int = typer.Option(1, "--rollout-replicas", min=1, help="rollout worker processes"),
    gateway_port: int = typer.Option(8000, "--gateway-port", help="0 picks a free port"),
    model: str = typer.Option("tiny", "--model", help='"tiny" or a local Hugging Face checkpoint directory'),
    database_url: Optional[str] = typer.Option(None, "--database-url", envvar="RELAYRL_DATABASE_URL"),
    nats_url: Optional[str] = typer.Option(None, "--nats-url", envvar="NATS_URL", help="use this NATS server"),
    state_dir: Path = StateDir,
) -> None:
    """Start nats-server and every service as its own process; Ctrl-C stops them all cleanly."""
    config = StackConfig(
        state_dir=state_dir,
        nats_url=nats_url,
        gateway_port=gateway_port,
        rollout_replicas=rollout_replicas,
        model=model,
        database_url=database_url,
    )
    stack = _start(config)
    stopping = False

    def request_stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    reported: set[str] = set()
    try:
        while not stopping:
            for svc in stack.failed():
                if svc.name not in reported:
                    reported.add(svc.name)
                    console.print(f"[red]{svc.name} exited ({svc.proc.returncode if svc.proc else '?'}); log: {svc.log_path}")
            time.sleep(0.5)
    finally:
        console.print("stopping…")
        stack.stop()
        console.print("stopped.")


def _start(config: StackConfig) -> Stack:
    with console.status("starting nats-server and services…"):
        stack = Stack(config).start()
    table = Table(title="relayrl is up", show_header=True)
    table.add_column("component")
    table.add_column("where")
    table.add_row("gateway", stack.gateway_url)
    table.add_row("nats", stack.nats_url)
    for i, url in enumerate(stack.inference_urls):
        table.add_row(f"inference {i + 1}", url)
    for svc in stack.services:
        table.add_row(f"  {svc.name}", f"pid {svc.proc.pid if svc.proc else '-'}, log {svc.log_path}")
    table.add_row("state", str(stack.state_dir / "stack.json"))
    console.print(table)
    return stack


@app.command()
def submit(
    agent: str = typer.Option("copy", "--agent"),
    input: list[str] = typer.Option([], "--input", help="task input as JSON (repeatable)"),
    file: Optional[Path] = typer.Option(None, "--file", help="JSONL file, one task object per line"),
    group_size: int = typer.Option(1, "--group-size", min=1),
    run: str = typer.Option("default", "--run"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow progress until every task is done"),
    timeout_s: float = typer.Option(600.0, "--timeout"),
    gateway: Optional[str] = typer.Option(None, "--gateway", help="gateway URL (default: from stack.json)"),
    state_dir: Path = StateDir,
) -> None:
    """Send tasks to the gateway and show their progress."""
    tasks = [{"agent": agent, "input": json.loads(i), "group_size": group_size, "run_id": run} for i in input]
    if file:
        for t in read_tasks_file(file):
            tasks.append({"agent": agent, "group_size": group_size, "run_id": run, **t})
    if not tasks:
        raise typer.BadParameter("give --input JSON or --file tasks.jsonl")
    client = GatewayClient(gateway_url(gateway, state_dir))
    accepted = client.submit(tasks)
    console.print(f"submitted {len(accepted)} task(s), {sum(t['group_size'] for t in accepted)} rollout(s)")
    if wait:
        views = _follow(client, [t["task_id"] for t in accepted], timeout_s)
        _print_results(views)


def _follow(client: GatewayClient, task_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    with Progress(
        TextColumn("rollouts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bar = progress.add_task("rollouts", total=None)
        return client.wait(task_ids, timeout_s, lambda done, total: progress.update(bar, completed=done, total=total))


def _print_results(views: dict[str, dict[str, Any]], limit: int = 20) -> None:
    table = Table(title="results")
    for col in ("task", "status", "rollouts", "mean reward", "statuses"):
        table.add_column(col)
    rewards = []
    for tid, v in list(views.items()):
        rs = [r["reward"] for r in v["rollouts"]]
        rewards.extend(rs)
        if table.row_count < limit:
            statuses = ",".join(sorted({r["status"] for r in v["rollouts"]}))
            table.add_row(tid[:16], v["status"], str(len(rs)), f"{sum(rs) / max(len(rs), 1):.3f}", statuses)
    console.print(table)
    if rewards:
        console.print(f"{len(rewards)} rollouts, mean reward {sum(rewards) / len(rewards):.3f}")


@app.command()
def demo(
    tasks: int = typer.Option(20, "--tasks", min=1),
    group_size: int = typer.Option(4, "--group-size", min=1),
    rollout_replicas: int = typer.Option(2, "--rollout-replicas", min=1),
    state_dir: Path = typer.Option(Path(".relayrl/demo"), "--state-dir"),
) -> None:
    """Start the embedded stack, run the toy copy task through it, print what happened, stop."""
    stack = _start(StackConfig(state_dir=state_dir, gateway_port=0, rollout_replicas=rollout_replicas, log_format="json"))
    try:
        client = GatewayClient(stack.gateway_url)
        rng = random.Random(0)
        words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))) for _ in range(tasks)]
        started = time.monotonic()
        accepted = client.submit(
            [{"agent": "copy", "input": {"text": w}, "group_size": group_size, "sampling": {"max_tokens": 12}} for w in words]
        )
        console.print(f"submitted {len(accepted)} copy tasks x {group_size} samples over HTTP to {stack.gateway_url}")
        views = _follow(client, [t["task_id"] for t in accepted], timeout_s=600)
        elapsed = time.monotonic() - started
        _print_results(views)
        _print_sample(client, views, stack)
        n = sum(len(v["rollouts"]) for v in views.values())
        console.print(f"[bold green]{n} trajectories stored in {elapsed:.1f}s ({n / elapsed:.1f}/s); "
                      f"logs in {stack.logs}")
    finally:
        stack.stop()


def _print_sample(client: GatewayClient, views: dict[str, dict[str, Any]], stack: Stack) -> None:
    first = next(iter(views.values()))
    rollout = client.rollout(first["rollouts"][0]["rollout_id"])
    x = rollout["transitions"][0]
    try:
        from shared.models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model("tiny", stack.state_dir / "models"))
        prompt, response = tok.decode(x["prompt_ids"]), tok.decode(x["response_ids"])
    except Exception as exc:  # the demo still shows ids when the tokenizer cannot be loaded
        prompt, response = f"<{exc}>", ""
    console.print(f"\n[bold]one trajectory[/bold] {rollout['rollout_id']} (worker {rollout['worker_id']}, "
                  f"reward {rollout['reward']:.3f}, status {rollout['status']})")
    console.print(f"  prompt ({len(x['prompt_ids'])} tokens): {prompt!r}")
    console.print(f"  response ({len(x['response_ids'])} tokens): {response!r}")
    console.print(f"  response ids {x['response_ids'][:12]}…")
    console.print(f"  logprobs {[round(v, 2) for v in x['response_logprobs'][:12]]}…")
    console.print(f"  policy versions {sorted(set(x['response_versions']))}, finish {x['finish_reason']}")


if __name__ == "__main__":
    app()
