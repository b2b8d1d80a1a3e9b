"""Generated NATS passwords survive the way deployments hand them to nats-server: as `$VAR`
references whose values nats-server parses as config (a value starting with `-` is refused as
a malformed number, which once failed a cluster start in CI)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from services.cli.nats_server import nats_server_binary
from shared.nats_auth import generate_password, generate_passwords, USERS


def _config_valid(tmp_path: Path, password: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "t.conf"
    conf.write_text("port: -1\nauthorization { users = [ {user: a, password: $P} ] }\n")
    env = {**os.environ, "P": password}
    return subprocess.run([nats_server_binary(), "-c", str(conf), "-t"], env=env, capture_output=True, text=True, timeout=30)


def test_a_leading_dash_is_what_nats_server_refuses(tmp_path: Path) -> None:
    assert _config_valid(tmp_path, "-rabc").returncode != 0


def test_generated_passwords_are_accepted_as_variable_values(tmp_path: Path) -> None:
    passwords = [generate_password() for _ in range(40)] + list(generate_passwords().values())
    assert set(generate_passwords()) == set(USERS)
    for password in passwords:
        result = _config_valid(tmp_path, password)
        assert result.returncode == 0, (password, result.stdout + result.stderr)
