"""The calculator study through the whole stack, as `relayrl reproduce calculator` runs it:
SFT warm start picked by evaluation, GRPO through the real services, held-out evaluations.

Two sizes:
- In every run of the suite, a CI-sized study (10 GRPO steps, 80 held-out rows) checks what
  holds every time: the staged SFT warm start reaches the study's floor on held-out rows (SFT
  learns through the pipeline), GRPO from it runs through the services without wrecking it,
  and the files a user reads are written. That GRPO learns through the pipeline is checked
  in every run by tests/e2e/test_training_e2e.py (echo-digit, from random init).
- The held-out gain of GRPO on the calculator is opt-in (`RELAYRL_STUDY_TESTS=1`): measured
  on this 2-core machine in five runs (warm starts at 0.16-0.41, docs/benchmarks.md), held-out
  gains after 10-40 GRPO steps ranged from +0.01 to +0.20: too close to the ±0.05 noise of
  80-100 rows to be a reliable check inside the suite's time (a 15-step version failed CI
  twice). The full study (56-103 steps) gained +0.26 and +0.16.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from services.cli.reproduce import load_study, run_study, sized

pytestmark = pytest.mark.e2e

# GRPO may not cost the warm start more than this (two standard errors of one accuracy on 80
# rows): a sign error or a broken advantage would send held-out accuracy toward 0 in 10 steps.
WRECK = 0.11
MARGIN = 0.05


def _study(tmp_path: Path, rl_steps: int | None, eval_n: int) -> tuple[dict, Path, object]:
    study = sized(load_study("calculator"), sft_steps=None, rl_steps=rl_steps, eval_n=eval_n, seed=0)
    out = tmp_path / "study"
    return run_study(study, out, Console(file=io.StringIO(), width=120), timeout_s=900), out, study


def test_a_short_calculator_study_warm_starts_above_its_floor_and_trains_without_losing_it(tmp_path: Path) -> None:
    results, out, study = _study(tmp_path, rl_steps=10, eval_n=80)

    assert results["baseline_accuracy"] >= study.baseline_floor, "the warm start never reached the floor"
    assert results["final_accuracy"] >= results["baseline_accuracy"] - WRECK, json.dumps(results["curve"], indent=1)
    assert results["steps"] == 10 and results["eval_rows"] == 80
    # The seeds' figures are there for both ends, and the files a user reads.
    assert results["baseline_tool_success"] is not None and results["final_calls_per_episode"] >= 1.0
    assert json.loads((out / "results.json").read_text())["final_accuracy"] == results["final_accuracy"]
    assert (out / "metrics.csv").read_text().count("\n") == 11  # header + one row per step
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "sft_metrics.csv").exists()


@pytest.mark.skipif(
    os.environ.get("RELAYRL_STUDY_TESTS") != "1",
    reason="opt-in (RELAYRL_STUDY_TESTS=1, ~12 min): the held-out gain of a CI-sized GRPO run is within noise of its check",
)
def test_the_calculator_study_raises_held_out_accuracy(tmp_path: Path) -> None:
    results, _, _ = _study(tmp_path, rl_steps=None, eval_n=100)
    assert results["final_accuracy"] >= results["baseline_accuracy"] + MARGIN, json.dumps(results["curve"], indent=1)
