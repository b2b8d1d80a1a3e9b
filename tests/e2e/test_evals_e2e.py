"""Evaluation through the real services: greedy rollouts at a version, aggregated by the store."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from services.cli.app import app
from services.cli.client import GatewayClient
from services.cli.stack import Stack
from tests.support.agent_stack import trajectory_from_view

pytestmark = pytest.mark.e2e


def test_eval_runs_greedy_at_version_zero_and_is_reported_per_version(agent_stack: Stack):
    client = GatewayClient(agent_stack.gateway_url, api_key=agent_stack.api_key)
    digits = ["3", "7", "3", "7"]  # repeated rows: greedy decoding must answer them identically
    config = {
        "run_id": "eval-e2e", "agent": "echo-digit", "dataset": [{"digit": "1"}, {"digit": "2"}],
        "eval_dataset": [{"digit": d} for d in digits],
        "training": {"batch_size": 1, "group_size": 2, "epochs": 1},
        "sampling": {"temperature": 1.0, "max_tokens": 1},
    }  # fmt: skip
    client.create_run(config)
    started = client.start_eval("eval-e2e", {})
    assert started["version"] == 0 and len(started["tasks"]) == 4
    views = client.wait(started["tasks"], timeout_s=120)
    trajs = [trajectory_from_view(client.rollout(v["rollouts"][0]["rollout_id"])) for v in views.values()]
    assert all(t.eval and t.status == "ok" and t.group_size == 1 for t in trajs)
    answers: dict[str, set[bytes]] = {}
    for t, d in zip(trajs, digits):
        answers.setdefault(d, set()).add(t.transitions[0].response_ids)
    assert all(len(a) == 1 for a in answers.values()), "temperature 0: one answer per input"

    (summary,) = client.evals("eval-e2e")
    assert summary["version"] == 0 and summary["rollouts"] == 4 and summary["ok"] == 4
    assert summary["off_version"] == 0 and all(t.eval_version == 0 for t in trajs)
    assert summary["accuracy"] == pytest.approx(sum(t.reward >= 1.0 for t in trajs) / 4)
    assert summary["reward_mean"] == pytest.approx(sum(t.reward for t in trajs) / 4)

    shown = CliRunner().invoke(
        app, ["eval", "eval-e2e", "--show", "--gateway", agent_stack.gateway_url], env={"RELAYRL_API_KEY": agent_stack.api_key}
    )
    assert shown.exit_code == 0, shown.output
    assert "evaluations of eval-e2e" in shown.output
    client.run_action("eval-e2e", "cancel")
    client.close()
