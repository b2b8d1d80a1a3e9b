"""The calculator study (`relayrl reproduce calculator`): Agent Lightning's calculator tool-use
case on the project's own `tiny:agent` model, sized for a 2-core CPU.

- Warm start: SFT on `demos.demonstrations` (deliberately imperfect: on some kinds of problem
  the demonstrations mostly skip the tool and answer with a slip; see `demos.DemoMix`), so the
  warm-started model uses the tool on some kinds and guesses on others. Its held-out accuracy is
  the baseline.
- GRPO on the 400 rows of `rows.jsonl` (reward 1 for the right number), from those weights,
  through the whole pipeline. Reward comes only from the answer, so using the tool where the
  demonstrations guessed is what RL has to find.
- Held-out: `demos.eval_rows` (another seed; no question is among the demonstrations or the
  RL rows). Evaluations are greedy.

The sizes and learning rates were picked by measuring on that machine (docs/benchmarks.md has
the figures and the command); `relayrl reproduce calculator --sft-steps/--rl-steps/--eval-rows`
overrides the sizes.
"""

from __future__ import annotations

from pathlib import Path

from examples.calculator import demos
from services.cli.client import read_tasks_file
from services.cli.reproduce import Study

ROWS = Path(__file__).with_name("rows.jsonl")

STUDY = Study(
    name="calculator",
    agent="calculator",
    model="tiny:agent",
    demonstrations=lambda n, seed: demos.demonstrations(n, seed),
    eval_rows=lambda n: demos.eval_rows(n),
    rl_rows=lambda: read_tasks_file(ROWS),
    sft_examples=2000,
    eval_n=100,
    tool_events=("tool_success", "tool_failure"),
    sft={
        "sampling": {"max_tokens": 48},  # its evaluations: a whole reply fits
        "training": {
            "learning_rate": 3e-3, "batch_size": 16, "epochs": 10, "max_steps": 1000,
            "sync_every": 250, "checkpoint_every": 250, "group_size": 2,
        },
    },  # fmt: skip
    rl={
        "max_staleness": 1,
        "timeout_s": 120,
        "sampling": {"temperature": 1.0, "max_tokens": 48},
        "trained_agents": "solver",
        "eval_every": 10,
        "training": {
            "learning_rate": 3e-4, "batch_size": 8, "group_size": 8, "epochs": 2, "max_steps": 60,
            "credit": "equal", "kl_coef": 0.0,
        },
    },  # fmt: skip
)
