"""`relayrl up` rotates a service's log past its size bound, and the service keeps writing to it."""

from __future__ import annotations

from pathlib import Path

from services.cli.stack import rotate_log


def test_a_log_past_its_bound_is_rotated_and_the_writer_goes_on_at_its_start(tmp_path: Path) -> None:
    log = tmp_path / "store.log"
    with open(log, "ab", buffering=0) as service:  # what a supervised service holds
        service.write(b"a" * 100)
        assert not rotate_log(log, max_bytes=100, keep=2)  # at the bound: kept
        service.write(b"b" * 10)
        assert rotate_log(log, max_bytes=100, keep=2)
        assert (tmp_path / "store.log.1").read_bytes() == b"a" * 100 + b"b" * 10
        assert log.stat().st_size == 0
        service.write(b"c" * 150)  # append mode: from the new end, no hole
        assert log.read_bytes() == b"c" * 150
        assert rotate_log(log, max_bytes=100, keep=2)
        service.write(b"d")
    assert (tmp_path / "store.log.2").read_bytes() == b"a" * 100 + b"b" * 10
    assert (tmp_path / "store.log.1").read_bytes() == b"c" * 150
    assert log.read_bytes() == b"d"
    assert not (tmp_path / "store.log.3").exists()
