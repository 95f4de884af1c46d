#!/bin/bash
# Adapted from the team recipe ../shared/device/make_bundle.sh (scripts/device/make_bundle.sh calls this).
# Build the SGLang site archive that lets the GPU machine (no network; Python 3.12,
# torch 2.11.0+cu130, triton 3.6.0 preinstalled) run a real SGLang 0.5.17 server.
#
# Usage (from anywhere; needs PyPI access and ~3 GB of scratch disk):
#   bash ../shared/device/make_bundle.sh     # from your repo root; writes .stage/sglang-site.tar.xz + .stage/tools/
#   KEEP=1 WORK=/some/dir bash .../make_bundle.sh         # keep the scratch dir for inspection
#   FI_DATA=1 bash .../make_bundle.sh                      # also ship flashinfer JIT sources (unvalidated)
#   STAGE=/other/dir XZ_LEVEL=6 ...                        # output dir / faster, slightly larger archive
#
# Result: one tar.xz (~40 MiB) that unpacks into a flat site dir (use it via PYTHONPATH).
# At most 64 MiB travel to the GPU machine per call, so the archive must stay well below that.
# Then, on the GPU machine with .stage/ sent along:  bash .stage/tools/device_run.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${REPO:-$(git rev-parse --show-toplevel 2>/dev/null || pwd)}   # the repo you run it from
STAGE=${STAGE:-$REPO/.stage}
WORK=${WORK:-$(mktemp -d /tmp/sgl_bundle.XXXXXX)}
PY=${PYTHON:-python3}
export FI_DATA=${FI_DATA:-0}
XZ_LEVEL=${XZ_LEVEL:-9}

# Exact pins. sglang 0.5.17 is the newest release pinned to torch==2.11.0 (the GPU machine's torch).
# Everything below is what sglang's import chain + server start needs that the GPU image lacks
# (or has in an incompatible version: the image's transformers 5.17.0 clashes with sglang's
#  config registration -> 'qwen3_asr' is already used; sglang pins transformers==5.12.1, which
#  in turn needs tokenizers<=0.23.0 while the image has 0.23.2).
PKGS=(
  sglang==0.5.17
  sglang-kernel==0.4.5            # stripped below to sm90 ops (no 1.1 GB FA3 flash_ops)
  flashinfer-python==0.6.15.post1 # import-only (sampler imports flashinfer.sampling on CUDA); data/ dropped
  transformers==5.12.1
  tokenizers==0.22.2
  xgrammar==0.2.1
  apache-tvm-ffi==0.1.11
  openai==2.6.1
  fastapi==0.165.0
  starlette==1.10.0
  uvicorn==0.54.0
  python-multipart==0.0.34
  opentelemetry-api==1.45.2       # hard dependency of fastapi>=0.155
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  orjson==3.13.0
  pybase64==1.5.1
  msgspec==0.22.0
  pyzmq==27.3.0
  setproctitle==1.3.8
  ipython==9.18.1                 # sglang/utils.py: from IPython.display import HTML, display
  traitlets==5.16.1
  dill==0.4.1
  sniffio==1.3.1
  distro==1.9.0
  partial-json-parser==0.2.1.1.post7
  compressed-tensors==0.20.0
  loguru==0.7.3
  gguf==0.19.0
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1
  soundfile==0.13.1
  cffi==2.1.1
)

PLAT=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)

echo "scratch: $WORK"
mkdir -p "$WORK/wheels" "$WORK/site" "$STAGE"
# PIP_CONSTRAINT= : ignore any local pip constraint file (some machines cap torch etc.)
PIP_CONSTRAINT= "$PY" -m pip download --no-deps --only-binary=:all: "${PLAT[@]}" -d "$WORK/wheels" "${PKGS[@]}"

# Extract wheels (a wheel is a zip) into one flat site dir. sglang-kernel: only what is needed.
"$PY" - "$WORK/wheels" "$WORK/site" <<'PY'
import sys, zipfile, glob, os
wheels, site = sys.argv[1], sys.argv[2]
SKIP_KERNEL = ("sgl_kernel/flash_ops", "sgl_kernel/sm100/", "sgl_kernel/infllm_ops",
               "sgl_kernel/flashmla_ops")
for w in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    with zipfile.ZipFile(w) as z:
        names = z.namelist()
        if os.path.basename(w).startswith("sglang_kernel-"):
            names = [n for n in names if not n.startswith(SKIP_KERNEL)]
        if os.path.basename(w).startswith("flashinfer_python-") and os.environ.get("FI_DATA", "0") != "1":
            names = [n for n in names if not n.startswith("flashinfer/data/")]  # JIT sources, 76 MB (4.9 MB xz)
        if os.path.basename(w).startswith("xgrammar-"):
            names = [n for n in names if not n.startswith("xgrammar/lib/")]  # static libxgrammar.a
        z.extractall(site, members=names)
        # keep exec bits of shared objects
        for info in z.infolist():
            if info.filename in names and (info.external_attr >> 16) & 0o111:
                p = os.path.join(site, info.filename)
                if os.path.isfile(p): os.chmod(p, 0o755)
    print("extracted", os.path.basename(w))
PY

cd "$WORK/site"
# Strip what a text-only, HTTP-mode server never loads.
rm -rf sglang/multimodal_gen \
       sglang/srt/server/_core*.so sglang/srt/grpc/_core*.so sglang/srt/multimodal/_core*.so \
       ./*.data build_backend.py build_utils.py tools  # flashinfer/sglang build helpers, not runtime
find . -name __pycache__ -prune -exec rm -rf {} +

# PATCH (the only source change): sgl_kernel 0.4.5 routes rmsnorm/fused_add_rmsnorm through
# flashinfer.norm whenever flashinfer imports, and flashinfer JIT-compiles that from
# flashinfer/data/csrc (dropped above: 76 MB). Make sgl_kernel use its own precompiled sm90
# norm kernels instead (same algorithm, no JIT). flashinfer itself stays importable because
# sglang's sampler imports flashinfer.sampling on CUDA.
# FI_DATA=1 instead ships flashinfer/data (+~5 MiB) and leaves sgl_kernel unpatched, so flashinfer
# JIT (norm, --attention-backend flashinfer) can build with nvcc on the device: NOT yet validated there.
if [ "${FI_DATA:-0}" != 1 ]; then
  sed -i 's/^    import flashinfer.norm as _flashinfer_norm$/    raise ImportError("bundle: flashinfer JIT sources not shipped; use sgl_kernel precompiled norm")/' \
      sgl_kernel/elementwise.py
  grep -q 'bundle: flashinfer JIT sources not shipped' sgl_kernel/elementwise.py || { echo "patch of sgl_kernel/elementwise.py failed"; exit 1; }
fi
du -sh . | sed 's/^/site size: /'

OUTF="$STAGE/sglang-site.tar.xz"
tar -cf - . | xz -T0 -"$XZ_LEVEL" > "$OUTF.tmp" && mv "$OUTF.tmp" "$OUTF"
SIZE=$(stat -c %s "$OUTF")
echo "wrote $OUTF ($((SIZE / 1048576)) MiB)"
[ "$SIZE" -lt $((60 * 1048576)) ] || { echo "WARNING: bundle exceeds 60 MiB; the 64 MiB per-call limit is at risk"; }

# Make sure git ignores the stage dir (never commit bundles).
if [ -d "$REPO/.git" ]; then
  grep -qx '/.stage/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.stage/' >> "$REPO/.git/info/exclude"
fi
[ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"

