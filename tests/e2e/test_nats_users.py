"""The embedded stack's NATS users, end to end: passwords generated into the state dir (0600),
the server config written 0600 with them, a connection without them refused, and each running
service logged in as its own user with only its own password (read back from the processes'
environments). The rest of the e2e suite runs on the same authenticated stack."""

from __future__ import annotations

import asyncio
import json
import stat

import nats
import nats.errors
import pytest

from services.cli.nats_admin import CREDENTIALS_FILE
from services.cli.stack import Stack
from shared import nats_auth
from tests.support.processes import process_environ


def test_each_service_runs_as_its_own_nats_user_and_nobody_gets_in_without_one(agent_stack: Stack) -> None:
    path = agent_stack.state_dir / CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    passwords = json.loads(path.read_text())
    assert set(passwords) == set(nats_auth.USERS) and len(set(passwords.values())) == len(nats_auth.USERS)
    assert agent_stack.nats is not None
    conf = agent_stack.nats.store_dir / "nats.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and passwords["admin"] in conf.read_text()

    for svc in agent_stack.services:
        user = svc.module.split(".")[1]
        assert svc.pid is not None
        env = process_environ(svc.pid)
        assert env["RELAYRL_NATS_USER"] == user and env["RELAYRL_NATS_PASSWORD"] == passwords[user], svc.name
        others = {p for u, p in passwords.items() if u != user}
        assert not others & set(env.values()), f"{svc.name} holds another NATS user's password"
        assert passwords[user] not in env["NATS_URL"]  # the URL carries no secret (it is logged)

    async def anonymous() -> None:
        await nats.connect(agent_stack.nats_url, allow_reconnect=False, connect_timeout=5)

    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        asyncio.run(anonymous())
