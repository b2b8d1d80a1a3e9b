"""`relayrl`: start the embedded stack, submit tasks, run the demo, manage API keys."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.client import GatewayClient, GatewayError, gateway_url, read_tasks_file
from services.cli.follow import RunFollower, follow
from services.cli.keyfile import API_KEY_FILE
from services.cli.nats_admin import credentials_path, init_command, nats_config_command
from services.cli.report import plot_rewards, write_csv
from services.cli.secrets import FILE_NAME as SECRETS_FILE
from services.cli.stack import Stack, StackConfig, read_state
from shared.apikeys import SCOPES, new_key
from shared.redact import redact_url

app = typer.Typer(help="relayrl: train LLM agents with GRPO over NATS JetStream.", no_args_is_help=True)
console = Console()


@contextlib.contextmanager
def exit_on_refusal(code: int) -> Iterator[None]:
    """Print a refusal from the gateway (its reason) and exit with `code`."""
    try:
        yield
    except GatewayError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(code) from None


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
    try:
        # The supervisor thread restarts what dies and prints a line per exit and restart;
        # this loop only waits for Ctrl-C or SIGTERM.
        while not stopping:
            time.sleep(0.2)
    finally:
        console.print("stopping…")
        stack.stop()
        console.print("stopped.")


def _print_event(text: str) -> None:
    colour = "yellow" if "restarted" in text or "stopped" in text else "red"
    console.print(f"[{colour}]{time.strftime('%H:%M:%S')} {text}")


def _start(config: StackConfig) -> Stack:
    with console.status("starting nats-server and services…"):
        stack = Stack(config, on_event=_print_event).start()
    table = Table(title="relayrl is up", show_header=True)
    table.add_column("component")
    table.add_column("where")
    table.add_row("gateway", stack.gateway_url)
    table.add_row("nats", redact_url(stack.nats_url))  # an external NATS_URL may hold credentials
    for i, url in enumerate(stack.inference_urls):
        table.add_row(f"inference {i + 1}", url)
    for svc in stack.services:
        table.add_row(f"  {svc.name}", f"pid {svc.proc.pid if svc.proc else '-'}, log {svc.log_path}")
    table.add_row("state", str(stack.state_dir / "stack.json"))
    table.add_row("API key", f"{stack.state_dir / API_KEY_FILE} (mode 0600; the CLI reads it there)")
    table.add_row("service secrets", f"{stack.state_dir / SECRETS_FILE} (mode 0600: inference token, weights key)")
    if stack.nats_credentials is not None:
        table.add_row("NATS users", f"{credentials_path(stack.state_dir)} (mode 0600: one per service + admin)")
    console.print(table)
    if stack.api_key_created:  # printed this once: the file is where it lives afterwards
        console.print("[bold]admin API key (project default), shown once:[/bold]")
        typer.echo(stack.api_key)  # plain: rich would wrap or style it
        console.print("send it as `Authorization: Bearer <key>`; `relayrl keys create` makes narrower ones")
    return stack


@app.command()
def submit(
    agent: str = typer.Option("copy", "--agent"),
    input: list[str] = typer.Option([], "--input", help="task input as JSON (repeatable)"),
    file: Optional[Path] = typer.Option(None, "--file", help="JSONL file, one task object per line"),
    group_size: int = typer.Option(1, "--group-size", min=1),
    run: Optional[str] = typer.Option(None, "--run", help="default: the key's project's ad-hoc bucket"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow progress until every task is done"),
    timeout_s: float = typer.Option(600.0, "--timeout"),
    gateway: Optional[str] = typer.Option(None, "--gateway", help="gateway URL (default: from stack.json)"),
    state_dir: Path = StateDir,
) -> None:
    """Send tasks to the gateway and show their progress."""
    where = {"run_id": run} if run else {}
    tasks = [{"agent": agent, "input": json.loads(i), "group_size": group_size, **where} for i in input]
    if file:
        for t in read_tasks_file(file):
            tasks.append({"agent": agent, "group_size": group_size, **where, **t})
    if not tasks:
        raise typer.BadParameter("give --input JSON or --file tasks.jsonl")
    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
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


DEMO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "echo_digit" / "train.yaml"


@app.command()
def demo(
    config_file: Path = typer.Option(DEMO_CONFIG, "--config", help="the run to train"),
    rollout_replicas: int = typer.Option(1, "--rollout-replicas", min=1),
    timeout_s: float = typer.Option(1200.0, "--timeout"),
    state_dir: Path = typer.Option(Path(".relayrl/demo"), "--state-dir"),
) -> None:
    """Start the embedded stack and train the tiny model from scratch on the toy task, live.

    Saves the per-step metrics (CSV) and the reward curve (PNG) under STATE_DIR/results.
    """
    config = load_run_config(config_file)
    config["run_id"] = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    stack = _start(StackConfig(state_dir=state_dir, gateway_port=0, rollout_replicas=rollout_replicas, log_format="json"))
    try:
        client = GatewayClient(stack.gateway_url, api_key=stack.api_key)
        started = time.monotonic()
        run = client.create_run(config)
        console.print(f"training run [bold]{run['run_id']}[/bold]: agent {config['agent']}, model {config['model']}, "
                      f"{run['rows']} rows, group size {config['training']['group_size']}, "
                      f"{config['training']['batch_size']} groups per step, max_staleness {config['max_staleness']}")
        follower = follow(client, run["run_id"], console, timeout_s)
        _summarise(follower, state_dir / "results")
        reached = _time_to(follower.steps, 0.8)
        took = time.monotonic() - started
        if reached is not None:
            console.print(f"[bold green]mean reward reached 0.8 at step {reached[0]}, {reached[1] / 60:.1f} min "
                          f"after the run started[/bold green] (whole run {took / 60:.1f} min); logs in {stack.logs}")
        else:
            console.print(f"[yellow]mean reward did not reach 0.8 in {took / 60:.1f} min; logs in {stack.logs}")
    finally:
        stack.stop()


def _time_to(steps: list[dict[str, Any]], target: float, window: int = 3) -> tuple[int, float] | None:
    """(step, seconds) where the mean reward over the last `window` steps first reached `target`."""
    rewards = [s["values"].get("reward_mean", 0.0) for s in steps]
    for i in range(window - 1, len(rewards)):
        if sum(rewards[i - window + 1 : i + 1]) / window >= target:
            return steps[i]["step"], steps[i].get("elapsed_s", 0.0)
    return None


def load_run_config(path: Path) -> dict[str, Any]:
    """A run config in YAML (or JSON); `dataset: file.jsonl` is read relative to the config."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise typer.BadParameter(f"{path} must hold a mapping (model, agent, training, ...)")
    if isinstance(config.get("dataset"), str):
        try:
            config["dataset"] = read_tasks_file((path.parent / config["dataset"]).resolve())
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"dataset: {exc}") from None
    return config


@app.command()
def train(
    config_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="run config (YAML)"),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="overrides run_id in the file"),
    wait: bool = typer.Option(True, "--follow/--no-follow", help="show live progress until the run ends"),
    timeout_s: float = typer.Option(24 * 3600.0, "--timeout"),
    out: Optional[Path] = typer.Option(None, "--out", help="write metrics.csv and reward.png here at the end"),
    gateway: Optional[str] = typer.Option(None, "--gateway", help="gateway URL (default: from stack.json)"),
    state_dir: Path = StateDir,
) -> None:
    """Start a training run on a running stack (`relayrl up`) and follow it."""
    config = load_run_config(config_file)
    if run_id:
        config["run_id"] = run_id
    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
    with exit_on_refusal(2):
        run = client.create_run(config)
    console.print(f"run [bold]{run['run_id']}[/bold]: {run['rows']} rows x {run['config']['training']['epochs']} epoch(s), "
                  f"~{run['total_steps']} steps, max_staleness {run['config']['max_staleness']}")
    if wait:
        follower = follow(client, run["run_id"], console, timeout_s)
        _summarise(follower, out)


def _summarise(follower: RunFollower, out: Optional[Path]) -> None:
    steps = follower.steps
    if not steps:
        console.print("no training steps recorded")
        return
    rewards = [s["values"].get("reward_mean", 0.0) for s in steps]
    window = max(1, len(rewards) // 10)
    console.print(f"{len(steps)} steps: mean reward {sum(rewards[:window]) / window:.3f} (first {window}) -> "
                  f"{sum(rewards[-window:]) / window:.3f} (last {window})")
    if out is not None:
        csv_path = write_csv(steps, out / "metrics.csv")
        png = plot_rewards(steps, out / "reward.png", f"run {follower.run_id}")
        console.print(f"metrics: {csv_path}\nreward curve: {png}")


@app.command()
def status(
    run_id: Optional[str] = typer.Argument(None, help="a run id; without it, list runs"),
    gateway: Optional[str] = typer.Option(None, "--gateway"),
    state_dir: Path = StateDir,
) -> None:
    """Show a run (state, version, step, reward, last metrics), or the stack's processes and the runs."""
    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
    try:
        if run_id is None:
            services = read_state(state_dir)
            if services:
                console.print(services_table(services))
            table = Table(title="runs")
            for col in ("run", "agent", "state", "step", "version", "reward"):
                table.add_column(col)
            for r in client.runs():
                reward = "-" if r.get("reward_mean") is None else f"{r['reward_mean']:.3f}"
                table.add_row(r["run_id"], r["config"]["agent"], r["state"], f"{r['step']}/{r['total_steps']}", str(r["version"]), reward)
            console.print(table)
            return
        run = client.run(run_id)
        metrics = client.metrics(run_id, after_step=max(run["step"] - 1, 0))
    except GatewayError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1) from None
    except httpx.HTTPError as exc:
        console.print(f"[red]gateway unreachable at {client.http.base_url}: {exc!r}")
        raise typer.Exit(1) from None
    table = Table(title=f"run {run_id}", show_header=False)
    for key in ("state", "step", "total_steps", "version", "groups_consumed", "rows", "reward_mean", "error"):
        table.add_row(key, str(run.get(key)))
    table.add_row("published groups", str(run["cursor"]["groups_published"]))
    if metrics:
        for key, value in sorted(metrics[-1]["values"].items()):
            table.add_row(f"  {key}", f"{value:.4g}")
    console.print(table)


def services_table(state: dict[str, Any]) -> Table:
    """The processes `relayrl up` supervises, as its stack.json describes them (alive checked now)."""
    table = Table(title="services (relayrl up)")
    for col in ("service", "pid", "alive", "restarts", "last exit", "log"):
        table.add_column(col)
    services = state.get("services") or {name: {"pid": pid} for name, pid in dict(state.get("pids") or {}).items()}
    for name, info in services.items():
        pid = info.get("pid")
        alive = pid_alive(pid) if isinstance(pid, int) else False
        last = info.get("last_exit")
        table.add_row(
            name, str(pid or "-"), "[green]yes" if alive else "[red]no", str(info.get("restarts", 0)),
            "-" if last is None else str(last), str(info.get("log", "")),
        )  # fmt: skip
    return table


def pid_alive(pid: int) -> bool:
    """A running process with this pid; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) succeeding is the best we know


@app.command()
def replay(
    run_id: str = typer.Argument(..., help="the run whose stored groups are re-published"),
    into: Optional[str] = typer.Option(None, "--into", help="train a new run on them (default: the same run)"),
    versions: Optional[str] = typer.Option(None, "--versions", help="A:B, only steps whose version is in [A, B]"),
    min_reward: Optional[float] = typer.Option(None, "--min-reward", help="only groups with at least this mean reward"),
    gateway: Optional[str] = typer.Option(None, "--gateway"),
    state_dir: Path = StateDir,
) -> None:
    """Re-publish a run's stored groups, in the order its trainer consumed them."""
    body: dict[str, Any] = {"into": into, "min_reward": min_reward}
    if versions:
        try:
            a, b = (int(x) for x in versions.split(":"))
        except ValueError:
            raise typer.BadParameter("--versions takes A:B, e.g. 0:20") from None
        body["versions"] = [a, b]
    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
    with exit_on_refusal(1):
        result = client.replay(run_id, body)
    console.print(f"re-published {result['groups']} groups of {run_id} into {result['into']}")


@app.command("eval")
def evaluate(
    run_id: str = typer.Argument(..., help="the run to evaluate, or whose evaluations to show"),
    rows: Optional[Path] = typer.Option(None, "--rows", help="JSONL of rows to evaluate (default: the run's eval_dataset)"),
    version: Optional[int] = typer.Option(None, "--version", help="policy version (default: the current one)"),
    show: bool = typer.Option(False, "--show", help="only show the results per version"),
    wait_s: float = typer.Option(600.0, "--wait-s", help="how long to wait for the evaluation to finish"),
    accuracy_threshold: float = typer.Option(1.0, "--accuracy-threshold", help="correct when reward >= this"),
    gateway: Optional[str] = typer.Option(None, "--gateway"),
    state_dir: Path = StateDir,
) -> None:
    """Evaluate a run greedily at a policy version, then show its evaluations per version."""
    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
    try:
        if not show:
            body: dict[str, Any] = {"version": version}
            if rows is not None:
                body["rows"] = read_tasks_file(rows)
            started = client.start_eval(run_id, body)
            console.print(f"evaluating {len(started['tasks'])} rows of {run_id} at version {started['version']}")
            _follow(client, started["tasks"], wait_s)
        summaries = client.evals(run_id, accuracy_threshold)
    except (GatewayError, ValueError) as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1) from None
    table = Table(title=f"evaluations of {run_id}")
    for column in ("version", "rollouts", "ok", "reward_mean", "accuracy"):
        table.add_column(column)
    for s in summaries:
        table.add_row(str(s["version"]), str(s["rollouts"]), str(s["ok"]), f"{s['reward_mean']:.3f}", f"{s['accuracy']:.3f}")
    console.print(table)


@app.command()
def sft(
    from_run: str = typer.Option(..., "--from-run", help="fine-tune on this ended run's stored trajectories"),
    min_reward: Optional[float] = typer.Option(None, "--min-reward", help="only trajectories with at least this reward"),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="the new run's id (default: <from-run>-sft)"),
    learning_rate: float = typer.Option(1e-3, "--learning-rate"),
    batch_size: int = typer.Option(16, "--batch-size", help="trajectories per optimizer step"),
    epochs: int = typer.Option(1, "--epochs"),
    wait: bool = typer.Option(True, "--follow/--no-follow"),
    timeout_s: float = typer.Option(24 * 3600.0, "--timeout"),
    gateway: Optional[str] = typer.Option(None, "--gateway"),
    state_dir: Path = StateDir,
) -> None:
    """Rejection-sampling fine-tuning: SFT on a past run's trajectories (exact recorded tokens),
    keeping its model, agent and trained roles. Start an RL run from it with `init_from`."""
    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
    with exit_on_refusal(2):
        source = client.run(from_run)["config"]
        run = client.create_run({
            "run_id": run_id or f"{from_run}-sft", "model": source["model"], "agent": source["agent"],
            "algorithm": "sft", "sft": {"from_run": from_run, "min_reward": min_reward},
            "trained_roles": source["trained_roles"], "seed": source["seed"],
            "training": {"learning_rate": learning_rate, "batch_size": batch_size, "epochs": epochs},
        })  # fmt: skip
    console.print(f"run [bold]{run['run_id']}[/bold]: sft on {run['rows']} trajectories of {from_run}, ~{run['total_steps']} steps")
    if wait:
        follow(client, run["run_id"], console, timeout_s)


@app.command("export-model")
def export_model_command(
    run_id: str = typer.Argument(..., help="the run whose weights to save"),
    out: Path = typer.Option(..., "--out", help="the Hugging Face checkpoint directory to write"),
    version: Optional[int] = typer.Option(None, "--version", help="a kept version (default: the latest)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty OUT"),
    gateway: Optional[str] = typer.Option(None, "--gateway"),
    state_dir: Path = StateDir,
) -> None:
    """Save a run's weights with its base model's config and tokenizer as a Hugging Face
    checkpoint directory, usable as any run's (or inference's) `model:`."""
    from services.cli.export_model import ExportError, export_model

    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
    try:
        saved = export_model(client, run_id, out, version=version, force=force)
    except (ExportError, GatewayError) as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1) from None
    console.print(f"saved {run_id} version {saved['version']} (base {saved['base_model']}) to {saved['path']}")


@app.command()
def reproduce(
    study: str = typer.Argument(..., help="calculator or text-to-sql"),
    out: Path = typer.Option(..., "--out", help="results.json, metrics.csv and accuracy.png go here"),
    sft_steps: Optional[int] = typer.Option(None, "--sft-steps", help="cap the warm start's steps (default: the study's)"),
    rl_steps: Optional[int] = typer.Option(None, "--rl-steps", help="cap the GRPO run's steps (default: the study's)"),
    eval_rows: Optional[int] = typer.Option(None, "--eval-rows", help="held-out rows evaluated (default: the study's)"),
    seed: int = typer.Option(0, "--seed"),
    timeout_s: float = typer.Option(3600.0, "--timeout"),
) -> None:
    """Reproduce one of the seeds' studies on the embedded stack: SFT warm start, baseline
    evaluation, GRPO through the real services, final evaluation."""
    from services.cli.reproduce import STUDY_NAMES, load_study, run_study, sized

    if study not in STUDY_NAMES:
        raise typer.BadParameter(f"unknown study {study!r}; choose one of {', '.join(STUDY_NAMES)}")
    chosen = sized(load_study(study), sft_steps=sft_steps, rl_steps=rl_steps, eval_n=eval_rows, seed=seed)  # type: ignore[arg-type]
    signal.signal(signal.SIGTERM, _interrupt)  # a kill stops the study's stack too (its finally)
    results = run_study(chosen, out, console, timeout_s)
    console.print(
        f"[bold]{study}[/bold]: held-out accuracy {results['baseline_accuracy']:.3f} -> {results['final_accuracy']:.3f} "
        f"in {results['steps']} GRPO steps, {results['wall_s'] / 60:.1f} min in all; {out / 'results.json'}"
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# The NATS admin step and the server's users (services/cli/nats_admin.py).
app.command("init")(init_command)
app.command("nats-config")(nats_config_command)


keys = typer.Typer(help="API keys of the gateway (needs an admin key).", no_args_is_help=True)
app.add_typer(keys, name="keys")
Gateway = typer.Option(None, "--gateway", help="gateway URL (default: from stack.json)")


@keys.command("generate")
def keys_generate() -> None:
    """Print a new key without storing it anywhere: set it as RELAYRL_BOOTSTRAP_KEY (compose,
    Kubernetes) and the gateway installs it as the default project's admin key at start."""
    typer.echo(new_key()[2])


@keys.command("create")
def keys_create(
    name: str = typer.Option("", "--name", help="what the key is for"),
    scope: str = typer.Option("write", "--scope", help=f"one of {', '.join(SCOPES)}"),
    project: Optional[str] = typer.Option(None, "--project", help="default: the admin key's own project"),
    gateway: Optional[str] = Gateway,
    state_dir: Path = StateDir,
) -> None:
    """Make a key; its text is printed this once (only its hash is stored)."""
    if scope not in SCOPES:
        raise typer.BadParameter(f"scope must be one of {', '.join(SCOPES)}")
    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
    with exit_on_refusal(1):
        made = client.create_key(name=name, scope=scope, project=project)
    console.print(f"key {made['key_id']} (project {made['project']}, scope {made['scope']}), shown once:")
    typer.echo(made["key"])


@keys.command("list")
def keys_list(
    project: Optional[str] = typer.Option(None, "--project", help="default: the admin key's own project"),
    gateway: Optional[str] = Gateway,
    state_dir: Path = StateDir,
) -> None:
    """The project's keys (never their secrets)."""
    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
    with exit_on_refusal(1):
        found = client.list_keys(project)
    table = Table(title="API keys")
    for col in ("key id", "project", "scope", "name", "created", "revoked"):
        table.add_column(col)
    for k in found:
        revoked = time.strftime("%Y-%m-%d %H:%M", time.localtime(k["revoked_at"])) if k["revoked_at"] else ""
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"]))
        table.add_row(k["key_id"], k["project"], k["scope"], k["name"], created, revoked)
    console.print(table)


@keys.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="the key's id (`relayrl keys list`)"),
    gateway: Optional[str] = Gateway,
    state_dir: Path = StateDir,
) -> None:
    """Revoke a key: refused at once by the gateway that revoked it, within its key cache time by others."""
    client = GatewayClient(gateway_url(gateway, state_dir), state_dir=state_dir)
    with exit_on_refusal(1):
        revoked = client.revoke_key(key_id)
    console.print(f"revoked {revoked['key_id']} (project {revoked['project']}, scope {revoked['scope']})")


if __name__ == "__main__":
    app()
