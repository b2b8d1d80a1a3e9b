"""A short calculator study through the whole stack, as `relayrl reproduce calculator` runs it:
SFT warm start picked by evaluation, GRPO through the real services, held-out evaluations.

The CI-sized version of the study: the full warm start (it is short) and 15 GRPO steps instead
of 60, 80 held-out rows instead of 100. What it checks is improvement on held-out rows, not a
figure: the final greedy accuracy must beat the warm start's by at least `MARGIN`. Measured
with the full study (docs/benchmarks.md), accuracy rose 0.29 -> 0.45 within the first 10
GRPO steps; on 80 rows one accuracy's standard error is about 0.055, so a true gain of ~0.15
misses a 0.05 margin about once in twenty runs at worst, and a study that does not learn
(gain ~0) clears it only by chance.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from services.cli.reproduce import load_study, run_study, sized

pytestmark = pytest.mark.e2e

MARGIN = 0.05


def test_a_short_calculator_study_raises_held_out_accuracy(tmp_path: Path) -> None:
    study = sized(load_study("calculator"), sft_steps=None, rl_steps=15, eval_n=80, seed=0)
    out = tmp_path / "study"
    results = run_study(study, out, Console(file=io.StringIO(), width=120), timeout_s=900)

    assert results["baseline_accuracy"] >= study.baseline_floor, "the warm start never reached the floor"
    assert results["final_accuracy"] >= results["baseline_accuracy"] + MARGIN, json.dumps(results["curve"], indent=1)
    assert results["steps"] == 15 and results["eval_rows"] == 80
    # The seeds' figures are there for both ends, and the files a user reads.
    assert results["baseline_tool_success"] is not None and results["final_calls_per_episode"] >= 1.0
    assert json.loads((out / "results.json").read_text())["final_accuracy"] == results["final_accuracy"]
    assert (out / "metrics.csv").read_text().count("\n") == 16  # header + one row per step
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "sft_metrics.csv").exists()
