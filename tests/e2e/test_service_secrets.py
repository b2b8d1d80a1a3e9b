"""The embedded stack's service secrets, end to end: generated into the state dir (0600), used
by inference to refuse callers without the token, and given to each process only as its role
needs (read back from the running processes' environments)."""

from __future__ import annotations

import json
import stat

import httpx

from services.cli.secrets import FILE_NAME
from services.cli.stack import Stack
from tests.support.secrets import INFERENCE_TOKEN
from tests.support.processes import process_environ


def test_the_stack_generates_its_secrets_and_inference_demands_the_token(agent_stack: Stack) -> None:
    path = agent_stack.state_dir / FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secrets = json.loads(path.read_text())
    token, key = secrets["inference_token"], secrets["weights_key"]
    assert token != INFERENCE_TOKEN  # the stack's own, not the test session's
    url = agent_stack.inference_urls[0]
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200  # probes stay open
    for headers in ({}, {"Authorization": f"Bearer {INFERENCE_TOKEN}"}, {"Authorization": f"Bearer {key}"}):
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        assert r.status_code == 401 and "RELAYRL_INFERENCE_TOKEN" in r.json()["error"]["message"], r.text
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200

    roles = {"inference": {token, key}, "rollout": {token}, "gateway": set(), "store": set()}
    for svc in agent_stack.services:
        role = next(r for r in roles if svc.name.startswith(r))
        assert svc.pid is not None
        held = {v for v in process_environ(svc.pid).values() if v in (token, key)}
        assert held == roles[role], f"{svc.name} holds {len(held)} of the stack's secrets"
