"""The seeds' ablations on CPU: several GRPO arms, several seeds each, from one SFT warm start.

    python bench/ablations.py calculator --seeds 3 --out .relayrl/ablations/calculator
    python bench/ablations.py text-to-sql --seeds 3 --out .relayrl/ablations/text-to-sql

One embedded stack per study: the study's SFT warm start runs once (`relayrl reproduce`'s
first half, services/cli/reproduce.py), then every arm x seed is a GRPO run with `init_from`
that warm start, through the real services, evaluated greedily on the same held-out rows.
Arms change one setting of the study's GRPO config and nothing else (never tuned per arm):

- calculator: `credit` equal / last / discounted (AIR off), and discounted with the AIR rules
  of examples/calculator/train.yaml (+0.1 a well-formed calculation, -0.1 a malformed one);
- text-to-sql: `trained_agents` write|rewrite / all roles / check only.

Prints a table (baseline, then per arm: final held-out accuracy mean and sample standard
deviation over seeds, and each seed's figure) and writes `ablations.json` under --out.
`--rl-steps` / `--eval-rows` shrink every arm alike (the warm start is shared, so arms stay
comparable at any size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from services.cli.reproduce import STUDY_NAMES, load_study, sized, study_stack, train_from, warm_start  # noqa: E402

AIR = {"air_enabled": True, "air_rules": [{"on": "tool_success", "reward": 0.1}, {"on": "tool_failure", "reward": -0.1}]}

# study -> arm -> changes to the study's GRPO run config ("training" merged key by key)
ARMS: dict[str, dict[str, dict[str, Any]]] = {
    "calculator": {
        "equal": {"training": {"credit": "equal"}},
        "last": {"training": {"credit": "last"}},
        "discounted": {"training": {"credit": "discounted", "discount": 0.9}},
        "discounted+AIR": {"training": {"credit": "discounted", "discount": 0.9}, "runtime": AIR},
    },
    "text-to-sql": {
        "write|rewrite": {"trained_agents": "write|rewrite"},
        "all roles": {"trained_agents": ".*"},
        "check only": {"trained_agents": "check"},
    },
}


def arm_config(base: dict[str, Any], change: dict[str, Any], run_id: str, seed: int) -> dict[str, Any]:
    config = {**base, **{k: v for k, v in change.items() if k != "training"}, "run_id": run_id, "seed": seed}
    config["training"] = {**base["training"], **change.get("training", {})}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=STUDY_NAMES)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", nargs="*", help="a subset of the study's arms (default: all)")
    parser.add_argument("--sft-steps", type=int)
    parser.add_argument("--rl-steps", type=int)
    parser.add_argument("--eval-rows", type=int)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()

    console = Console()
    study = sized(load_study(args.study), sft_steps=args.sft_steps, rl_steps=args.rl_steps, eval_n=args.eval_rows, seed=0)
    arms = {name: ARMS[args.study][name] for name in (args.arms or ARMS[args.study])}
    held_out = study.eval_rows(study.eval_n)
    started = time.monotonic()
    results: dict[str, Any] = {"study": args.study, "seeds": args.seeds, "arms": {}, "rl": study.rl}
    args.out.mkdir(parents=True, exist_ok=True)
    with study_stack(study, args.out, console) as (client, _):
        warm = warm_start(client, study, f"{args.study}-warm", held_out, console, args.timeout)
        results["baseline_accuracy"] = warm.baseline.accuracy
        for name, change in arms.items():
            finals = []
            for seed in range(args.seeds):
                run_id = f"{args.study}-{_slug(name)}-s{seed}"
                config = arm_config(study.rl, change, run_id, seed)
                final, curve, _ = train_from(client, study, warm, config, held_out, console, args.timeout)
                finals.append({"seed": seed, "accuracy": final.accuracy, "tool_success": final.tool_success,
                               "curve": [p.__dict__ for p in curve]})  # fmt: skip
                results["arms"][name] = {"change": change, "runs": finals}
                (args.out / "ablations.json").write_text(json.dumps(results, indent=2) + "\n")
    results["wall_s"] = round(time.monotonic() - started, 1)
    (args.out / "ablations.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict[str, Any]) -> str:
    """The markdown table docs/benchmarks.md quotes."""
    lines = [
        f"baseline (SFT warm start, held-out): {results['baseline_accuracy']:.3f}",
        "",
        "| arm | final held-out accuracy, mean ± sd | per seed |",
        "|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        accs = [r["accuracy"] for r in arm["runs"]]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(accs):.3f} ± {sd:.3f} | {', '.join(f'{a:.2f}' for a in accs)} |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


if __name__ == "__main__":
    main()
