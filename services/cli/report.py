"""A finished run's per-step metrics as a CSV and a reward-curve PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

COLUMNS = (
    "reward_mean", "pass_rate", "policy_loss", "pg_clipfrac", "ppo_kl", "entropy", "grad_norm",
    "advantage_mean", "advantage_std", "groups_trained", "groups_dropped", "tokens_per_s", "step_time_s",
)  # fmt: skip


def write_csv(steps: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = sorted({k for s in steps for k in s["values"]} - set(COLUMNS))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "version", "elapsed_s", *COLUMNS, *extra, "staleness"])
        for s in steps:
            v = s["values"]
            stale = ";".join(f"{k}:{n}" for k, n in sorted(s.get("staleness", {}).items(), key=lambda kv: int(kv[0])))
            w.writerow([s["step"], s["version"], f"{s.get('elapsed_s', 0.0):.2f}", *(v.get(c, "") for c in (*COLUMNS, *extra)), stale])
    return path


def plot_rewards(steps: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    x = [s.get("elapsed_s", 0.0) / 60 for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [s["values"].get("reward_mean", 0.0) for s in steps], label="mean reward")
    ax.plot(x, [s["values"].get("pass_rate", 0.0) for s in steps], label="pass rate", alpha=0.6)
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("minutes")
    ax.set_ylabel("reward")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
