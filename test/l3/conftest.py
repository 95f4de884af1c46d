"""Fixtures for the real-engine L3 tests (scripts/l3/test_l3.sh starts the engines first).

The engines' addresses come from `.cache/l3/run/env` (written by scripts/l3/start_engines.sh).
Without it the tests skip, unless L3_REQUIRE=1 (test_l3.sh sets it): then a missing engine fails.
"""

from __future__ import annotations

import os
import pathlib
import sys
import warnings

import pytest

pytest.importorskip("sglang")
warnings.filterwarnings("ignore", message="Only CUDA")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # harness.py
from harness import RUN  # noqa: E402


def engine_env() -> dict[str, str]:
    env = {}
    f = RUN / "env"
    if f.is_file():
        for line in f.read_text().splitlines():
            k, _, v = line.partition("=")
            if k:
                env[k] = v
    return env


def require(name: str) -> str:
    v = engine_env().get(name)
    if v:
        return v
    msg = f"{name} not set: start the engines with scripts/l3/start_engines.sh (or run scripts/l3/test_l3.sh)"
    if os.environ.get("L3_REQUIRE") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def hooks():
    """Our plugin's hooks plus the L3 backend hooks, applied as SGLang's load_plugins() would."""
    from kvtuner_hicache.sglang_ext.plugin import register
    from kvtuner_hicache_l3.plugin import register as register_l3
    from sglang.srt.plugins.hook_registry import HookRegistry

    register()  # kvtuner-hicache's hooks
    register_l3()  # the juicefs/lmcache plugin's own hooks (idempotent)
    HookRegistry.apply_hooks()
    return True


@pytest.fixture
def jfs_mount() -> str:
    return require("L3_JUICEFS_MOUNT")


@pytest.fixture
def lmcache_endpoint() -> str:
    return require("L3_LMCACHE_ENDPOINT")


@pytest.fixture
def mooncake_master() -> str:
    path = require("L3_MOONCAKE_PYTHONPATH")
    if path not in sys.path:
        sys.path.insert(0, path)
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")  # advertise loopback, never the NIC address
    return require("L3_MOONCAKE_MASTER")
