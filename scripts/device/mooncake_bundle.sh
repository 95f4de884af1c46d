#!/bin/bash
# Builds .mooncake/ (git-ignored, ~19 MB) on this machine: what a device call needs to run SGLang's
# `mooncake` L3 backend against a real mooncake_master on the GPU machine (Python 3.12, no network).
#   .mooncake/mooncake_cp312.tar.xz  the mooncake-transfer-engine-non-cuda wheel for cp312, unpacked and
#                                   slimmed: its benchmark and client binaries dropped (the etcd and asio
#                                   libraries the wheel holds twice, patched apart, stay: xz stores the
#                                   second copy for ~0.4 MB)
#   .mooncake/debs/*.deb             Debian 12 packages of the system libraries its binaries link
#                                   (libibverbs, libnuma, libcurl and theirs); the device script links only
#                                   those its image lacks
# It travels without .stage (.stage + this exceed a call's 64 MiB): carry [".mooncake"] in a call made
# while the machine is still warm from one that carried .stage (scripts/device/session_bench_e2e.sh with
# L3_BACKEND=mooncake checks for that and stops at once otherwise).
set -euo pipefail
cd "$(dirname "$0")/../.."
MOONCAKE_VERSION=$(sed -n 's/^MOONCAKE_VERSION=//p' scripts/l3/install_engines.sh)
D=.mooncake
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
rm -rf "$D" && mkdir -p "$D/debs"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$W" \
  "mooncake-transfer-engine-non-cuda==$MOONCAKE_VERSION"
mkdir "$W/x" && (cd "$W/x" && python3 -m zipfile -e "$W"/mooncake_transfer_engine_non_cuda-*.whl .)
(
  cd "$W/x"
  rm -f mooncake/transfer_engine_bench mooncake/mooncake_client
  chmod +x mooncake/mooncake_master
  XZ_OPT=-9e tar -cJf "$OLDPWD/$D/mooncake_cp312.tar.xz" .
)
(cd "$D/debs" && apt-get download libibverbs1 libnl-3-200 libnl-route-3-200 libnuma1 libcurl4 libnghttp2-14 \
  librtmp1 libssh2-1 libpsl5 libbrotli1 libldap-2.5-0 libsasl2-2 libsasl2-modules-db libdb5.3 libgssapi-krb5-2 \
  libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libidn2-0 libunistring2 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
echo "mooncake_bundle: $(du -sh "$D" | cut -f1) in $D ($MOONCAKE_VERSION, cp312)"
