"""Shared test helpers: repo paths and the KVTuner presets that live in ../shared (reference data)."""

from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESETS = REPO.parent / "shared" / "kvtuner-presets"
sys.path.insert(0, str(REPO / "python"))  # tests run against the working tree, installed or not


@pytest.fixture(scope="session")
def presets_dir() -> pathlib.Path:
    if not PRESETS.is_dir():
        pytest.skip(f"KVTuner presets not found at {PRESETS}")
    return PRESETS
