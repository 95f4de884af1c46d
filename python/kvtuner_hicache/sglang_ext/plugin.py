"""SGLang plugin entry point (`sglang.srt.plugins` group): hooks and their verification.

Hooks (all AROUND/AFTER, nothing replaces a class globally, so draft/PD/HiSparse pools stay bf16):
- ServerArgs.add_cli_args / from_cli_args: the nine flags, config -> env var, clean CLI errors.
- ServerArgs.__post_init__: start-up validation on the resolved arguments (also for Engine(**kw)).
- HiRadixCache.__init__: scoped substitution of the host pool classes; raises if the pool is not ours.
- UnifiedRadixCache.init_hicache: refuse (the unified path is not supported yet).
- registry.create_tree_cache: last check that a HiCache built anyhow has our pool.
- StorageBackendFactory.create_backend: wrap every L3 backend in the namespacing proxy.
SGLang only logs exceptions raised while applying hooks, so `verify_hooks()` checks that every
hook took effect and raises when the user asked for quantization and one did not.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvtuner_hicache.config import ConfigError, QuantConfig
from kvtuner_hicache.sglang_ext import args as kargs
from kvtuner_hicache.sglang_ext.backends import registration as l3_registration

logger = logging.getLogger(__name__)

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
T_ADD_CLI = f"{_SERVER_ARGS}.add_cli_args"
T_FROM_CLI = f"{_SERVER_ARGS}.from_cli_args"
T_POST_INIT = f"{_SERVER_ARGS}.__post_init__"
T_HIRADIX = "sglang.srt.mem_cache.hiradix_cache.HiRadixCache.__init__"
T_UNIFIED = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.init_hicache"
T_TREE = "sglang.srt.mem_cache.registry.create_tree_cache"
T_BACKEND = "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory.create_backend"

_registered = False


# ---- config lookup -----------------------------------------------------------------------------


def active_config(server_args: Any = None) -> QuantConfig | None:
    """The config of this process: the ServerArgs attribute, else the env var."""
    cfg = getattr(server_args, kargs.SERVER_ARGS_ATTR, None) if server_args is not None else None
    if isinstance(cfg, QuantConfig):
        return cfg
    return kargs.config_from_env()


# ---- server args -------------------------------------------------------------------------------


def _add_cli_args(orig, parser):
    # One AROUND hook for every flag we add (SGLang warns about several on one target): the nine
    # kvtuner flags, and the juicefs/lmcache backend names + --hicache-storage-backend-config.
    orig(parser)
    kargs.add_cli_args(parser)
    l3_registration.extend_parser(parser)


def _from_cli_args(orig, cls, args):
    # CLI mistakes end like argparse's own: one line per mistake, exit status 2, no traceback.
    try:
        # The command line is authoritative: without --enable-kvtuner-hicache a stale
        # SGLANG_KVTUNER_HICACHE (say, from an Engine session) is cleared, never silently applied.
        # Set before orig(): __post_init__ and the spawned schedulers read it.
        kargs.set_env_config(kargs.config_from_namespace(args))
        return orig(cls, args)
    except ConfigError as e:
        sys.stderr.write(f"sglang serve: error: {kargs.format_error(e)}\n")
        raise SystemExit(2) from None


def _post_init(orig, self):
    orig(self)
    # our L3 backends fail fast in the launcher (quantized or not): missing mount, dead server
    l3_errs = l3_registration.preflight_errors(self)
    if l3_errs:
        raise ConfigError("the L3 storage backend is not usable:\n  - " + "\n  - ".join(l3_errs))
    cfg = kargs.config_from_env()
    if cfg is None:
        return
    object.__setattr__(self, kargs.SERVER_ARGS_ATTR, cfg)  # underscore attrs survive the read-only seal
    kargs.validate_server_args(self, cfg)
    verify_hooks(required=True)
    logger.info("kvtuner_hicache enabled: %s", cfg.short_name())


# ---- tree cache / host pool --------------------------------------------------------------------


def _hiradix_init(orig, self, params=None, server_args=None, *a, **kw):
    cfg = active_config(server_args)
    if cfg is None:
        return orig(self, params, server_args, *a, **kw)
    verify_hooks(required=True)
    import sglang.srt.mem_cache.hiradix_cache as hr

    from kvtuner_hicache.sglang_ext.host_pool import QuantizedMLATokenToKVPoolHost, mha_host_pool_cls_for

    # Scoped substitution: only this HiRadixCache's pool is ours; draft (kv_cache_builder), PD
    # offload and HiSparse pools, built elsewhere, keep SGLang's classes.
    saved = (hr.get_mha_host_pool_cls, hr.MLATokenToKVPoolHost)
    hr.get_mha_host_pool_cls = mha_host_pool_cls_for
    hr.MLATokenToKVPoolHost = QuantizedMLATokenToKVPoolHost
    try:
        orig(self, params, server_args, *a, **kw)
    except ConfigError as e:
        logger.error("kvtuner_hicache: %s", e)
        raise
    finally:
        hr.get_mha_host_pool_cls, hr.MLATokenToKVPoolHost = saved
    _require_ours(getattr(self, "token_to_kv_pool_host", None), "HiRadixCache")


def _require_ours(pool: Any, where: str) -> None:
    if not getattr(pool, "kvtq_quantized", False):
        raise RuntimeError(
            f"kvtuner_hicache is enabled but {where} built host pool {type(pool).__name__}, not a quantized "
            "one (unsupported model type: DSA/MiniMax/hybrid models are not supported yet)"
        )


def _unified_init_hicache(orig, self, server_args, *a, **kw):
    if active_config(server_args) is not None:
        raise ConfigError(
            "kvtuner_hicache does not support the unified radix cache yet (SGLANG_ENABLE_UNIFIED_RADIX_TREE=1, "
            "hybrid SWA/SSM and DSA models); run without --enable-kvtuner-hicache"
        )
    return orig(self, server_args, *a, **kw)


def _create_tree_cache(result, ctx, *a, **kw):
    sa = getattr(ctx, "server_args", None)
    if sa is not None and getattr(sa, "enable_hierarchical_cache", False) and active_config(sa) is not None:
        cc = getattr(result, "cache_controller", None)
        _require_ours(getattr(cc, "mem_pool_host", None), type(result).__name__)
    return result


# ---- storage -----------------------------------------------------------------------------------


def _create_backend(orig, cls, backend_name, storage_config, mem_pool_host, **kw):
    backend = orig(cls, backend_name, storage_config, mem_pool_host, **kw)
    from kvtuner_hicache.sglang_ext.storage import KVTQStorageProxy

    return KVTQStorageProxy(backend, mem_pool_host)


# ---- registration and verification ---------------------------------------------------------------

_HOOKS: list[tuple[str, Any, HookType]] = [
    (T_ADD_CLI, _add_cli_args, HookType.AROUND),
    (T_FROM_CLI, _from_cli_args, HookType.AROUND),
    (T_POST_INIT, _post_init, HookType.AROUND),
    (T_HIRADIX, _hiradix_init, HookType.AROUND),
    (T_UNIFIED, _unified_init_hicache, HookType.AROUND),
    (T_TREE, _create_tree_cache, HookType.AFTER),
    (T_BACKEND, _create_backend, HookType.AROUND),
]


def register() -> None:
    """Entry point: register the hooks (SGLang's load_plugins applies them). Idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    # plus the juicefs/lmcache L3 backend hooks (their CLI part is in _add_cli_args)
    for target, hook, kind in _HOOKS + l3_registration.HOOKS:
        HookRegistry.register(target, hook, kind)


def _resolve(target: str) -> Any:
    import pkgutil

    owner_path, attr = target.rsplit(".", 1)
    owner = pkgutil.resolve_name(owner_path)
    raw = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    return getattr(raw, "__func__", raw)  # unwrap classmethod/staticmethod


def _wraps_hook(fn: Any, hook: Any) -> bool:
    """True when `fn` is a HookRegistry wrapper (at any depth) whose closure holds `hook`."""
    seen = 0
    while fn is not None and seen < 16:
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                if cell.cell_contents is hook:
                    return True
            except ValueError:
                continue
        fn = getattr(fn, "__wrapped__", None)
        seen += 1
    return False


def missing_hooks() -> list[str]:
    """Targets whose current attribute is not wrapped by our hook."""
    out = []
    for target, hook, _ in _HOOKS:
        try:
            ok = _wraps_hook(_resolve(target), hook)
        except Exception:
            ok = False
        if not ok:
            out.append(target)
    return out


def verify_hooks(required: bool) -> list[str]:
    """Check every hook took effect; raise when `required` (quantization was asked for)."""
    missing = missing_hooks()
    if missing and required:
        raise RuntimeError(
            "kvtuner_hicache is enabled but these SGLang hooks are not in place (see earlier plugin "
            "errors in the log; is the plugin installed and allowed by SGLANG_PLUGINS?): " + ", ".join(missing)
        )
    if missing:
        logger.warning("kvtuner_hicache hooks not applied: %s", ", ".join(missing))
    return missing
