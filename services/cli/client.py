"""A small HTTP client for the gateway, used by `relayrl submit` and `relayrl demo`.

It sends an API key: the one it is given, else `RELAYRL_API_KEY`, else the key `relayrl up`
wrote into its state dir (`<state_dir>/api_key`, mode 0600). A 429 is waited out as its
`Retry-After` says, a few times, before it is raised.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx

from services.cli.keyfile import API_KEY_FILE
from services.cli.stack import read_state

# A 429 is retried this many times (each after the server's Retry-After) before it is raised.
_RATE_LIMIT_RETRIES = 5
# Rollouts the client sends in one POST /v1/tasks at most: the gateway's default
# max_rollouts_per_request (services/gateway/settings.py).
_ROLLOUTS_PER_REQUEST = 4096


def gateway_url(explicit: str | None, state_dir: Path) -> str:
    if explicit:
        return explicit.rstrip("/")
    if env := os.environ.get("RELAYRL_GATEWAY_URL"):
        return env.rstrip("/")
    state = read_state(state_dir)
    if state and state.get("gateway_url"):
        return str(state["gateway_url"])
    return "http://127.0.0.1:8000"


def find_api_key(explicit: str | None = None, state_dir: Path = Path(".relayrl")) -> str | None:
    """The key to send: `explicit`, else `RELAYRL_API_KEY`, else `<state_dir>/api_key`."""
    if explicit:
        return explicit.strip()
    if env := os.environ.get("RELAYRL_API_KEY"):
        return env.strip()
    path = state_dir / API_KEY_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


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


class _PatientTransport(httpx.HTTPTransport):
    """Waits out a 429 as its Retry-After says, a few times, before handing it on."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(_RATE_LIMIT_RETRIES):
            response = super().handle_request(request)
            if response.status_code != 429:
                return response
            wait = response.headers.get("retry-after", "1")
            response.close()
            time.sleep(min(float(wait) if wait.isdigit() else 1.0, 30.0))
        return super().handle_request(request)


class GatewayClient:
    def __init__(
        self, base_url: str, timeout_s: float = 30.0, api_key: str | None = None, state_dir: Path = Path(".relayrl")
    ) -> None:
        key = find_api_key(api_key, state_dir)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers, transport=_PatientTransport())

    def submit(self, tasks: list[dict[str, Any]], chunk: int = 1000) -> list[dict[str, Any]]:
        """Submit in requests of at most `chunk` tasks and the gateway's default rollout limit."""
        accepted: list[dict[str, Any]] = []
        for batch in _batches(tasks, chunk, _ROLLOUTS_PER_REQUEST):
            r = self.http.post("/v1/tasks", json={"tasks": batch})
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

    # --- API keys (admin) ---------------------------------------------------------------

    def create_key(self, name: str = "", scope: str = "write", project: str | None = None) -> dict[str, Any]:
        """A new key; its text (`key`) is in this answer only."""
        body: dict[str, Any] = {"name": name, "scope": scope}
        if project:
            body["project"] = project
        return self._json(self.http.post("/v1/keys", json=body), "create key")

    def list_keys(self, project: str | None = None) -> list[dict[str, Any]]:
        params = {"project": project} if project else {}
        return self._json(self.http.get("/v1/keys", params=params), "keys")

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._json(self.http.delete(f"/v1/keys/{key_id}"), f"revoke {key_id}")

    def close(self) -> None:
        self.http.close()


def _batches(tasks: list[dict[str, Any]], max_tasks: int, max_rollouts: int) -> Iterable[list[dict[str, Any]]]:
    """Consecutive batches of at most `max_tasks` tasks and `max_rollouts` rollouts (group sizes)."""
    batch: list[dict[str, Any]] = []
    rollouts = 0
    for task in tasks:
        size = int(task.get("group_size", 1))
        if batch and (len(batch) >= max_tasks or rollouts + size > max_rollouts):
            yield batch
            batch, rollouts = [], 0
        batch.append(task)
        rollouts += size
    if batch:
        yield batch
