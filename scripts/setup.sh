#!/usr/bin/env bash
# Build the CPU development venv: <repo>/.venv (git-ignored), Python 3.11.
#   - torch 2.13.0+cpu and every other pin: scripts/requirements-cpu.txt (one pip command);
#   - sglang with --no-deps, at the version in python/kvtuner_hicache/_upstream.py (0.5.23; other
#     supported releases run through scripts/with_sglang.sh);
#   - an import-only torchvision stub (see below);
#   - our package, editable, if python/pyproject.toml exists;
#   - then scripts/check_sglang_imports.py checks that the SGLang classes we build on import and
#     run on CPU.
# Idempotent and runnable from any directory: a second run only re-checks (about 20 s).
# From scratch: about 2.5 min on the 2-core CPU machine (measured 151 s, pip cache empty).
# A stamp in .venv/ records what was installed; when requirements-cpu.txt, the sglang pin or this
# script change, the pip steps run again. FORCE=1 re-runs them anyway.
# PYTHON=... picks another interpreter than python3.11 (the venv is rebuilt when it changes).
# pip's cache is used as usual; nothing here relies on it being warm.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3.11}
VENV="$REPO/.venv"
VPY="$VENV/bin/python"
REQS="$REPO/scripts/requirements-cpu.txt"
UPSTREAM="$REPO/python/kvtuner_hicache/_upstream.py"
start=$(date +%s)

log() { echo "[setup] $*"; }
# pip prints one "Location ... is ignored" warning per package for one of this machine's local
# indexes; drop those lines, keep the rest (and pip's exit status, through pipefail).
pipq() {
  "$VPY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# --- the single upstream pin ------------------------------------------------------------------
SGLANG_VERSION=0.5.23
if [ -f "$UPSTREAM" ]; then
  v=$(sed -nE "s/^SGLANG_VERSION[[:space:]]*(:[^=]*)?=[[:space:]]*[\"']([^\"']+)[\"'].*/\2/p" "$UPSTREAM" | head -n 1)
  if [ -n "$v" ]; then SGLANG_VERSION=$v; else log "warning: no SGLANG_VERSION line in $UPSTREAM"; fi
fi
log "sglang pin: $SGLANG_VERSION"

# --- venv ---------------------------------------------------------------------------------------
want_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -x "$VPY" ] && have_py=$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
   && [ "$have_py" = "$want_py" ]; then
  log "reusing $VENV (python $have_py)"
else
  log "creating $VENV with $PYTHON ($want_py)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi

# --- packages -----------------------------------------------------------------------------------
stamp_file="$VENV/.kvt-setup-stamp"
stamp=$(cat "$REQS" "$REPO/scripts/setup.sh" | sha256sum | cut -c1-16)-sglang-$SGLANG_VERSION
if [ "${FORCE:-0}" != 1 ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
  log "packages up to date (stamp $stamp)"
else
  rm -f "$stamp_file"
  # The CPU torch wheel lies in /opt/wheels on this kind of machine. pip's config names it as
  # find-links already; repeat it so that an environment without that config finds it too.
  find_links=()
  if [ -d /opt/wheels ]; then find_links=(--find-links /opt/wheels); fi
  log "pip install -r scripts/requirements-cpu.txt"
  if ! pipq install "${find_links[@]}" -r "$REQS"; then
    log "pip failed. torch==2.13.0+cpu comes only from a local wheel (/opt/wheels on this kind of"
    log "machine); PyPI has no +cpu builds. Elsewhere, put that wheel in a folder named by"
    log "PIP_FIND_LINKS, or edit the torch line of scripts/requirements-cpu.txt."
    exit 1
  fi
  # --no-deps: sglang's metadata pins torch==2.11.0 and CUDA-only packages (sglang-kernel,
  # flashinfer, ...). What its imports need on CPU is in requirements-cpu.txt.
  log "pip install --no-deps sglang==$SGLANG_VERSION"
  pipq install --no-deps "sglang==$SGLANG_VERSION"
  # A CUDA torch must not sneak in: several GB, and every import gets slower.
  "$VPY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else "torch %s is a CUDA build, expected the CPU wheel" % torch.__version__)'
  echo "$stamp" >"$stamp_file"
fi

# --- torchvision (import-only stub) ------------------------------------------------------------
# Why: sglang/srt/utils/common.py does `from torchvision.io import decode_jpeg` at module level
# (used only for nvJPEG decoding on CUDA, with a PIL fallback), and transformers 5.12.1 keeps
# AutoImageProcessor as a dummy that raises unless torchvision is importable, while importing
# sglang.srt.configs registers image processors with it; transformers' image_utils (imported by
# every modeling_* module) then imports torchvision names too. So every sglang import we need
# requires *some* torchvision. PyPI's torchvision wheels link libtorch_cuda and fail beside
# torch+cpu ("operator torchvision::nms does not exist"); the alternative, the CUDA builds
# torch 2.14.1 + torchvision 0.29.1, costs 5.5 GB.
# What: a small package in site-packages with the names that transformers and sglang import at
# module level; anything that would really use torchvision raises. It has no dist-info, so pip
# does not list it and a real `pip install torchvision` overwrites it. Written on every run
# unless a real, importable torchvision distribution is installed; a broken one is removed.
site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tv_state=$("$VPY" -c '
import importlib.metadata
try:
    importlib.metadata.version("torchvision")
except importlib.metadata.PackageNotFoundError:
    print("absent")
else:
    try:
        import torchvision  # noqa: F401
        print("real")
    except Exception:
        print("broken")
' 2>/dev/null || true)
if [ "$tv_state" = "broken" ]; then
  log "removing a torchvision that does not import beside torch+cpu"
  pipq uninstall -y torchvision
  tv_state=absent
fi
if [ "$tv_state" = "real" ]; then
  log "a real torchvision is installed and imports: no stub"
else
  tv="$site/torchvision"
  rm -rf "$tv"
  mkdir -p "$tv/transforms/v2"
  cat >"$tv/__init__.py" <<'PYEOF'
"""Import-only stand-in for torchvision, written by kvtuner-hicache's scripts/setup.sh.

PyPI's torchvision cannot load beside torch+cpu, yet sglang and transformers 5.12.1
import it at module level. This provides those names only; any real use raises.
"""

__version__ = "0.0.0+kvtuner.stub"
KVTUNER_STUB = True


def _unavailable(*args, **kwargs):
    raise RuntimeError("torchvision is an import-only stub in this CPU venv (see scripts/setup.sh)")
PYEOF
  cat >"$tv/io.py" <<'PYEOF'
import enum

from torchvision import _unavailable


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


decode_image = decode_jpeg = read_image = read_file = _unavailable
PYEOF
  cat >"$tv/transforms/__init__.py" <<'PYEOF'
import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"
PYEOF
  cat >"$tv/transforms/functional.py" <<'PYEOF'
from torchvision import _unavailable


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable
PYEOF
  cp "$tv/transforms/functional.py" "$tv/transforms/v2/functional.py"
  echo "from torchvision.transforms import InterpolationMode  # noqa: F401" >"$tv/transforms/v2/__init__.py"
  log "torchvision: import-only stub in $tv"
fi

# --- our package --------------------------------------------------------------------------------
if [ -f "$REPO/python/pyproject.toml" ]; then
  pkg_stamp_file="$VENV/.kvt-package-stamp"
  pkg_stamp=$(sha256sum "$REPO/python/pyproject.toml" | cut -c1-16)
  if [ "${FORCE:-0}" != 1 ] && [ -f "$pkg_stamp_file" ] && [ "$(cat "$pkg_stamp_file")" = "$pkg_stamp" ] \
     && "$VPY" -c 'import kvtuner_hicache' 2>/dev/null; then
    log "our package is installed (editable, python/pyproject.toml unchanged)"
  else
    # --no-deps: its dependencies are in requirements-cpu.txt already; letting pip resolve them
    # could only replace the CPU torch.
    log "pip install --no-deps -e ./python"
    rm -f "$pkg_stamp_file"
    pipq install --no-deps -e "$REPO/python"
    echo "$pkg_stamp" >"$pkg_stamp_file"
  fi
else
  log "python/pyproject.toml not found: skipping the editable install of our package"
fi

# --- check --------------------------------------------------------------------------------------
"$VPY" "$REPO/scripts/check_sglang_imports.py"
log "done in $(( $(date +%s) - start )) s: $VENV"
