"""Weight signatures (shared/weights.py): what they bind, and PolicyVersion decoding before and after them."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from shared.messages import PolicyVersion
from shared.weights import SIGNATURE_SCHEME, WeightsSignatureError, sign_weights, verify_weights

KEY = "a-test-key-of-enough-length-0123"
SHA = hashlib.sha256(b"weights").hexdigest()


def _pv(**overrides: object) -> PolicyVersion:
    values: dict[str, object] = dict(run_id="r1", version=3, object="r1/3", sha256=SHA, size=7, step=3)
    values.update(overrides)
    return PolicyVersion(**values)  # type: ignore[arg-type]


def test_a_signed_version_verifies_and_the_signature_is_deterministic() -> None:
    sig = sign_weights(KEY, "r1", 3, SHA)
    assert sig.startswith(f"{SIGNATURE_SCHEME}:") and sig == sign_weights(KEY.encode(), "r1", 3, SHA)
    verify_weights(KEY, _pv(signature=sig))
    verify_weights(KEY, _pv(signature=sig, sha256=SHA.upper()))  # hex case is not a different digest


@pytest.mark.parametrize(
    ("why", "change"),
    [
        ("another run", {"run_id": "r2", "object": "r2/3"}),
        ("another version", {"version": 4}),
        ("other bytes", {"sha256": hashlib.sha256(b"forged").hexdigest()}),
    ],
)
def test_the_signature_binds_run_version_and_digest(why: str, change: dict[str, object]) -> None:
    with pytest.raises(WeightsSignatureError, match="does not match"):
        verify_weights(KEY, _pv(signature=sign_weights(KEY, "r1", 3, SHA), **change))


def test_unsigned_and_wrong_key_are_refused() -> None:
    with pytest.raises(WeightsSignatureError, match="unsigned"):
        verify_weights(KEY, _pv())
    with pytest.raises(WeightsSignatureError, match="does not match"):
        verify_weights(KEY, _pv(signature=sign_weights(KEY + "x", "r1", 3, SHA)))
    with pytest.raises(WeightsSignatureError, match="does not match"):
        verify_weights(KEY, _pv(signature="garbage"))


def test_entries_written_before_signing_still_decode_as_unsigned() -> None:
    old = {k: v for k, v in _pv().model_dump().items() if k != "signature"}
    pv = PolicyVersion.decode(msgpack.packb(old, use_bin_type=True))
    assert pv.signature is None
    signed = _pv(signature=sign_weights(KEY, "r1", 3, SHA))
    assert PolicyVersion.decode(signed.encode()) == signed
