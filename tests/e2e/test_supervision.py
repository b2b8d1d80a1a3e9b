"""The embedded stack supervises its processes: what dies on its own comes back (nats-server on
the same port and store dir), with doubling backoff and a restart count in stack.json; what
the owner stops stays stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import nats
import pytest
from typer.testing import CliRunner

from services.cli.app import app
from services.cli.client import GatewayClient
from services.cli.stack import Stack, StackConfig

pytestmark = pytest.mark.e2e


@pytest.fixture
def null_stack(tmp_path: Path) -> Iterator[Stack]:
    """No model: one rollout worker runs the `null` agent. Quick backoff, short healthy window."""
    config = StackConfig(
        state_dir=tmp_path / "stack", gateway_port=0, log_format="console", inference_replicas=0, trainers=0,
        rollout_ack_wait_s=3.0, backoff_s=0.3, backoff_max_s=1.2, healthy_after_s=4.0,
    )  # fmt: skip
    stack = Stack(config).start()
    yield stack
    stack.stop()


def stack_json(stack: Stack) -> dict[str, Any]:
    return json.loads((stack.state_dir / "stack.json").read_text())


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s}s"
        time.sleep(0.1)


def restarted(stack: Stack, name: str, count: int) -> dict[str, Any] | None:
    info = stack_json(stack)["services"][name]
    return info if info["restarts"] >= count and info["alive"] else None


def test_a_killed_worker_and_nats_server_come_back_and_serve(null_stack: Stack):
    stack = null_stack
    before = stack_json(stack)
    assert before["services"]["rollout-1"]["restarts"] == 0 and before["supervisor_pid"] == os.getpid()

    # A crash from outside the stack (kill -9 from a shell): the supervisor restarts it.
    os.kill(before["pids"]["rollout-1"], signal.SIGKILL)
    info = wait_for(lambda: restarted(stack, "rollout-1", 1), what="rollout-1 restarted")
    assert info["pid"] != before["pids"]["rollout-1"] and info["last_exit"] == -signal.SIGKILL
    client = GatewayClient(stack.gateway_url, api_key=stack.api_key)
    client.submit([{"agent": "null", "input": {}, "task_id": "after-worker-restart"}])
    assert client.wait(["after-worker-restart"], timeout_s=90)["after-worker-restart"]["status"] == "done"

    # nats-server: same port, same store dir (the streams survive), new pid.
    url = stack.nats_url
    stack.kill("nats", signal.SIGKILL)
    info = wait_for(lambda: restarted(stack, "nats", 1), what="nats restarted")
    assert info["pid"] != before["pids"]["nats"] and stack.nats_url == url == stack_json(stack)["nats_url"]

    async def streams() -> set[str]:
        nc = await nats.connect(stack.admin_url, connect_timeout=5)
        try:
            return {s.config.name for s in await nc.jetstream().streams_info()}
        finally:
            await nc.close()

    assert "TASKS" in asyncio.run(streams())
    kinds = [(e["service"], e["kind"]) for e in stack.events]
    assert kinds.count(("rollout-1", "restarted")) == 1 and kinds.count(("nats", "restarted")) == 1
    assert "restart #1" in (stack.logs / "supervisor.log").read_text()


def test_backoff_doubles_for_a_crash_loop_up_to_the_bound(null_stack: Stack):
    # A "service" that exits at once with code 2, every time.
    crasher = null_stack.add("crasher", "json.tool", ["/nonexistent/file.json"])
    wait_for(lambda: stack_json(null_stack)["services"]["crasher"]["restarts"] >= 4, timeout_s=60, what="4 restarts")
    delays = [float(e["text"].split("restart in ")[1].rstrip("s"))
              for e in null_stack.events if e["service"] == "crasher" and e["kind"] == "exited"]  # fmt: skip
    assert delays[:4] == [0.3, 0.6, 1.2, 1.2]  # doubling from backoff_s, capped at backoff_max_s
    assert {e["exit"] for e in null_stack.events if e["service"] == "crasher"} == {2}  # argparse's usage error
    null_stack.stop_service("crasher")
    count = crasher.sup.restarts
    time.sleep(2.0)
    assert crasher.sup.restarts == count and not crasher.alive, "a stopped service must stay down"


def test_backoff_resets_after_healthy_running_a_chosen_delay_wins_and_a_stopped_service_stays_down(null_stack: Stack):
    def kill_and_wait(n: int, **kw: float) -> str:
        null_stack.kill("rollout-1", signal.SIGKILL, **kw)
        wait_for(lambda: restarted(null_stack, "rollout-1", n), what=f"rollout-1 restart #{n}")
        return [e for e in null_stack.events if e["kind"] == "exited"][-1]["text"]

    assert kill_and_wait(1).endswith("restart in 0.3s")
    assert kill_and_wait(2).endswith("restart in 0.6s")  # died again at once: backoff doubles
    time.sleep(4.5)  # healthy for longer than healthy_after_s
    assert kill_and_wait(3).endswith("restart in 0.3s")
    assert kill_and_wait(4, restart_after_s=1.5).endswith("restart in 1.5s")  # chaos: "restarted 1.5 s later"

    worker = null_stack.service("rollout-1")
    worker.signal(signal.SIGTERM)  # the owner's own stop: not a fault
    assert worker.wait(30)
    time.sleep(1.5)
    assert not worker.alive and stack_json(null_stack)["services"]["rollout-1"]["restarts"] == 4
    null_stack.start_service("rollout-1")
    wait_for(lambda: restarted(null_stack, "rollout-1", 5), what="rollout-1 started on request")

    result = CliRunner().invoke(app, ["status", "--state-dir", str(null_stack.state_dir)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "services (relayrl up)" in result.output
    line = next(line for line in result.output.splitlines() if "rollout-1" in line)
    assert " 5 " in line and "yes" in line, line


def test_stop_ends_supervision_and_every_process(tmp_path: Path):
    stack = Stack(StackConfig(state_dir=tmp_path / "s", gateway_port=0, log_format="console",
                              inference_replicas=0, trainers=0)).start()  # fmt: skip
    pids = dict(stack_json(stack)["pids"])
    stack.stop()
    time.sleep(1.0)  # a supervisor still running would have restarted something by now
    assert not any(e["kind"] == "restarted" for e in stack.events)
    assert all(not p.alive for p in stack.processes()), pids
    assert not (stack.state_dir / "stack.json").exists()
