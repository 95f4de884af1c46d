"""Import an SGLang release's server module chain, as the GPU machine would, and report what it pulls in.

Two uses:

* on the GPU machine (scripts/device/try_releases.sh): plain ``python3 check_release_imports.py``
  with ``PYTHONPATH`` set to the unpacked bundle; every module of the chain must import.
* on a CPU box, to find the dependencies a release's overlay needs (scripts/device/make_bundle.sh, by hand):
  ``python check_release_imports.py --fake-cuda --origins`` fakes an H200 (``torch.cuda.is_available()``
  and friends, ``sgl_kernel``'s op-library loading) so that the ``if is_cuda()`` branches import what
  they import on the device, and prints which top-level packages were loaded from where.

Output: one line per chain module (``ok``/``FAIL <first error line>``), then ``RESULT ok`` or
``RESULT fail <module>: <first error line>``; ``--json FILE`` writes the same as JSON. Exit 0 iff all imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
import types

# launch_server -> http_server -> (tokenizer manager, scheduler -> model_runner -> models, tree cache,
# host pools, cache controller, attention backend, sampler). Modules absent from a release are skipped
# when marked optional (name ends with "?").
CHAIN = [
    "sglang.launch_server",
    "sglang.srt.server_args",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.managers.scheduler",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.models.qwen2",
    "sglang.srt.models.deepseek_v2",
    "sglang.srt.mem_cache.unified_radix_cache?",
    "sglang.srt.mem_cache.hiradix_cache?",
    "sglang.srt.mem_cache.memory_pool_host?",
    "sglang.srt.mem_cache.pool_host?",
    "sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler?",
    "sglang.srt.managers.cache_controller",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.layers.sampler",
]


def fake_cuda() -> None:
    """Make a CPU torch look like one H200 to import-time checks, and skip sgl_kernel's .so loading."""
    import torch

    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=141 * 2**30,
                                  multi_processor_count=132, gcnArchName="", L2_cache_size=50 * 2**20,
                                  warp_size=32, uuid="fake")
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_name = lambda *a, **k: "NVIDIA H200"
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.mem_get_info = lambda *a, **k: (130 * 2**30, 141 * 2**30)
    torch.version.cuda = "13.0"
    torch.version.hip = None

    class _Any(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return lambda *a, **k: None

    lu = _Any("sgl_kernel.load_utils")
    lu._load_architecture_specific_ops = lambda *a, **k: _Any("sgl_kernel.common_ops")
    lu._preload_cuda_library = lambda *a, **k: None
    sys.modules["sgl_kernel.load_utils"] = lu


def origins(prefixes: list[str]) -> dict[str, str]:
    """Top-level package -> the sys.path entry it was loaded from (stdlib and builtins left out)."""
    std = os.path.dirname(os.__file__)
    out = {}
    for name, mod in sorted(sys.modules.items()):
        if "." in name or mod is None:
            continue
        f = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
        if not f:
            continue
        f = os.path.realpath(f)
        if f.startswith(std) and "site-packages" not in f:
            continue
        where = next((p for p in prefixes if f.startswith(p)), os.path.dirname(os.path.dirname(f)))
        out[name] = where
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fake-cuda", action="store_true", help="CPU box: pretend to be an H200")
    ap.add_argument("--origins", action="store_true", help="print where each top-level package came from")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--traceback", action="store_true", help="print full tracebacks of failures")
    ap.add_argument("modules", nargs="*", help="modules to import instead of the server chain")
    a = ap.parse_args()
    os.environ.setdefault("SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND", "python")
    if a.fake_cuda:
        fake_cuda()
    t0 = time.time()
    results, first_fail = [], None
    for spec in a.modules or CHAIN:
        name, optional = spec.rstrip("?"), spec.endswith("?")
        tb = ""
        try:
            importlib.import_module(name)
            status, err = "ok", ""
        except BaseException as e:  # noqa: BLE001 - SystemExit from a module is a failure too
            tb = traceback.format_exc()
            missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
            if optional and missing and (name == missing or name.startswith(missing + ".")):
                status, err = "absent", ""
            else:
                msg = str(e).splitlines()[0] if str(e) else ""
                status, err = "FAIL", f"{type(e).__name__}: {msg}"
        if status == "FAIL":
            first_fail = first_fail or (name, err)
            if a.traceback:
                print(tb, file=sys.stderr)
        results.append({"module": name, "status": status, "error": err})
        print(f"  {status:6s} {name}{'  ' + err if err else ''}", flush=True)
    sg = sys.modules.get("sglang")
    version = getattr(sg, "__version__", None) if sg else None
    if version is None:
        try:
            from importlib.metadata import version as v

            version = v("sglang")
        except Exception:  # noqa: BLE001
            version = "?"
    summary = {"sglang": version, "ok": first_fail is None, "seconds": round(time.time() - t0, 1),
               "first_error": f"{first_fail[0]}: {first_fail[1]}" if first_fail else "", "modules": results}
    if a.origins:
        prefixes = [os.path.realpath(p) + os.sep for p in sys.path if p and os.path.isdir(p)]
        summary["origins"] = origins(prefixes)
        for k, where in summary["origins"].items():
            print(f"  origin {k:28s} {where}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"RESULT {'ok' if first_fail is None else 'fail ' + summary['first_error']} "
          f"(sglang {version}, {summary['seconds']} s)", flush=True)
    return 0 if first_fail is None else 1


if __name__ == "__main__":
    sys.exit(main())
