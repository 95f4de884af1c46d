"""benchmark/bench_e2e.py's MooncakeMaster against the real `mooncake_master` binary that the L3 tests install:
it starts on its own ports, its byte counter answers, and stop() ends it."""

from __future__ import annotations

import pathlib
import sys

import pytest
from conftest import require

pytestmark = pytest.mark.l3
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmark"))
import bench_e2e as be  # noqa: E402


def test_a_master_per_server_starts_counts_and_stops(tmp_path):
    root = require("L3_MOONCAKE_PYTHONPATH")  # the unpacked non-CUDA wheel: mooncake/mooncake_master
    master = be.MooncakeMaster(root, 7, str(tmp_path))
    try:
        assert master.port == 50151 + 7
        assert master.allocated_bytes() == 0  # a fresh store holds nothing
        assert '"master_server_address": "127.0.0.1:50158"' in master.extra_config()
    finally:
        master.stop()
    assert master.proc.poll() is not None
    assert master.allocated_bytes() is None


def test_a_missing_binary_names_the_directory(tmp_path):
    with pytest.raises(SystemExit, match="KVTQ_MOONCAKE_DIR"):
        be.MooncakeMaster(str(tmp_path), 0, str(tmp_path))
