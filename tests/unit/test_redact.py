"""Credentials out of logs and errors (shared/redact.py), through the logging every service gets
(shared/telemetry.py): the real structlog and stdlib output of a process set up like a service."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.redact import MASK, redact_text, redact_url, redact_value

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("nats://rollout:hunter2@nats:4222", "nats://rollout:***@nats:4222"),
        ("nats://s3cr3t-token@nats:4222", "nats://***@nats:4222"),  # a bare token as user info
        ("nats://a:p1@h1:4222,nats://b:p2@h2:4222", "nats://a:***@h1:4222,nats://b:***@h2:4222"),
        ("postgresql+asyncpg://relay:pw@db:5432/relayrl", "postgresql+asyncpg://relay:***@db:5432/relayrl"),
        ("https://h/x?token=abc&page=2&api_key=zz&sig=1", "https://h/x?token=***&page=2&api_key=***&sig=***"),
        ("nats://nats:4222", "nats://nats:4222"),  # nothing to hide: unchanged
        ("http://127.0.0.1:8000/v1/runs?limit=5", "http://127.0.0.1:8000/v1/runs?limit=5"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_text_and_values() -> None:
    text = "could not connect to NATS at nats://svc:hunter2@nats:4222,nats://svc:hunter2@b:4222: refused"
    assert redact_text(text) == "could not connect to NATS at nats://svc:***@nats:4222,nats://svc:***@b:4222: refused"
    key = "rrl_0123456789ab_" + "Z" * 43
    assert redact_text(f"bad key {key}") == "bad key rrl_0123456789ab_***"
    assert "tok123" not in redact_text("Authorization: Bearer tok123") and MASK in redact_text("Bearer tok123")
    assert redact_text("GET /x?password=pw1&n=1 token=t2") == "GET /x?password=***&n=1 token=***"
    assert "hunter2" not in redact_text("input_value={'password': 'hunter2', 'n': 1}")
    # Counts and ids that only sound like credentials stay readable.
    assert redact_text("max_tokens: 16 tokens=5 pass_rate=0.5 key_id=abc") == "max_tokens: 16 tokens=5 pass_rate=0.5 key_id=abc"
    nested = {"headers": {"Authorization": "Bearer x", "Accept": "json"}, "urls": ["nats://u:p@h"], "n": 3}
    assert redact_value(nested) == {"headers": {"Authorization": MASK, "Accept": "json"}, "urls": ["nats://u:***@h"], "n": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_service_logs_come_out_redacted() -> None:
    """A process set up as a service (telemetry.setup) logs credentials through structlog and
    stdlib logging, and fails to connect to NATS with a credential-bearing URL; nothing it
    writes holds a secret."""
    port = free_port()  # closed: the connect fails, as with NATS down
    script = textwrap.dedent(
        f"""
        import asyncio, logging
        from shared import telemetry
        from shared.bus import Bus
        from shared.config import ServiceSettings

        url = "nats://svc:hunter2@127.0.0.1:{port}"
        settings = ServiceSettings(nats_url=url, nats_connect_attempts=1, nats_connect_timeout_s=0.5)
        log = telemetry.setup("redaction-test", settings)
        log.info("connecting", url=url, token="tok-SECRET1", api_key="SECRET2", attempt=1)
        log.info("headers", headers={{"Authorization": "Bearer SECRET3"}}, note="sent password=SECRET4")
        logging.getLogger("nats.aio.client").error("connect to %s failed", "nats://u:SECRET5@h:4222")
        try:
            asyncio.run(Bus.connect(settings, "redaction-test"))
        except ConnectionError as exc:
            print("raised:", exc)  # the exception's own text, as a crash would print it
            log.exception("nats unreachable")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for secret in ("hunter2", "tok-SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5"):
        assert secret not in out, (secret, out)
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    by_event = {line["event"]: line for line in lines}
    assert by_event["connecting"]["url"] == f"nats://svc:***@127.0.0.1:{port}"
    assert by_event["connecting"]["token"] == MASK and by_event["connecting"]["api_key"] == MASK
    assert by_event["connecting"]["attempt"] == 1
    assert by_event["headers"]["headers"] == {"Authorization": MASK} and by_event["headers"]["note"] == "sent password=***"
    assert by_event["nats connect failed"]["url"] == f"nats://svc:***@127.0.0.1:{port}"
    assert f"nats://svc:***@127.0.0.1:{port}" in by_event["nats unreachable"]["exception"]  # the traceback
    assert f"raised: could not connect to NATS at nats://svc:***@127.0.0.1:{port}" in proc.stdout
    assert "connect to nats://u:***@h:4222 failed" in proc.stderr  # stdlib logging (nats-py, uvicorn)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (ConnectionError("could not connect to NATS at nats://gw:hunter2@nats:4222: refused"), 503),
        (RuntimeError("database error at postgresql://relay:hunter2@db/relayrl"), 502),
    ],
)
async def test_gateway_error_responses_are_redacted(exc: Exception, status: int) -> None:
    from services.gateway.app import fault_response

    response = await fault_response(None, exc)  # type: ignore[arg-type]
    body = json.loads(bytes(response.body))
    assert response.status_code == status and "hunter2" not in body["detail"] and ":***@" in body["detail"]
