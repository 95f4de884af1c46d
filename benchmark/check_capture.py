"""Check what the debug capture (KVTQ_CAPTURE_DIR, python/kvtuner_hicache/quant/capture.py) saved
from a real server: every page loaded back to the GPU (from L2 or from L3) must equal, bit for bit,
the reference dequantization (`kvtuner_hicache.quant.reference.roundtrip_pages`, run here on the CPU)
of the bf16 rows that were backed up into that page.

    python benchmark/check_capture.py CAPTURE_DIR [CAPTURE_DIR ...] [--json out.json]

A CAPTURE_DIR holds one `pool_<pid>_<label>/` per host pool (meta.json, backup_*.pt, load_*.pt).
Exit status 1 when any loaded page differs, or when a directory has no loaded page to check.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

import torch
from kvtuner_hicache.config import KVShape
from kvtuner_hicache.page_format import PageLayout
from kvtuner_hicache.quant.reference import roundtrip_pages
from kvtuner_hicache.sglang_ext.args import config_from_json


def layout_from_meta(meta: dict[str, Any]) -> PageLayout:
    cfg = config_from_json(json.dumps(meta["config"]), source="capture meta.json")
    shape = KVShape(**meta["shape"])
    return PageLayout(cfg, shape, meta["page_size"], start_layer=meta["start_layer"])


def _as_layer_kv(rows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """[buffer][L, ps, H, D] -> [buffer][layer] of [ps, H, D] (what roundtrip_pages takes)."""
    return [[r[layer] for layer in range(r.shape[0])] for r in rows]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def check_pool_dir(d: str) -> dict[str, Any]:
    meta = json.load(open(os.path.join(d, "meta.json")))
    layout = layout_from_meta(meta)
    res: dict[str, Any] = {"dir": d, "config": layout.cfg.short_name(), "tag": meta["tag"], "codec": meta["codec"],
                           "backups": len(glob.glob(os.path.join(d, "backup_*.pt"))),
                           "l2": {"ok": 0, "bad": 0}, "l3": {"ok": 0, "bad": 0},
                           "max_abs_err_vs_bf16": 0.0, "frac_elements_changed": None, "bad_pages": []}
    ref_cache: dict[str, list[torch.Tensor]] = {}
    changed, total = 0, 0
    for f in sorted(glob.glob(os.path.join(d, "load_*.pt"))):
        ld = torch.load(f, weights_only=False)
        bname = ld["backup"]
        bk = torch.load(os.path.join(d, bname), weights_only=False)
        if bname not in ref_cache:
            out = roundtrip_pages(layout, _as_layer_kv(bk["rows"]))
            ref_cache[bname] = [torch.stack(per_layer) for per_layer in out]
        ref = ref_cache[bname]
        ok = len(ref) == len(ld["rows"]) and all(_bits_equal(r, g) for r, g in zip(ref, ld["rows"], strict=False))
        res[ld["source"]]["ok" if ok else "bad"] += 1
        if not ok:
            diff = max(float((r.float() - g.float()).abs().max()) for r, g in zip(ref, ld["rows"], strict=False))
            res["bad_pages"].append({"file": os.path.basename(f), "source": ld["source"], "max_abs_diff_vs_ref": diff})
        for orig, got in zip(bk["rows"], ld["rows"], strict=False):
            err = (orig.float() - got.float()).abs()
            res["max_abs_err_vs_bf16"] = max(res["max_abs_err_vs_bf16"], float(err.max()))
            changed += int((err > 0).sum())
            total += err.numel()
    if total:
        res["frac_elements_changed"] = changed / total
    return res


def check(dirs: list[str]) -> list[dict[str, Any]]:
    out = []
    for root in dirs:
        pools = sorted(p for p in glob.glob(os.path.join(root, "pool_*")) if os.path.isfile(os.path.join(p, "meta.json")))
        if not pools:
            out.append({"dir": root, "error": "no capture (pool_*/meta.json) found"})
        for p in pools:
            try:
                out.append(check_pool_dir(p))
            except Exception as e:  # report, keep checking the others
                out.append({"dir": p, "error": f"{type(e).__name__}: {e}"})
    return out


def pack_sample(root: str, tgz: str, max_bytes: int = 15 << 20) -> dict[str, Any]:
    """Write a small, self-contained part of capture `root` (first pool) to `tgz` so that this script can
    re-check it elsewhere: meta.json plus loaded pages with the backups they reference, an L3 load
    first, then L2 loads, while the files total at most `max_bytes` (uncompressed)."""
    import tarfile

    pools = sorted(p for p in glob.glob(os.path.join(root, "pool_*")) if os.path.isfile(os.path.join(p, "meta.json")))
    if not pools:
        return {"root": root, "error": "no capture"}
    pool = pools[0]
    loads = sorted(glob.glob(os.path.join(pool, "load_l3_*.pt")))[:1] + sorted(glob.glob(os.path.join(pool, "load_l2_*.pt")))
    files = ["meta.json"]
    size = os.path.getsize(os.path.join(pool, "meta.json"))
    for f in loads:
        need = [os.path.basename(f), torch.load(f, weights_only=False)["backup"]]
        extra = [n for n in need if n not in files]
        add = sum(os.path.getsize(os.path.join(pool, n)) for n in extra)
        if size + add > max_bytes:
            continue
        files += extra
        size += add
    arc = os.path.join(os.path.basename(os.path.normpath(root)), os.path.basename(pool))
    with tarfile.open(tgz, "w:gz", compresslevel=6) as t:
        for n in files:
            t.add(os.path.join(pool, n), arcname=os.path.join(arc, n))
    return {"root": root, "tgz": tgz, "files": files, "bytes": size, "tgz_bytes": os.path.getsize(tgz)}


def passed(r: dict[str, Any]) -> bool:
    return "error" not in r and r["l2"]["bad"] == 0 and r["l3"]["bad"] == 0 and r["l2"]["ok"] + r["l3"]["ok"] > 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    results = check(a.dirs)
    for r in results:
        if "error" in r:
            print(f"ERROR {r['dir']}: {r['error']}")
            continue
        print(f"{'PASS' if passed(r) else 'FAIL'} {r['config']:<16} codec={r['codec']:<9} backups={r['backups']:3d} "
              f"L2 ok/bad={r['l2']['ok']}/{r['l2']['bad']} L3 ok/bad={r['l3']['ok']}/{r['l3']['bad']} "
              f"max|err| vs bf16={r['max_abs_err_vs_bf16']:.4g} changed={r['frac_elements_changed']}  {r['dir']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results and all(passed(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
