"""`relayrl reproduce <study>`: one of the seeds' studies end to end on the embedded stack.

    SFT warm start on the example's demonstrations (an `algorithm: sft` run)
    -> evaluation of its last version on the held-out split (the baseline: a GRPO run with
       `init_from` starts at exactly these weights)
    -> a GRPO run through the real services (gateway pacing, rollout workers, inference,
       store, trainer) from those weights, evaluated every `eval_every` versions
    -> the evaluation of its last version (the final figure).

A `Study` (each example's `study.py`) says what to run: the model preset, the demonstrations,
the held-out rows, the RL rows and both run configs. `run_study` writes to `out`:
`results.json` (baseline and final accuracy, tool-call success, the seeds' episode figures,
the curve, steps, wall time), `metrics.csv` (the GRPO run's steps), `sft_metrics.csv`, and
`accuracy.png` (held-out accuracy against step, next to training reward).

Evaluations are greedy (temperature 0), as every relayrl evaluation is. An evaluation asked
for at version v while training moves on may run partly on newer weights: each point of the
curve carries its `off_version` count; the baseline (an ended SFT run) and the final version
(an ended GRPO run) cannot move, so those two figures are exact.
"""

from __future__ import annotations

import importlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, get_args

from rich.console import Console

from services.cli.client import GatewayClient
from services.cli.follow import RunFollower, follow
from services.cli.report import write_csv
from services.cli.stack import Stack, StackConfig

StudyName = Literal["calculator", "text-to-sql"]
STUDY_NAMES: tuple[StudyName, ...] = get_args(StudyName)
# Where each study is defined (imported on use: a study pulls in its example's code).
_MODULES: dict[StudyName, str] = {"calculator": "examples.calculator.study", "text-to-sql": "examples.text_to_sql.study"}

Rows = list[dict[str, Any]]
_NEVER = 10**9  # an eval_every no run reaches


@dataclass(frozen=True)
class Study:
    """What one reproduction runs; sizes are the defaults `relayrl reproduce` overrides."""

    name: StudyName
    agent: str
    model: str  # a model every process resolves the same way (a `tiny:<preset>` is built from code)
    demonstrations: Callable[[int, int], Rows]  # (n, seed) -> SFT conversations
    eval_rows: Callable[[int], Rows]  # n -> held-out agent inputs, never among demonstrations or RL rows
    rl_rows: Callable[[], Rows]  # the GRPO run's agent inputs
    sft: dict[str, Any]  # run config of the warm start (algorithm sft; `dataset` is filled in)
    rl: dict[str, Any]  # run config of the GRPO run (`dataset`, `eval_dataset`, `init_from` filled in)
    sft_examples: int = 2000
    eval_n: int = 100
    # The warm start is picked by evaluation, not by a fixed length: SFT accuracy jumps steeply
    # (bench/sft_sizes.py), so SFT runs in stages (`sft_stage_steps`, each continuing the last
    # with init_from) until the held-out accuracy of a stage's last version reaches
    # `baseline_floor` (the seeds' baselines sit around 15-55%), at most `max_sft_stages`.
    sft_stage_steps: int = 100
    baseline_floor: float = 0.15
    max_sft_stages: int = 6
    # The event names whose ratio is the study's tool-call success (None: not a tool study).
    tool_events: tuple[str, str] | None = None
    stack: dict[str, Any] = field(default_factory=dict)  # StackConfig overrides


def load_study(name: StudyName) -> Study:
    if name not in _MODULES:
        raise ValueError(f"unknown study {name!r}; choose one of {list(STUDY_NAMES)}")
    study = importlib.import_module(_MODULES[name]).STUDY
    assert isinstance(study, Study)
    return study


def sized(study: Study, *, sft_steps: int | None, rl_steps: int | None, eval_n: int | None, seed: int) -> Study:
    """The study with the sizes given on the command line (None keeps the study's)."""
    sft = {**study.sft, "seed": seed, "training": dict(study.sft["training"])}
    rl = {**study.rl, "seed": seed, "training": dict(study.rl["training"])}
    if sft_steps is not None:
        sft["training"]["max_steps"] = sft_steps
    if rl_steps is not None:
        rl["training"]["max_steps"] = rl_steps
    return replace(study, sft=sft, rl=rl, eval_n=eval_n or study.eval_n)


@dataclass
class EvalPoint:
    version: int
    accuracy: float
    rollouts: int
    off_version: int
    tool_success: float | None
    tool_use: float | None
    calls_per_episode: float
    response_tokens: float

    @classmethod
    def of(cls, summary: dict[str, Any], tool_events: tuple[str, str] | None) -> EvalPoint:
        success = use = None
        if tool_events is not None:
            ok, bad = (summary["events"].get(e, 0) for e in tool_events)
            success = ok / (ok + bad) if ok + bad else 0.0
            use = summary["rollouts_with"].get(tool_events[0], 0) / summary["rollouts"]
        return cls(
            version=summary["version"],
            accuracy=summary["accuracy"],
            rollouts=summary["rollouts"],
            off_version=summary["off_version"],
            tool_success=success,
            tool_use=use,
            calls_per_episode=summary["calls_mean"],
            response_tokens=summary["response_tokens_mean"],
        )


def run_study(study: Study, out: Path, console: Console, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run `study` on a fresh embedded stack under `out`; returns (and writes) the results."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    held_out = study.eval_rows(study.eval_n)
    with study_stack(study, out, console) as (client, config):
        warm = warm_start(client, study, f"{study.name}-sft-{stamp}", held_out, console, timeout_s)
        rl_config = {**study.rl, "run_id": f"{study.name}-rl-{stamp}"}
        final, curve, rl = train_from(client, study, warm, rl_config, held_out, console, timeout_s)
    results = _results(study, warm, final, curve, rl, time.monotonic() - started, config, rl_config)
    _write(out, results, warm.sft, rl)
    return results


@dataclass
class WarmStart:
    """An ended SFT run and its held-out evaluation: where every GRPO run of a study starts."""

    run_id: str
    baseline: EvalPoint
    sft: RunFollower
    wall_s: float


@contextmanager
def study_stack(study: Study, out: Path, console: Console) -> Iterator[tuple[GatewayClient, StackConfig]]:
    """A fresh embedded stack serving the study's model, stopped on the way out."""
    config = StackConfig(state_dir=out / "stack", gateway_port=0, model=study.model, log_format="json", **study.stack)
    with console.status(f"starting the stack ({study.model})…"):
        stack = Stack(config).start()
    try:
        yield GatewayClient(stack.gateway_url, timeout_s=60.0, api_key=stack.api_key), config
    finally:
        stack.stop()


def warm_start(
    client: GatewayClient, study: Study, run_id: str, held_out: Rows, console: Console, timeout_s: float
) -> WarmStart:
    """SFT on the study's demonstrations, stage by stage until a stage's last version reaches
    the study's `baseline_floor` on `held_out` (see `Study`); that version is the warm start."""
    started = time.monotonic()
    demos = study.demonstrations(study.sft_examples, int(study.sft.get("seed", 0)) + 1)
    # A stored dataset, not inline rows: a run's config travels with every read of the run
    # (the trainer polls its state), so thousands of conversations inline would be re-sent
    # each time.
    client.put_dataset(run_id, demos)
    console.print(f"[bold]SFT warm start[/bold] {run_id}: {len(demos)} demonstrations")
    source: str | None = None
    steps: list[dict[str, Any]] = []
    for stage in range(study.max_sft_stages):
        stage_id = f"{run_id}-{stage}"
        training = dict(study.sft["training"])
        if stage:
            training["max_steps"] = study.sft_stage_steps
        # eval_every beyond the run's length: the pacer evaluates the stage's version 0 and, once
        # it finished, its last version, which nothing changes any more.
        client.create_run({**study.sft, "training": training, "run_id": stage_id, "agent": study.agent,
                           "model": study.model, "algorithm": "sft", "dataset_name": run_id, "init_from": source,
                           "seed": int(study.sft.get("seed", 0)) + stage, "eval_dataset": held_out,
                           "eval_every": _NEVER})  # fmt: skip
        follower = follow(client, stage_id, console, timeout_s)
        _require_finished(client, stage_id)
        offset = steps[-1]["step"] if steps else 0
        steps += [{**m, "step": m["step"] + offset} for m in follower.steps]
        version = client.run(stage_id)["version"]
        baseline = EvalPoint.of(_wait_eval(client, stage_id, version, len(held_out), timeout_s), study.tool_events)
        console.print(f"SFT stage {stage} ({offset + version} steps in all): held-out accuracy {baseline.accuracy:.3f}"
                      + _tool_text(baseline))  # fmt: skip
        source = stage_id
        if baseline.accuracy >= study.baseline_floor:
            break
    assert source is not None
    sft = RunFollower(client, source)
    sft.steps = steps
    return WarmStart(source, baseline, sft, time.monotonic() - started)


def train_from(
    client: GatewayClient,
    study: Study,
    warm: WarmStart,
    rl_config: dict[str, Any],
    held_out: Rows,
    console: Console,
    timeout_s: float,
) -> tuple[EvalPoint, list[EvalPoint], RunFollower]:
    """A GRPO run (`rl_config`, the study's rl config with any changes) from the warm start,
    through the stack; its final held-out evaluation, the whole curve, and its steps."""
    run_id = rl_config["run_id"]
    console.print(f"[bold]GRPO[/bold] {run_id} from {warm.run_id}")
    client.create_run({**rl_config, "agent": study.agent, "model": study.model, "init_from": warm.run_id,
                       "dataset": study.rl_rows(), "eval_dataset": held_out})  # fmt: skip
    rl = follow(client, run_id, console, timeout_s)
    _require_finished(client, run_id)
    final_version = client.run(run_id)["version"]
    _wait_eval(client, run_id, final_version, len(held_out), timeout_s)
    curve = [EvalPoint.of(s, study.tool_events) for s in client.evals(run_id)]
    final = next(p for p in curve if p.version == final_version)
    console.print(f"final (version {final_version}): held-out accuracy {final.accuracy:.3f}" + _tool_text(final))
    return final, curve, rl


def _require_finished(client: GatewayClient, run_id: str) -> None:
    run = client.run(run_id)
    if run["state"] != "finished":
        raise RuntimeError(f"run {run_id} {run['state']}: {run.get('error') or 'no reason recorded'}")


def _wait_eval(client: GatewayClient, run_id: str, version: int, rows: int, timeout_s: float) -> dict[str, Any]:
    """The evaluation summary of `version` once all `rows` of it are stored."""
    deadline = time.monotonic() + timeout_s
    while True:
        for summary in client.evals(run_id):
            if summary["version"] == version and summary["rollouts"] >= rows:
                return summary
        if time.monotonic() > deadline:
            raise TimeoutError(f"the evaluation of {run_id} at version {version} did not finish in {timeout_s:.0f}s")
        time.sleep(1.0)


def _tool_text(point: EvalPoint) -> str:
    if point.tool_success is None:
        return ""
    return f", tool-call success {point.tool_success:.3f}, rollouts using the tool {point.tool_use:.3f}"


def _results(
    study: Study,
    warm: WarmStart,
    final: EvalPoint,
    curve: list[EvalPoint],
    rl: RunFollower,
    wall_s: float,
    stack: StackConfig,
    rl_config: dict[str, Any],
) -> dict[str, Any]:
    baseline, sft = warm.baseline, warm.sft
    steps_to_version = {s["version"]: s["step"] for s in rl.steps}
    return {
        "study": study.name,
        "model": study.model,
        "baseline_accuracy": baseline.accuracy,
        "final_accuracy": final.accuracy,
        "baseline_tool_success": baseline.tool_success,
        "final_tool_success": final.tool_success,
        "baseline_tool_use": baseline.tool_use,
        "final_tool_use": final.tool_use,
        "baseline_calls_per_episode": baseline.calls_per_episode,
        "final_calls_per_episode": final.calls_per_episode,
        "baseline_response_tokens": baseline.response_tokens,
        "final_response_tokens": final.response_tokens,
        "steps": rl.steps[-1]["step"] if rl.steps else 0,
        "sft_steps": sft.steps[-1]["step"] if sft.steps else 0,
        "sft_examples": study.sft_examples,
        "eval_rows": baseline.rollouts,
        "wall_s": round(wall_s, 1),
        "sft_wall_s": round(warm.wall_s, 1),
        "curve": [{**p.__dict__, "step": steps_to_version.get(p.version, p.version)} for p in curve],
        "baseline": baseline.__dict__,
        "rl_config": {k: v for k, v in rl_config.items() if k not in ("dataset", "eval_dataset")},
        "torch_threads": stack.torch_threads,
    }


def _write(out: Path, results: dict[str, Any], sft: RunFollower, rl: RunFollower) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_csv(rl.steps, out / "metrics.csv")
    write_csv(sft.steps, out / "sft_metrics.csv")
    plot_study(results, rl.steps, out / "accuracy.png")


def plot_study(results: dict[str, Any], steps: list[dict[str, Any]], path: Path) -> Path:
    """Held-out accuracy (greedy) against RL step, next to the training reward."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    curve = results["curve"]
    ax.plot([p["step"] for p in curve], [p["accuracy"] for p in curve], marker="o", label="held-out accuracy (greedy)")
    if curve and curve[0].get("tool_success") is not None:
        ax.plot([p["step"] for p in curve], [p["tool_success"] for p in curve], marker=".", alpha=0.6,
                label="held-out tool-call success")  # fmt: skip
    ax.plot([s["step"] for s in steps], [s["values"].get("reward_mean", 0.0) for s in steps], alpha=0.5,
            label="training reward (sampled)")  # fmt: skip
    ax.set_xlabel("GRPO step (version)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{results['study']}: {results['baseline_accuracy']:.2f} -> {results['final_accuracy']:.2f} held-out")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
