"""Shared fixtures: the location of ../shared/data (skip when absent) and the bundled example."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SQUALL_SHARED_DATA", _ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; tests using it skip when it is absent (e.g. on a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development data not found at {SHARED_DATA} (set SQUALL_SHARED_DATA to its path)")
    return SHARED_DATA
