"""Wall-clock to mean reward 0.8 on the echo-digit task: synchronous (max_staleness 0) vs
asynchronous (max_staleness 2) GRPO through the whole pipeline on this machine.

    .venv/bin/python bench/async_vs_sync.py [--etas 0 2] [--target 0.8] [--timeout 900]

Each eta gets a fresh embedded stack (nats-server, store, inference, rollout, trainer,
gateway as separate processes) and the run of examples/echo_digit/train.yaml. It prints one
table: time and steps to the target (3-step moving average of the mean reward), rollouts/s,
groups dropped as stale, and the ratio of each time to the synchronous one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from services.cli.app import load_run_config
from services.cli.client import GatewayClient
from services.cli.stack import Stack, StackConfig

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 3


def time_to_target(client: GatewayClient, run_id: str, target: float, timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    reached: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = []
    while reached is None and time.monotonic() - started < timeout_s:
        steps = client.metrics(run_id)
        rewards = [m["values"]["reward_mean"] for m in steps]
        for i in range(WINDOW - 1, len(rewards)):
            if sum(rewards[i - WINDOW + 1 : i + 1]) / WINDOW >= target:
                reached = {"seconds": time.monotonic() - started, "step": steps[i]["step"]}
                break
        if client.run(run_id)["state"] != "running":
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    trajectories = sum(m["values"].get("trajectories", 0.0) for m in steps)
    return {
        "seconds": reached["seconds"] if reached else None,
        "step": reached["step"] if reached else None,
        "steps": len(steps),
        "rollouts_per_s": trajectories / elapsed if elapsed else 0.0,
        "stale_dropped": sum(m["values"].get("groups_dropped_stale", 0.0) for m in steps),
    }


def run_one(eta: int, target: float, timeout_s: float) -> dict[str, Any]:
    config = load_run_config(ROOT / "examples" / "echo_digit" / "train.yaml")
    config.update(run_id=f"eta{eta}", max_staleness=eta)
    with tempfile.TemporaryDirectory(prefix="relayrl-bench-") as tmp:
        stack = Stack(StackConfig(state_dir=Path(tmp), gateway_port=0, log_format="json")).start()
        try:
            client = GatewayClient(stack.gateway_url, api_key=stack.api_key)
            client.create_run(config)
            return time_to_target(client, config["run_id"], target, timeout_s)
        finally:
            stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--etas", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    results = {eta: run_one(eta, args.target, args.timeout) for eta in args.etas}
    base = results[args.etas[0]]["seconds"]
    print(f"\ntime to mean reward {args.target} (echo-digit, tiny model from scratch, CPU)")
    print(f"{'max_staleness':>13} {'seconds':>8} {'step':>5} {'rollouts/s':>10} {'stale drops':>11} {'vs eta=' + str(args.etas[0]):>9}")
    for eta, r in results.items():
        secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else "not hit"
        ratio = f"{r['seconds'] / base:.2f}" if r["seconds"] and base else "-"
        print(f"{eta:>13} {secs:>8} {str(r['step']):>5} {r['rollouts_per_s']:>10.1f} {r['stale_dropped']:>11.0f} {ratio:>9}")


if __name__ == "__main__":
    main()
