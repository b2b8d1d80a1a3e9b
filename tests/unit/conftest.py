"""Fixtures of the unit tests: the tiny model, built once per session from code."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.models import resolve_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's checkpoint directory (seed 0), shared read-only by the unit tests."""
    return resolve_model("tiny", tmp_path_factory.mktemp("models"))
