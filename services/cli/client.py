"""A small HTTP client for the gateway, used by `relayrl submit` and `relayrl demo`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx

from services.cli.stack import read_state


def gateway_url(explicit: str | None, state_dir: Path) -> str:
    if explicit:
        return explicit.rstrip("/")
    if env := os.environ.get("RELAYRL_GATEWAY_URL"):
        return env.rstrip("/")
    state = read_state(state_dir)
    if state and state.get("gateway_url"):
        return str(state["gateway_url"])
    return "http://127.0.0.1:8000"


def read_tasks_file(path: Path) -> list[dict[str, Any]]:
    """One task per line (JSONL); blank lines and `#` comments are skipped."""
    tasks = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                tasks.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
    return tasks


class GatewayError(RuntimeError):
    """The gateway answered with an error; the text carries its reason."""


def _detail(r: httpx.Response) -> str:
    try:
        return json.dumps(r.json().get("detail"))
    except (ValueError, AttributeError):
        return r.text


class GatewayClient:
    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s)

    def submit(self, tasks: list[dict[str, Any]], chunk: int = 1000) -> list[dict[str, Any]]:
        accepted: list[dict[str, Any]] = []
        for i in range(0, len(tasks), chunk):
            r = self.http.post("/v1/tasks", json={"tasks": tasks[i : i + chunk]})
            if r.status_code >= 400:
                raise RuntimeError(f"gateway refused the tasks ({r.status_code}): {r.text}")
            accepted.extend(r.json()["tasks"])
        return accepted

    def task(self, task_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/tasks/{task_id}")
        r.raise_for_status()
        return r.json()

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/rollouts/{rollout_id}")
        r.raise_for_status()
        return r.json()

    def wait(
        self,
        task_ids: Iterable[str],
        timeout_s: float,
        on_progress: Callable[[int, int], None] = lambda done, total: None,
        poll_s: float = 0.25,
    ) -> dict[str, dict[str, Any]]:
        """Poll until every task is done (all rollouts stored); returns the task views."""
        pending = list(task_ids)
        views: dict[str, dict[str, Any]] = {}
        total_rollouts = 0
        deadline = time.monotonic() + timeout_s
        while pending:
            still = []
            for tid in pending:
                view = self.task(tid)
                views[tid] = view
                if view["status"] != "done":
                    still.append(tid)
            pending = still
            total_rollouts = sum(v["group_size"] for v in views.values())
            on_progress(sum(len(v["rollouts"]) for v in views.values()), total_rollouts)
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} task(s) not done after {timeout_s}s")
                time.sleep(poll_s)
        return views

    # --- runs ---------------------------------------------------------------------------

    def _json(self, r: httpx.Response, what: str) -> Any:
        if r.status_code >= 400:
            raise GatewayError(f"{what}: {r.status_code} {_detail(r)}")
        return r.json()

    def put_dataset(self, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return self._json(self.http.post("/v1/datasets", json={"name": name, "rows": rows}), f"dataset {name}")

    def create_run(self, config: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.http.post("/v1/runs", json=config), "gateway refused the run")

    def run(self, run_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/runs/{run_id}"), f"run {run_id}")

    def runs(self) -> list[dict[str, Any]]:
        return self._json(self.http.get("/v1/runs"), "runs")

    def metrics(self, run_id: str, after_step: int = 0) -> list[dict[str, Any]]:
        return self._json(self.http.get(f"/v1/runs/{run_id}/metrics", params={"after_step": after_step}), "metrics")

    def run_action(self, run_id: str, action: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/runs/{run_id}/{action}"), f"{action} {run_id}")

    def replay(self, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/runs/{run_id}/replay", json=body), f"replay {run_id}")

    def start_eval(self, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/runs/{run_id}/evals", json=body), f"evaluate {run_id}")

    def evals(self, run_id: str, accuracy_threshold: float = 1.0) -> list[dict[str, Any]]:
        params = {"accuracy_threshold": accuracy_threshold}
        return self._json(self.http.get(f"/v1/runs/{run_id}/evals", params=params), f"evaluations of {run_id}")

    def weights(self, run_id: str, version: int | None = None, timeout_s: float = 600.0) -> tuple[bytes, httpx.Headers]:
        """One version of a run's weights (default: the latest) as safetensors bytes, with the
        response headers: `X-Policy-Version`, `X-Policy-Sha256`, `X-Policy-Step`."""
        params = {} if version is None else {"version": version}
        # The gateway reads and checks the whole object before its first byte goes out, and a
        # real model's weights are gigabytes: the client's default timeout is for small JSON.
        r = self.http.get(f"/v1/runs/{run_id}/weights", params=params, timeout=timeout_s)
        if r.status_code >= 400:
            raise GatewayError(f"weights of {run_id}: {r.status_code} {_detail(r)}")
        return r.content, r.headers

    def close(self) -> None:
        self.http.close()
