"""Follow a training run live: a progress bar with version, step, reward, throughput and staleness."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.cli.client import GatewayClient

ENDED = ("finished", "cancelled", "failed")


@dataclass
class RunFollower:
    """Polls a run and its new metrics; keeps every step's metrics for the report."""

    client: GatewayClient
    run_id: str
    started: float = field(default_factory=time.monotonic)
    steps: list[dict[str, Any]] = field(default_factory=list)
    trajectories: float = 0.0

    def poll(self) -> dict[str, Any]:
        after = self.steps[-1]["step"] if self.steps else 0
        for m in self.client.metrics(self.run_id, after_step=after):
            m["elapsed_s"] = time.monotonic() - self.started
            self.steps.append(m)
            self.trajectories += m["values"].get("trajectories", 0.0)
        return self.client.run(self.run_id)

    def line(self, run: dict[str, Any]) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        last = self.steps[-1] if self.steps else None
        values = last["values"] if last else {}
        if "sft_loss" in values:  # an sft run has a loss, not rewards
            score = f"loss {values['sft_loss']:.3f}"
        else:
            score = "reward " + (f"{values['reward_mean']:.3f}" if "reward_mean" in values else "-")
        return (
            f"v{run['version']} step {run['step']}/{run['total_steps']}  {score}  "
            f"{self.trajectories / elapsed:.1f} traj/s  staleness {_mean_staleness(last):.2f}  [{run['state']}]"
        )


def _mean_staleness(metrics: dict[str, Any] | None) -> float:
    if not metrics or not metrics.get("staleness"):
        return 0.0
    hist = {int(k): v for k, v in metrics["staleness"].items()}
    return sum(k * v for k, v in hist.items()) / max(sum(hist.values()), 1)


def follow(client: GatewayClient, run_id: str, console: Console, timeout_s: float, poll_s: float = 0.5) -> RunFollower:
    """Show live progress until the run ends (or `timeout_s` passes: TimeoutError)."""
    follower = RunFollower(client, run_id)
    deadline = time.monotonic() + timeout_s
    with Progress(
        TextColumn("[bold]{task.fields[run]}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[line]}"),
        TimeElapsedColumn(), console=console,
    ) as progress:  # fmt: skip
        bar = progress.add_task("train", total=None, run=run_id, line="starting…")
        while True:
            run = follower.poll()
            progress.update(bar, completed=run["step"], total=run["total_steps"], line=follower.line(run))
            if run["state"] in ENDED:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run['state']} after {timeout_s:.0f}s")
            time.sleep(poll_s)
    if run["state"] != "finished":
        console.print(f"[red]run {run_id} {run['state']}: {run.get('error') or ''}")
    return follower
