"""Measure L3 bytes and write/read times per engine and config on this machine (docs/storage.md).

Run with the engines up: `bash scripts/l3/start_engines.sh && .venv/bin/python scripts/l3/bench_l3.py`.
Each cell: 12 pages of 64 tokens (Qwen2.5-7B head shape, 4 layers) backed up through SGLang's
backup thread and prefetched back through its prefetch threads; median of 5 runs.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "python"), str(REPO / "test" / "l3")]

import conftest  # noqa: E402
import harness as H  # noqa: E402
from kvtuner_hicache.sglang_ext.plugin import register  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

PAGES, RUNS = 12, 5  # the harness device pool holds 16 pages


def main() -> None:
    register()  # our hooks and the L3 backend hooks
    HookRegistry.apply_hooks()
    env = conftest.engine_env()
    sys.path.insert(0, env["L3_MOONCAKE_PYTHONPATH"])
    engines = {
        "juicefs": {"mount_point": env["L3_JUICEFS_MOUNT"], "subdir": f"bench{time.time_ns()}"},
        "lmcache": {"endpoint": env["L3_LMCACHE_ENDPOINT"]},
        "mooncake": {"master_server_address": env["L3_MOONCAKE_MASTER"], "metadata_server": "P2PHANDSHAKE",
                     "protocol": "tcp", "device_name": "", "local_hostname": "127.0.0.1",
                     "global_segment_size": 256 << 20},
    }
    print("| engine | config | bytes/page | bytes/token | write ms/page | read ms/page | write MB/s | read MB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, extra in engines.items():
        for cfg_name, cfg in (("bf16", None), ("KV4", H.KV4)):
            rig = H.make_rig(name, extra, cfg, model=f"bench-{cfg_name}-{time.time_ns()}")
            page = rig.page_bytes()
            ws, rs = [], []
            try:
                for r in range(RUNS):
                    toks = H.tokens_for(PAGES, seed=1000 + r)
                    t0 = time.perf_counter()
                    h, done = H.backup(rig, toks, list(range(PAGES)))
                    ws.append(time.perf_counter() - t0)
                    assert done == PAGES * H.PAGE
                    rig.host.free(h)
                    t0 = time.perf_counter()
                    h2, hits, got = H.prefetch(rig, toks)
                    rs.append(time.perf_counter() - t0)
                    assert got == PAGES * H.PAGE
                    rig.host.free(h2)
            finally:
                rig.close()
            w, r = statistics.median(ws), statistics.median(rs)
            mb = PAGES * page / 1e6
            print(f"| {name} | {cfg_name} | {page} | {page // H.PAGE} | {1e3 * w / PAGES:.2f} | {1e3 * r / PAGES:.2f} | "
                  f"{mb / w:.0f} | {mb / r:.0f} |", flush=True)


if __name__ == "__main__":
    main()
