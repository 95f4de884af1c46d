"""The installed plugin, as a user meets it: `python -m sglang.launch_server` in a fresh process.

No hooks are applied by the test: SGLang's own load_plugins() must find our entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kvtuner_hicache.sglang_ext import args as kargs

pytestmark = pytest.mark.sglang


def _launch(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != kargs.ENV_VAR}
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *argv], capture_output=True, text=True,
                          timeout=240, env=env)


def test_help_lists_the_nine_flags_and_the_storage_alias():
    out = _launch("--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in [*kargs.ALL_FLAGS, "--no-kvtuner-hicache-asym", "--hicache-storage-backend-config"]:
        assert flag in out.stdout, flag
    assert "juicefs" in out.stdout and "lmcache" in out.stdout  # our backend names are valid choices


def test_wrong_combination_fails_fast_naming_the_flag():
    out = _launch("--model-path", "/nonexistent", "--kvtuner-hicache-nbits-key", "2")
    assert out.returncode == 2
    assert "--kvtuner-hicache-nbits-key needs --enable-kvtuner-hicache" in out.stderr
    assert "Traceback" not in out.stderr
