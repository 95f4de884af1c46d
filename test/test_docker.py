"""CI lint of docker/Dockerfile through scripts/check_docker.sh: hadolint, the base tag against the pinned
SGLang release, and COPY sources against what scripts/device/build_kernel_wheel.sh builds."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_docker.sh"
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _check(dockerfile: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if dockerfile is not None:
        import os

        env = dict(os.environ, DOCKERFILE=str(dockerfile))
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)


def test_dockerfile_passes_the_ci_check():
    r = _check()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check_docker: OK" in r.stdout


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("ARG SGLANG_VERSION=", "ARG SGLANG_VERSION=9.9.9#"), "does not match the pinned release"),
    (lambda s: s.replace("COPY dist/", "COPY docker/Dockerfile dist/"), "not built by"),
    (lambda s: s.replace(" dist/sglang_kvtuner_hicache-*.whl", ""), "both wheels"),
    (lambda s: s + "RUN python3 -m pip install --no-cache-dir requests==2.32.3\n", "one pip install"),
    (lambda s: s.replace("crc32c==2.9.post0", "crc32c"), "hadolint found problems"),  # DL3013: pin versions
    (lambda s: s.replace("crc32c==2.9.post0", "requests==2.32.3"), "not a dependency"),
    (lambda s: s.replace("crc32c==2.9.post0", "crc32c==2.8"), "not the pin"),
], ids=["wrong-base-tag", "foreign-copy", "one-wheel-only", "extra-install", "unpinned-dep", "foreign-package",
        "other-pin"])
def test_check_rejects(tmp_path, edit, message):
    bad = tmp_path / "Dockerfile"
    bad.write_text(edit(DOCKERFILE.read_text()))
    r = _check(bad)
    assert r.returncode != 0 and message in r.stderr, r.stdout + r.stderr
