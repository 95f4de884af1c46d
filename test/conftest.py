"""Shared test helpers: repo paths and the small per-layer tables the tests ship (test/data)."""

from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "test" / "data"  # small per-layer tables of our own: a fresh clone skips nothing
sys.path.insert(0, str(REPO / "python"))  # tests run against the working tree, installed or not


@pytest.fixture(scope="session")
def mixed_table() -> pathlib.Path:
    """A 28-layer mixed K/V bit table (Qwen2.5-7B depth), shipped with the tests."""
    return TEST_DATA / "mixed_28_layers.yaml"


@pytest.fixture(scope="session")
def table_32_layers() -> pathlib.Path:
    """A 32-layer table (Llama-3.1-8B depth): wrong for a 28-layer model."""
    return TEST_DATA / "uniform_32_layers.yaml"
