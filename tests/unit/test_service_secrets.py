"""The embedded stack's service secrets (services/cli/secrets.py): generated once, 0600, reused,
and handed to each service only as far as its role needs them."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from services.cli.secrets import ENV, FILE_NAME, ensure_secrets, service_env
from shared.config import MIN_SECRET_CHARS


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    first = ensure_secrets(tmp_path / "state")
    path = tmp_path / "state" / FILE_NAME
    assert _mode(path) == 0o600
    assert set(first) == set(ENV) and all(len(v) >= MIN_SECRET_CHARS for v in first.values())
    assert first["inference_token"] != first["weights_key"]
    # A restart reads the same secrets: weights signed before it still verify after it.
    assert ensure_secrets(tmp_path / "state") == first
    assert ensure_secrets(tmp_path / "other") != first  # another stack, other secrets


def test_a_readable_file_is_closed_and_a_broken_one_regenerated(tmp_path: Path) -> None:
    first = ensure_secrets(tmp_path)
    path = tmp_path / FILE_NAME
    os.chmod(path, 0o644)
    assert ensure_secrets(tmp_path) == first and _mode(path) == 0o600
    path.write_text(json.dumps({"inference_token": "short", "weights_key": first["weights_key"]}))
    again = ensure_secrets(tmp_path)
    assert again["weights_key"] == first["weights_key"] and len(again["inference_token"]) >= MIN_SECRET_CHARS
    path.write_text("{not json")
    assert set(ensure_secrets(tmp_path)) == set(ENV)


def test_each_service_gets_only_the_secrets_of_its_role(tmp_path: Path) -> None:
    s = ensure_secrets(tmp_path)
    token, key = ENV["inference_token"], ENV["weights_key"]
    assert service_env("services.inference", s) == {token: s["inference_token"], key: s["weights_key"]}
    assert service_env("services.rollout", s) == {token: s["inference_token"]}
    assert service_env("services.trainer", s) == {key: s["weights_key"]}
    assert service_env("services.gateway", s) == {} and service_env("services.store", s) == {}
