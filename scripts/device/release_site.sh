#!/bin/bash
# Sourced by try_releases.sh and run_server.sh (GPU machine, repo root, .stage carried):
#   release_site VER [fresh]   prints the site dir of SGLang VER (PYTHONPATH=<it>), building it if needed:
#       $KVTQ_SGL_ROOT/base          .stage/sglang-site.tar.xz (0.5.17 + deps), unpacked once (again when it changed)
#       $KVTQ_SGL_ROOT/<VER>         a hard-link copy of base; for VER != 0.5.17 the base's sglang/ and each other
#                               top-level entry of the overlay (.stage/sglang-<VER>.top) are removed (with the
#                               base's dist-info of the same projects) and .stage/sglang-<VER>.tar.xz unpacked
#       "fresh" rebuilds $KVTQ_SGL_ROOT/<VER> even when its stamp matches.
#   staged_releases            the staged overlays' versions, newest first, then 0.5.17
#   server_env SITE            exports the environment the servers run with
# Env: STAGE (.stage), KVTQ_SGL_ROOT (/tmp/sgl).
STAGE=${STAGE:-.stage}
KVTQ_SGL_ROOT=${KVTQ_SGL_ROOT:-/tmp/sgl}

_stamp() { stat -c '%n %s %Y' "$@" 2>/dev/null | tr '\n' ' '; }

staged_releases() {
  # shellcheck disable=SC2012
  ls "$STAGE"/sglang-0.*.tar.xz 2>/dev/null | sed 's|.*/sglang-||; s|\.tar\.xz$||' | sort -t. -k1,1nr -k2,2nr -k3,3nr
  echo 0.5.17
}

release_site() {
  local ver=$1 fresh=${2:-} base=$KVTQ_SGL_ROOT/base site=$KVTQ_SGL_ROOT/$1 st ov top e proj
  local -a ents
  [ -s "$STAGE/sglang-site.tar.xz" ] || { echo "no $STAGE/sglang-site.tar.xz (run scripts/device/make_bundle.sh, carry .stage)" >&2; return 1; }
  st=$(_stamp "$STAGE/sglang-site.tar.xz")
  if [ "$(cat "$base/.unpacked" 2>/dev/null)" != "$st" ]; then
    rm -rf "$base" && mkdir -p "$base"
    tar -C "$base" -xJf "$STAGE/sglang-site.tar.xz" || { echo "unpack of $STAGE/sglang-site.tar.xz failed" >&2; return 1; }
    echo "$st" > "$base/.unpacked"
  fi
  ov=""
  if [ "$ver" != 0.5.17 ]; then
    ov=$STAGE/sglang-$ver.tar.xz
    [ -s "$ov" ] || { echo "no overlay $ov for SGLang $ver (make_bundle.sh RELEASES=\"$ver\")" >&2; return 1; }
    st="$st $(_stamp "$ov")"
  fi
  if [ -z "$fresh" ] && [ "$(cat "$site/.unpacked" 2>/dev/null)" = "$st" ]; then echo "$site"; return 0; fi
  rm -rf "$site" && cp -al "$base" "$site" && rm -f "$site/.unpacked" || { echo "copy of $base failed" >&2; return 1; }
  if [ -n "$ov" ]; then
    top=$STAGE/sglang-$ver.top
    if [ -s "$top" ]; then mapfile -t ents < "$top"; else mapfile -t ents < <(tar -tJf "$ov" | sed 's|^\./||' | cut -d/ -f1 | sort -u | grep -v '^$'); fi
    for e in "${ents[@]}"; do
      case "$e" in
        *.dist-info) proj=${e%%-[0-9]*}; rm -rf "$site/$proj"-[0-9]*.dist-info ;;
        *) rm -rf "${site:?}/$e" ;;
      esac
    done
    tar -C "$site" -xJf "$ov" || { echo "unpack of $ov failed" >&2; return 1; }
    # no CuTe DSL on this image: the dual-GEMM probe of 0.5.22+ gets our "not available" shim
    dg=$site/sglang/kernels/ops/gemm/cutedsl_dual_gemm.py
    if [ -f "$dg" ] && ! PYTHONPATH=$site python3 -c "import cutlass" 2>/dev/null; then
      rm -f "$dg" && cp "$(dirname "${BASH_SOURCE[0]}")/shims/cutedsl_dual_gemm.py" "$dg"
    fi
  fi
  echo "$st" > "$site/.unpacked"
  echo "$site"
}

server_env() {
  local site=$1
  # KVTQ_EXTRA_PYTHONPATH: packages beside the site (bench_e2e.py --l3-backend mooncake: the Mooncake client)
  export PYTHONPATH=$site${KVTQ_EXTRA_PYTHONPATH:+:$KVTQ_EXTRA_PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  # newer releases on the 0.5.17 kernels: skip their sglang-kernel/flashinfer minimum-version asserts, use
  # the Python TreeCore (the Rust one is not shipped), and never take deep_gemm paths (0.5.20/21 get a stub)
  export SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python SGLANG_ENABLE_JIT_DEEPGEMM=0
  if [ "${SLIM_MODELS:-1}" = 1 ] && [ -z "${SGLANG_DISABLED_MODEL_ARCHS:-}" ]; then
    # skip importing SGLang's ~200 other model modules at start-up (keeps qwen2 and deepseek_v2)
    SGLANG_DISABLED_MODEL_ARCHS=$(cd "$site/sglang/srt/models" 2>/dev/null && ls ./*.py | sed 's|^\./||; s|\.py$||' \
      | grep -v -x -E 'qwen2|deepseek_v2|__init__|registry' | paste -sd, -)
    export SGLANG_DISABLED_MODEL_ARCHS
  fi
}

resolve_release() {  # SGLANG_RELEASE, else what try_releases.sh found here, else .stage/release, else 0.5.17
  local r=${SGLANG_RELEASE:-}
  [ -n "$r" ] || r=$(cat "$KVTQ_SGL_ROOT/chosen_release" 2>/dev/null)
  [ -n "$r" ] || [ ! -f "$STAGE/release" ] || r=$(tr -d ' \n' < "$STAGE/release")
  echo "${r:-0.5.17}"
}
