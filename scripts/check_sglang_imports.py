"""Check that the SGLang pieces our package builds on import and run on this CPU-only venv.

Run by scripts/setup.sh at the end (about 10 s, most of it `import sglang`). Exit status 0 when
every required check passed, 1 otherwise. Prints one line per check.

    .venv/bin/python scripts/check_sglang_imports.py               # the checks
    .venv/bin/python scripts/check_sglang_imports.py --signatures  # Markdown list of the
        constructor signatures we rely on (docs/notes-sglang-<version>-signatures.md)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings

REQUIRED_IMPORTS = [
    ("sglang.srt.server_args", ["ServerArgs", "prepare_server_args"]),
    ("sglang.srt.mem_cache.memory_pool", ["MHATokenToKVPool", "MLATokenToKVPool"]),
    ("sglang.srt.mem_cache.pool_host.mha", ["MHATokenToKVPoolHost"]),
    ("sglang.srt.mem_cache.pool_host.mla", ["MLATokenToKVPoolHost"]),
    ("sglang.srt.mem_cache.hicache_storage", ["HiCacheFile"]),
    ("sglang.srt.managers.cache_controller", ["HiCacheController"]),
    ("sglang.srt.mem_cache.registry", ["create_tree_cache"]),
    ("sglang.srt.plugins.hook_registry", ["HookRegistry"]),
    ("sglang.srt.mem_cache.storage.backend_factory", ["StorageBackendFactory"]),
]

failures: list[str] = []


def ok(msg: str) -> None:
    print(f"  ok    {msg}", flush=True)


def fail(msg: str, exc: BaseException | None = None) -> None:
    failures.append(msg)
    print(f"  FAIL  {msg}", flush=True)
    if exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, limit=-6)


def info(msg: str) -> None:
    print(f"  info  {msg}", flush=True)


def versions() -> None:
    import torch

    info(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda build: {torch.version.cuda})")
    for dist in ("sglang", "transformers", "tokenizers", "triton", "xgrammar"):
        try:
            info(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            info(f"{dist} not installed")
    try:
        tv = importlib.import_module("torchvision")
        kind = "import-only stub (scripts/setup.sh)" if getattr(tv, "KVTUNER_STUB", False) else "real"
        info(f"torchvision {tv.__version__}: {kind}")
    except Exception as e:  # noqa: BLE001
        info(f"torchvision: not importable ({type(e).__name__}: {e})")
    if torch.version.cuda is not None:
        fail("torch is a CUDA build; expected the CPU wheel torch==2.13.0+cpu")


def check_release() -> None:
    """The installed release is supported and every hook target of its era resolves."""
    from kvtuner_hicache.sglang_ext import plugin
    from kvtuner_hicache.sglang_ext.eras import active_era, active_release, unsupported_release_error

    err = unsupported_release_error()
    if err:
        fail(err)
        return
    era = active_era()
    for target, _hook, _kind in plugin.hooks_for(era, active_release()):
        try:
            plugin._resolve(target)
        except Exception as e:  # noqa: BLE001
            fail(f"hook target {target} of era {era.name}", e)
    ok(f"SGLang {active_release()} is supported (era {era.name}); every hook target of the era resolves")


def check_imports() -> dict[str, object]:
    found: dict[str, object] = {}
    for mod, names in REQUIRED_IMPORTS:
        t0 = time.perf_counter()
        try:
            m = importlib.import_module(mod)
            for n in names:
                found[n] = getattr(m, n)
            ok(f"from {mod} import {', '.join(names)}  ({time.perf_counter() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001
            fail(f"from {mod} import {', '.join(names)}", e)
    return found


def check_pools(found: dict[str, object]) -> None:
    import torch

    needed = ("MHATokenToKVPool", "MHATokenToKVPoolHost", "MLATokenToKVPool", "MLATokenToKVPoolHost", "HiCacheFile")
    if any(n not in found for n in needed):
        fail("pool checks skipped: imports failed")
        return
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    MHATokenToKVPool = found["MHATokenToKVPool"]
    MHATokenToKVPoolHost = found["MHATokenToKVPoolHost"]
    page, layers, heads, dim = 16, 2, 2, 64
    try:
        dev = MHATokenToKVPool(
            size=256, page_size=page, dtype=torch.bfloat16, head_num=heads, head_dim=dim,
            layer_num=layers, device="cpu", enable_memory_saver=False,
        )
        kb = dev.k_buffer[0]
        ok(f"MHATokenToKVPool(size=256, page_size=16, bf16, 2 heads x 64, 2 layers, cpu): "
           f"k_buffer = {len(dev.k_buffer)} x {tuple(kb.shape)} {kb.dtype}")
    except Exception as e:  # noqa: BLE001
        fail("MHATokenToKVPool on CPU", e)
        return
    try:
        if "buffer_info" in inspect.signature(MHATokenToKVPoolHost.__init__).parameters:  # 0.5.23+
            host = MHATokenToKVPoolHost(
                dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, page, "page_first", pin_memory=False,
                device_capacity_tokens=dev.size, start_layer=dev.start_layer, end_layer=dev.end_layer,
            )
        else:
            host = MHATokenToKVPoolHost(
                dev, host_to_device_ratio=2.0, host_size=0, page_size=page, layout="page_first",
                pin_memory=False, device="cpu",
            )
        ok(f"MHATokenToKVPoolHost(ratio 2.0, page_first, pin_memory=False): size {host.size} tokens, "
           f"kv_buffer {tuple(host.kv_buffer.shape)} {host.kv_buffer.dtype}")
    except Exception as e:  # noqa: BLE001
        fail("MHATokenToKVPoolHost on CPU", e)
        return
    try:
        idx = host.alloc(2 * page)
        flat = torch.randn(host.get_dummy_flat_data_page().numel()).to(torch.bfloat16)
        host.set_from_flat_data_page(int(idx[0]), flat)
        assert torch.equal(host.get_data_page(int(idx[0]), flat=True), flat)
        ok(f"host pool alloc / set_from_flat_data_page / get_data_page round trip ({flat.numel()} elements a page)")
    except Exception as e:  # noqa: BLE001
        fail("host pool page round trip", e)
        return
    try:
        with tempfile.TemporaryDirectory(prefix="kvt-hicache-check-") as d:
            os.environ.pop("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", None)
            cfg = HiCacheStorageConfig(
                tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                model_name="check",
            )
            store = found["HiCacheFile"](cfg, file_path=d)
            assert store.set("page0", flat)
            back = torch.empty_like(flat)
            assert store.get("page0", back) is not None and torch.equal(back, flat)
            assert store.exists("page0")
        ok("HiCacheFile(HiCacheStorageConfig(...), file_path=tmp).set/get/exists round trip")
    except Exception as e:  # noqa: BLE001
        fail("HiCacheFile round trip", e)
    # Device <-> host copies go through sgl_kernel (CUDA only, not installed here): report, don't fail.
    try:
        host.backup_from_device_all_layer(dev, idx, torch.arange(page, 3 * page), "kernel")
        info("backup_from_device_all_layer(io_backend='kernel') ran on CPU")
    except Exception as e:  # noqa: BLE001
        info(f"backup_from_device_all_layer on CPU is unavailable, as expected without sgl_kernel "
             f"({type(e).__name__}: {e})")
    try:
        mla = found["MLATokenToKVPool"](
            size=256, page_size=page, dtype=torch.bfloat16, kv_lora_rank=512, qk_rope_head_dim=64,
            layer_num=layers, device="cpu", enable_memory_saver=False,
        )
        ok(f"MLATokenToKVPool(kv_lora_rank 512, rope 64, cpu): kv_buffer {tuple(mla.kv_buffer[0].shape)}")
    except Exception as e:  # noqa: BLE001
        fail("MLATokenToKVPool on CPU", e)


def _format_params(sig: inspect.Signature) -> str:
    """Like str(sig), but with string annotations unquoted and defaults as repr()."""
    out, star_done = [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star_done:
            out.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            ann = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
            text += f": {ann}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        out.append(text)
    return ", ".join(out)


def signatures() -> None:
    """Markdown: the constructor signatures we build against."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.base import HostKVCache
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    for obj in (MHATokenToKVPool, MLATokenToKVPool, MHATokenToKVPoolHost, MLATokenToKVPoolHost, HostKVCache,
                HiCacheFile, HiCacheStorageConfig):
        sig = inspect.signature(obj) if obj is HiCacheStorageConfig else inspect.signature(obj.__init__)
        bases = ", ".join(b.__name__ for b in obj.__bases__)
        src = inspect.getsourcefile(obj).split("site-packages/")[-1]
        print(f"### `{obj.__name__}` ({obj.__module__}; bases: {bases})\n")
        print(f"`{src}`\n")
        print("```python")
        name = obj.__name__ if obj is HiCacheStorageConfig else f"{obj.__name__}.__init__"
        print(f"{name}({_format_params(sig)})")
        print("```\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--signatures", action="store_true", help="print the constructor signatures as Markdown")
    args = ap.parse_args()
    # sglang warns about every CUDA-only feature on import; keep the output readable.
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.signatures:
        signatures()
        return 0
    t0 = time.perf_counter()
    print("check_sglang_imports: SGLang on CPU", flush=True)
    versions()
    found = check_imports()
    check_release()
    check_pools(found)
    status = "FAILED: " + "; ".join(failures) if failures else "all checks passed"
    print(f"check_sglang_imports: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
