"""API key text, scopes and the gateway's reserved task ids."""

from __future__ import annotations

import pytest

from shared.apikeys import SCOPES, MalformedKey, allows, new_key, parse_key, secret_hash
from services.gateway.evals import eval_task_id
from services.gateway.ids import adhoc_run, is_other_adhoc_run, is_reserved
from services.gateway.pacing import task_id


def test_scopes_are_ordered_read_write_admin() -> None:
    assert SCOPES == ("read", "write", "admin")
    assert [allows(held, "write") for held in SCOPES] == [False, True, True]
    assert all(allows("admin", needed) for needed in SCOPES)
    assert [allows("read", needed) for needed in SCOPES] == [True, False, False]


def test_a_new_key_parses_back_and_only_its_hash_names_its_secret() -> None:
    key_id, secret, text = new_key()
    assert parse_key(text + "\n") == (key_id, secret)
    assert secret not in secret_hash(secret) and len(secret_hash(secret)) == 64
    assert new_key()[2] != text


@pytest.mark.parametrize("text", ["", "Bearer x", "rrl_0123456789ab_short", "rrl_XYZ_" + "a" * 43, "abc_0123456789ab_" + "a" * 43])
def test_malformed_keys_are_refused_without_echoing_them(text: str) -> None:
    with pytest.raises(MalformedKey) as err:
        parse_key(text)
    assert not text or text not in str(err.value)


def test_the_gateways_own_task_ids_are_reserved_and_others_are_not() -> None:
    for made in (task_id("run-1", 0, 5), task_id("x", 12, 0), eval_task_id("run-1", 3, 0, {"q": 1})):
        assert is_reserved(made), made
    for user in ("t1", "run-1-e0", "e0-r5x", "my-eval-v1", "abc-r5", "0b7c9f2e"):
        assert not is_reserved(user), user


def test_each_project_has_its_own_adhoc_bucket() -> None:
    assert adhoc_run("default") == "default" and adhoc_run("acme") == "default-acme"
    assert not is_other_adhoc_run("default-acme", "acme") and is_other_adhoc_run("default", "acme")
    assert is_other_adhoc_run("default-zeta", "acme") and not is_other_adhoc_run("mine", "acme")


def test_keys_generate_prints_a_fresh_key_and_stores_nothing(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from services.cli.app import app

    monkeypatch.chdir(tmp_path)
    first, second = (CliRunner().invoke(app, ["keys", "generate"]) for _ in range(2))
    assert first.exit_code == 0 and second.exit_code == 0
    assert parse_key(first.stdout) != parse_key(second.stdout)
    assert not list(tmp_path.iterdir())
