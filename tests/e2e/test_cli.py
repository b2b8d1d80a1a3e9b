"""`relayrl up` / `relayrl submit` as a user runs them: real processes, stack.json, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.cli.app import load_run_config
from services.cli.client import read_tasks_file
from shared.messages import RunConfig

pytestmark = pytest.mark.e2e


def relayrl(*args: str, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args], **kw)


def test_up_writes_stack_json_serves_and_stops_cleanly_on_sigterm(tmp_path: Path):
    state = tmp_path / "state"
    proc = relayrl("up", "--gateway-port", "0", "--rollout-replicas", "2", "--state-dir", str(state),
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stack_json = state / "stack.json"
    deadline = time.monotonic() + 180
    while not stack_json.exists():
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "relayrl up did not become ready"
        time.sleep(0.2)
    info = json.loads(stack_json.read_text())
    assert info["nats_url"].startswith("nats://127.0.0.1:")
    assert {"gateway", "store", "inference", "rollout-1", "rollout-2", "nats"} <= set(info["pids"])
    assert httpx.get(info["gateway_url"] + "/readyz", timeout=5).status_code == 200

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('# two tasks\n{"input": {"size_bytes": 100}}\n\n{"input": {}, "group_size": 2}\n')
    submit = subprocess.run(
        [sys.executable, "-m", "services.cli", "submit", "--agent", "null", "--file", str(tasks), "--state-dir", str(state)],
        capture_output=True, text=True, timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "submitted 2 task(s), 3 rollout(s)" in submit.stdout and "3 rollouts" in submit.stdout

    # The first start made an admin key only its owner can read; the CLI used it from there.
    key_file = state / "api_key"
    admin = key_file.read_text().strip()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert httpx.get(info["gateway_url"] + "/v1/runs", timeout=5).status_code == 401
    reader = _cli("keys", "create", "--name", "ci", "--scope", "read", "--state-dir", str(state))
    key = reader.strip().splitlines()[-1]
    assert key.startswith("rrl_") and key != admin
    as_reader = {"Authorization": f"Bearer {key}"}
    assert httpx.get(info["gateway_url"] + "/v1/runs", headers=as_reader, timeout=5).status_code == 200
    assert httpx.post(info["gateway_url"] + "/v1/tasks", json={"agent": "null", "input": {}},
                      headers=as_reader, timeout=5).status_code == 403
    key_id = key.split("_")[1]
    listed = _cli("keys", "list", "--state-dir", str(state), env={**os.environ, "COLUMNS": "200"})
    assert key_id in listed and "bootstrap" in listed and key not in listed and admin not in listed
    assert "revoked" in _cli("keys", "revoke", key_id, "--state-dir", str(state))
    assert httpx.get(info["gateway_url"] + "/v1/runs", headers=as_reader, timeout=5).status_code == 401

    # A worker killed from outside comes back: stack.json counts it and `relayrl status` shows it.
    os.kill(info["pids"]["rollout-1"], signal.SIGKILL)
    while (now := json.loads(stack_json.read_text()))["services"]["rollout-1"]["restarts"] < 1:
        assert time.monotonic() < deadline + 60, "rollout-1 was not restarted"
        time.sleep(0.2)
    assert now["pids"]["rollout-1"] != info["pids"]["rollout-1"] and _alive(now["pids"]["rollout-1"])
    status = subprocess.run(
        [sys.executable, "-m", "services.cli", "status", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )
    assert status.returncode == 0, status.stdout + status.stderr
    row = next(line for line in status.stdout.splitlines() if "rollout-1" in line)
    assert str(now["pids"]["rollout-1"]) in row and "yes" in row and "-9" in row, status.stdout

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert "rollout-1 exited (signal SIGKILL)" in out and "restart #1" in out, out
    assert out.count(admin) == 1, "the admin key is printed once, on the start that made it"
    for name, pid in {**info["pids"], **now["pids"]}.items():
        assert not _alive(pid), f"{name} (pid {pid}) still running after relayrl up stopped"
    assert not stack_json.exists()


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    """`relayrl <args>`'s output; fails the test with it when the command fails."""
    done = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as stopped.
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_tasks_file_errors_name_the_line(tmp_path: Path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"input": {}}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_tasks_file(f)


@pytest.mark.parametrize("example", ["echo_digit", "text_to_sql", "calculator", "multihop_rag", "customer_service"])
def test_every_example_config_is_accepted_as_relayrl_train_sends_it(example: str):
    """`relayrl train` reads the YAML and posts it as JSON: what the gateway gets must validate."""
    config = load_run_config(Path(__file__).parents[2] / "examples" / example / "train.yaml")
    run = RunConfig.model_validate(json.loads(json.dumps(config)))
    assert run.dataset and run.agent
    if run.runtime.air_enabled:
        assert run.runtime.air_values()
