#!/bin/bash
# Build the per-release overlay .stage/sglang-<ver>.tar.xz that scripts/device/try_releases.sh and
# run_server.sh (SGLANG_RELEASE=<ver>) lay over the 0.5.17 base (.stage/sglang-site.tar.xz).
#   bash scripts/device/sglang_overlay.sh 0.5.23 [0.5.22 ...]      (make_bundle.sh calls this)
# An overlay holds only that release's sglang/ package (+ its dist-info), stripped like the base (no
# multimodal_gen, no Rust extensions *.so, no sglang/test), plus what its import chain needs on the GPU
# machine beyond the base (found with scripts/device/check_release_imports.py --fake-cuda on a CPU box;
# see docs/device.md):
#   0.5.22, 0.5.23  nothing: the chain imports with the base's transformers 5.12.1 / tokenizers 0.22.2 /
#                   xgrammar 0.2.1 / openai 2.6.1 / msgspec 0.22.0 although they pin newer ones
#   0.5.20, 0.5.21  a stub `deep_gemm` package: layers/attention/dsa_backend.py does `import deep_gemm`
#                   at module level under is_cuda(), reached from models/deepseek_v2 (sgl-deep-gemm is a
#                   compiled package for another torch); the servers run with SGLANG_ENABLE_JIT_DEEPGEMM=0
# EXTRA="pkg==v ..." adds pinned wheels (cp312, extracted) to every overlay built by this call; a package
# shipped in an overlay replaces the base's copy (the unpacker removes each top-level entry the overlay has,
# listed in .stage/sglang-<ver>.top, and the base's dist-info of the same project).
# Env: STAGE (<repo>/.stage), XZ_LEVEL (9), FORCE_OVERLAY=1 rebuilds existing ones, PYTHON (python3),
#      WHEELS (/tmp/sgl_wheels: downloaded wheels, kept so rebuilds need no download).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STAGE=${STAGE:-$REPO/.stage}
PY=${PYTHON:-python3}
XZ_LEVEL=${XZ_LEVEL:-9}
WHEELS=${WHEELS:-/tmp/sgl_wheels}
PLAT=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
mkdir -p "$STAGE"
for ver in "$@"; do
  out="$STAGE/sglang-$ver.tar.xz"
  if [ -s "$out" ] && [ -s "$STAGE/sglang-$ver.top" ] && [ "${FORCE_OVERLAY:-0}" != 1 ]; then
    echo "reusing $out (FORCE_OVERLAY=1 rebuilds it)"; continue
  fi
  work=$(mktemp -d /tmp/sgl_overlay.XXXXXX)
  mkdir -p "$work/site" "$WHEELS/$ver"
  # shellcheck disable=SC2086
  PIP_CONSTRAINT= nice -n 10 "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" \
    -d "$WHEELS/$ver" "sglang==$ver" ${EXTRA:-} 2>&1 | { grep -v "is ignored: it is neither" || true; }
  "$PY" - "$WHEELS/$ver" "$work/site" "sglang==$ver" ${EXTRA:-} <<'PYEOF'
import glob, os, sys, zipfile
wheels, site, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
SKIP = ("sglang/multimodal_gen/", "sglang/test/")
prefixes = tuple(w.split("==")[0].replace("-", "_").lower() + "-" + w.split("==")[1] + "-" for w in wanted)
for w in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    if not os.path.basename(w).lower().startswith(prefixes):
        continue  # a wheel left in the cache by an earlier call with another EXTRA
    with zipfile.ZipFile(w) as z:
        names = [n for n in z.namelist() if "/__pycache__/" not in n and not n.split("/")[0].endswith(".data")]
        if os.path.basename(w).startswith("sglang-"):
            # Rust extensions (_server/_grpc/_multimodal/_bench, rust_tree_core/mem_cache) are built for
            # the release's torch; without them SGLang uses the HTTP server and the Python TreeCore.
            names = [n for n in names if not n.startswith(SKIP) and not n.endswith(".so")]
        z.extractall(site, members=names)
    print("  extracted", os.path.basename(w))
PYEOF
  case "$ver" in
    0.5.20|0.5.21)
      mkdir -p "$work/site/deep_gemm"
      cat > "$work/site/deep_gemm/__init__.py" <<'PYEOF'
"""Bundle stub (scripts/device/sglang_overlay.sh): sgl-deep-gemm is not shipped.

SGLang 0.5.20/0.5.21 import deep_gemm at module level in layers/attention/dsa_backend.py (DeepSeek
sparse attention), which models/deepseek_v2 pulls in. Nothing here is callable; run with
SGLANG_ENABLE_JIT_DEEPGEMM=0 (scripts/device/run_server.sh sets it).
"""


def __getattr__(name):
    raise AttributeError(f"deep_gemm is a bundle stub (no sgl-deep-gemm on this machine): {name}")
PYEOF
      ;;
  esac
  (cd "$work/site" && ls -A) > "$STAGE/sglang-$ver.top"
  echo "  overlay $ver: $(du -sh "$work/site" | cut -f1) unpacked; top-level: $(tr '\n' ' ' < "$STAGE/sglang-$ver.top")"
  tar -C "$work/site" -cf - . | nice -n 10 xz -T0 -"$XZ_LEVEL" > "$out.tmp" && mv "$out.tmp" "$out"
  echo "wrote $out ($(stat -c %s "$out") bytes)"
  rm -rf "$work"
done
