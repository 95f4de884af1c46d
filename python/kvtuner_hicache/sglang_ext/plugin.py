"""SGLang plugin entry point (`sglang.srt.plugins` group): the hooks of the running era, and their checks.

Lifecycle. SGLang's `load_plugins()` calls `register()` in every process (launcher, schedulers)
before argparse, then applies the registered hooks. `register()` picks the era adapter of the
installed release once (`eras.active_era()`) and registers only that era's targets, so no release
logs a hook traceback. Without `--enable-kvtuner-hicache` every hook passes through: the server
behaves like stock SGLang (same pools, same L3 keys).

Hooks, by what they do (targets in `hooks_for`):
- CLI (every release): `ServerArgs.add_cli_args` adds our flags, `ServerArgs.from_cli_args` turns
  them into a QuantConfig carried to the schedulers in SGLANG_KVTUNER_HICACHE (the only transport:
  nothing is written into the sealed ServerArgs record).
- Start-up validation, in the era's resolution step (`__post_init__`, `resolve_once`, or a
  `register_resolution_hook` on `handle_other_validations`): bad input, an unsupported release and
  a hook that did not apply stop the launcher with one line naming what to change.
- Pool seam: HiRadixCache.__init__ (eras A, B) or UnifiedRadixCache.init_hicache +
  hybrid_pool_assembler.build_kv_host_pool (C, D, E). The QuantConfig is handed to our pool there;
  pools built outside the scope (PD decode offload, drafts) stay SGLang's own.
- `registry.create_tree_cache` (AFTER): a HiCache whose host pool is not ours stops the server.
- `StorageBackendFactory.create_backend`: our pools' L3 backends get the checking proxy; other
  pools' backends are returned untouched.
- `HiCacheController.attach_storage_backend` (AFTER): a copying backend behind our proxy reads
  into the host pool in one copy per batch (`l3_read`); with KVTQ_L3_PROFILE set, every
  controller's L3 stages are timed (`l3_profile`, bf16 pools too).
"""

from __future__ import annotations

import contextvars
import logging
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtuner_hicache_l3 import plugin as l3_plugin
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvtuner_hicache.config import ConfigError, QuantConfig
from kvtuner_hicache.sglang_ext import args as kargs
from kvtuner_hicache.sglang_ext.eras import Era, active_era, active_release, unsupported_release_error

logger = logging.getLogger(__name__)

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
T_ADD_CLI = f"{_SERVER_ARGS}.add_cli_args"
T_FROM_CLI = f"{_SERVER_ARGS}.from_cli_args"
T_POST_INIT = f"{_SERVER_ARGS}.__post_init__"
T_RESOLVE_ONCE = f"{_SERVER_ARGS}.resolve_once"
T_HIRADIX = "sglang.srt.mem_cache.hiradix_cache.HiRadixCache.__init__"
T_UNIFIED = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.init_hicache"
T_BUILD_POOL = "sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler.build_kv_host_pool"
T_TREE = "sglang.srt.mem_cache.registry.create_tree_cache"
T_BACKEND = "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory.create_backend"
T_ATTACH = "sglang.srt.managers.cache_controller.HiCacheController.attach_storage_backend"
RESOLUTION_STEP = "handle_other_validations"  # late in the pipeline: layouts and dtypes are resolved
RESOLUTION_TARGET = f"resolution_hooks:{RESOLUTION_STEP}"

# The QuantConfig of the HiCache being built right now (set by the pool-seam scope hooks).
_SCOPE: contextvars.ContextVar[QuantConfig | None] = contextvars.ContextVar("kvtuner_hicache_scope", default=None)


@dataclass
class _State:
    registered: bool = False
    cli: bool = False  # this process parsed a command line: validation errors exit like argparse's
    originals: dict[str, Any] | None = None  # target -> attribute before apply_hooks
    resolution_hook_registered: bool = False


_state = _State()


# ---- config lookup -----------------------------------------------------------------------------


def active_config() -> QuantConfig | None:
    """The QuantConfig of this process (SGLANG_KVTUNER_HICACHE), None when quantization is off."""
    return kargs.config_from_env()


# ---- CLI ---------------------------------------------------------------------------------------


def _add_cli_args(orig, parser):
    # our flags (the L3 plugin adds its backend names and the config alias in its own hook)
    orig(parser)
    kargs.add_cli_args(parser)


def _fail_cli(err: ConfigError) -> None:
    sys.stderr.write(f"sglang serve: error: {err}\n")
    raise SystemExit(2) from None


def _from_cli_args(orig, cls, args):
    # CLI mistakes end like argparse's own: one line per mistake, exit status 2, no traceback.
    _state.cli = True
    try:
        # The command line is authoritative: without --enable-kvtuner-hicache a stale
        # SGLANG_KVTUNER_HICACHE (say, from an Engine session) is cleared, never silently applied.
        cfg = kargs.config_from_namespace(args)
        if cfg is not None:
            release_err = unsupported_release_error()
            if release_err:
                raise ConfigError(release_err)
            warning = kargs.table_warning(args, cfg)
            if warning:
                logger.warning("kvtuner_hicache: %s", warning)
        kargs.set_env_config(cfg)  # set before orig(): validation and the spawned schedulers read it
        return orig(cls, args)
    except ConfigError as e:
        _fail_cli(e)


# ---- start-up validation -------------------------------------------------------------------------


def validate(server_args: Any, era: Era | None = None) -> None:
    """Every start-up check on resolved ServerArgs; raises ConfigError listing what to change.

    The L3 options of every backend (a JSON object, for any backend) and our L3 engines are checked first,
    quantized or not: one line per problem, before any model is loaded."""
    l3_errs = l3_plugin.startup_errors(server_args)
    if l3_errs:
        raise ConfigError(l3_errs[0] if len(l3_errs) == 1 else
                          "the L3 storage options are not usable:\n  - " + "\n  - ".join(l3_errs))
    cfg = active_config()
    if cfg is None:
        return
    release_err = unsupported_release_error()
    if release_err:
        raise ConfigError(release_err)
    verify_hooks(required=True)
    kargs.validate_server_args(server_args, cfg, era or active_era())
    logger.info("kvtuner_hicache enabled: %s%s (SGLang %s, era %s)", cfg.short_name(),
                ", elastic (this is the floor; 2- and 4-bit layers enter at twice the bits)" if cfg.elastic else "", active_release(),
                (era or active_era()).name)


def _validate_or_exit(server_args: Any) -> None:
    try:
        validate(server_args)
    except ConfigError as e:
        if _state.cli:
            _fail_cli(e)
        raise


def _post_init(orig, self):  # eras A, B
    orig(self)
    _validate_or_exit(self)


def _resolve_once(orig, self):  # 0.5.19
    already = getattr(self, "_resolution_finished", False)
    orig(self)
    if not already:
        _validate_or_exit(self)


def _resolution_step(server_args, previous):  # 0.5.20+: register_resolution_hook(RESOLUTION_STEP)
    previous(server_args)
    _validate_or_exit(_resolving_view(server_args))


def _resolving_view(server_args: Any) -> Any:
    """What resolution has decided so far (0.5.20+ keeps declarations beside the raw record)."""
    try:
        from sglang.srt.arg_groups.model_override_base import resolving_view
    except ImportError:
        return server_args
    return resolving_view(server_args)


# ---- pool seams ------------------------------------------------------------------------------------


def build_quantized_pool(device_pool: Any, cfg: QuantConfig, *, host_to_device_ratio: float, host_size: float,
                         page_size: int, layout: str, allocator_type: str = "default", pool_label: str = "kv",
                         dcp_size: int = 1, mtp_draft_device_pools: tuple[Any, ...] = ()) -> Any:
    """Our host pool for `device_pool`, or a ConfigError that says why this pool cannot be quantized."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    from kvtuner_hicache.sglang_ext.host_pool import quantized_pool_cls_for

    where = f"HiCache {pool_label} host pool for {type(device_pool).__name__}"
    if pool_label != "kv" or not isinstance(device_pool, (MHATokenToKVPool, MLATokenToKVPool)):
        raise ConfigError(f"kvtuner_hicache quantizes plain MHA/GQA and MLA KV pools only; this model's {where} "
                          "is not one (hybrid SWA/SSM/DSA models): run without --enable-kvtuner-hicache")
    if any(cls.__name__ == "PageInterleaveKVPoolMixin" for cls in type(device_pool).__mro__):
        raise ConfigError(f"kvtuner_hicache does not support page-interleaved device pools ({where})")
    if mtp_draft_device_pools:
        raise ConfigError("kvtuner_hicache does not quantize MTP draft layers packed into the host pool "
                          "(speculative decoding with HiCache): run without --enable-kvtuner-hicache or "
                          "without the speculative algorithm")
    if dcp_size != 1:
        raise ConfigError("kvtuner_hicache does not support --dcp-size > 1")
    cls = quantized_pool_cls_for(device_pool)
    if cfg.elastic:
        if isinstance(device_pool, MLATokenToKVPool):
            raise ConfigError("--kvtuner-hicache-elastic supports MHA/GQA models only in this release (MLA "
                              "pages keep 8-bit rope parts; nothing to refine): drop the flag for this model")
        from kvtuner_hicache.sglang_ext.elastic_pool import ElasticMHATokenToKVPoolHost

        cls = ElasticMHATokenToKVPoolHost
    return cls(
        device_pool, quant_config=cfg, host_to_device_ratio=host_to_device_ratio, host_size=host_size,
        page_size=page_size, layout=layout, allocator_type=allocator_type, pool_label=pool_label,
    )


def _positional_pool_factory(cfg: QuantConfig) -> Callable[..., Any]:
    """Stands in for SGLang's host pool classes inside HiRadixCache.__init__ (eras A, B)."""

    def build(device_pool, host_to_device_ratio, host_size, page_size, layout, *, allocator_type="default",
              dcp_size=1, dcp_rank=0, pool_label="kv", mtp_draft_device_pools=()):
        return build_quantized_pool(device_pool, cfg, host_to_device_ratio=host_to_device_ratio,
                                    host_size=host_size, page_size=page_size, layout=layout,
                                    allocator_type=allocator_type, pool_label=pool_label, dcp_size=dcp_size,
                                    mtp_draft_device_pools=mtp_draft_device_pools)

    return build


def _hiradix_init(orig, self, params=None, server_args=None, *a, **kw):  # eras A, B
    cfg = active_config()
    if cfg is None:
        return orig(self, params, server_args, *a, **kw)
    verify_hooks(required=True)
    import sglang.srt.mem_cache.hiradix_cache as hr

    # Scoped substitution: only this HiRadixCache's pool is ours; draft (kv_cache_builder), PD
    # offload and HiSparse pools, built elsewhere, keep SGLang's classes.
    factory = _positional_pool_factory(cfg)
    saved = (hr.get_mha_host_pool_cls, hr.MLATokenToKVPoolHost)
    hr.get_mha_host_pool_cls = lambda device_pool: factory
    hr.MLATokenToKVPoolHost = factory
    try:
        orig(self, params, server_args, *a, **kw)
    except ConfigError as e:
        logger.error("kvtuner_hicache: %s", e)
        raise
    finally:
        hr.get_mha_host_pool_cls, hr.MLATokenToKVPoolHost = saved
    require_ours(getattr(self, "token_to_kv_pool_host", None), "HiRadixCache")


def _unified_init_hicache(orig, self, server_args, *a, **kw):
    cfg = active_config()
    era = active_era()
    if cfg is not None and era is not None and era.pool_seam == "hiradix":
        raise ConfigError(
            f"kvtuner_hicache on SGLang {active_release()} plugs into HiRadixCache only; unset "
            "SGLANG_ENABLE_UNIFIED_RADIX_TREE (hybrid SWA/SSM and DSA models are not supported)"
        )
    if cfg is None:
        return orig(self, server_args, *a, **kw)
    verify_hooks(required=True)
    token = _SCOPE.set(cfg)
    try:
        return orig(self, server_args, *a, **kw)
    finally:
        _SCOPE.reset(token)


def _build_kv_host_pool(orig, *args, **kwargs):  # eras C, D, E (keyword-only upstream)
    cfg = _SCOPE.get()
    if cfg is None or args:
        return orig(*args, **kwargs)
    era = active_era()
    settings = era.memory_settings()
    host_size = kwargs.get("host_size")
    return build_quantized_pool(
        kwargs["kv_pool"], cfg, host_to_device_ratio=settings["host_to_device_ratio"],
        host_size=settings["host_size"] if host_size is None else host_size, page_size=kwargs["page_size"],
        layout=settings["layout"], allocator_type=settings["allocator_type"],
        pool_label=kwargs.get("pool_label", "kv"),
        mtp_draft_device_pools=tuple(kwargs.get("mtp_draft_device_pools") or ()),
    )


def kv_host_pool_of(host_pool: Any) -> Any:
    """The KV host pool behind a unified-tree HostPoolGroup (its anchor), else the pool itself."""
    entry = getattr(host_pool, "anchor_entry", None)
    return getattr(entry, "host_pool", None) or host_pool


def require_ours(pool: Any, where: str) -> None:
    """Raise unless `pool` (or a group's anchor pool) is one of our quantized pools."""
    pool = kv_host_pool_of(pool)
    if not getattr(pool, "kvtq_quantized", False):
        raise RuntimeError(
            f"kvtuner_hicache is enabled but {where} on SGLang {active_release()} built host pool "
            f"{type(pool).__name__}, not a quantized one (unsupported model type: hybrid/DSA/MiniMax models "
            "are not supported); run without --enable-kvtuner-hicache"
        )


def _create_tree_cache(result, ctx, *a, **kw):
    if active_config() is None:
        return result
    cc = getattr(result, "cache_controller", None)
    if cc is not None:  # a HiCache (the flag requires --enable-hierarchical-cache, checked at start-up)
        require_ours(getattr(cc, "mem_pool_host", None), type(result).__name__)
        from kvtuner_hicache.sglang_ext import load_indices

        load_indices.track(cc, kv_host_pool_of(cc.mem_pool_host))  # a load's page ids on the CPU too
    elif _hicache_enabled(ctx):
        raise RuntimeError(f"kvtuner_hicache is enabled but the tree cache {type(result).__name__} has no "
                           "HiCache controller: this model's cache is not supported")
    return result


def _hicache_enabled(ctx: Any) -> bool:
    sa = getattr(ctx, "server_args", None)
    if sa is not None:
        return bool(getattr(sa, "enable_hierarchical_cache", False))
    try:
        from sglang.srt.runtime_context import get_memory

        return bool(get_memory().enable_hierarchical_cache)
    except Exception:
        return False


# ---- storage -----------------------------------------------------------------------------------


def _create_backend(orig, cls, backend_name, storage_config, mem_pool_host, **kw):
    backend = orig(cls, backend_name, storage_config, mem_pool_host, **kw)
    if not getattr(kv_host_pool_of(mem_pool_host), "kvtq_quantized", False):
        return backend  # not our pages: SGLang's backend, keys and checks exactly as upstream
    from kvtuner_hicache.sglang_ext.storage import KVTQStorageProxy

    return KVTQStorageProxy(backend, mem_pool_host, storage_config)  # pages bound to key and model


def _attach_storage_backend(result, controller, *a, **kw):
    from kvtuner_hicache.sglang_ext import l3_profile, l3_read

    era = active_era()
    l3_read.install(controller, returns_count=era is None or era.page_get_returns_count)
    l3_profile.install(controller)
    return result


# ---- registration and verification ---------------------------------------------------------------


def hooks_for(era: Era | None, release: str | None) -> list[tuple[str, Any, HookType]]:
    """The HookRegistry hooks of one era (None: an unsupported release gets the CLI hooks only, so
    that --enable-kvtuner-hicache fails with a clear error instead of being ignored)."""
    hooks: list[tuple[str, Any, HookType]] = [
        (T_ADD_CLI, _add_cli_args, HookType.AROUND),
        (T_FROM_CLI, _from_cli_args, HookType.AROUND),
    ]
    if era is None:
        return hooks
    resolution = era.resolution_for(release or "")
    if resolution == "post_init":
        hooks.append((T_POST_INIT, _post_init, HookType.AROUND))
    elif resolution == "resolve_once":
        hooks.append((T_RESOLVE_ONCE, _resolve_once, HookType.AROUND))
    if era.pool_seam == "hiradix":
        hooks.append((T_HIRADIX, _hiradix_init, HookType.AROUND))
    else:
        hooks.append((T_BUILD_POOL, _build_kv_host_pool, HookType.AROUND))
    hooks += [
        (T_UNIFIED, _unified_init_hicache, HookType.AROUND),
        (T_TREE, _create_tree_cache, HookType.AFTER),
        (T_BACKEND, _create_backend, HookType.AROUND),
        (T_ATTACH, _attach_storage_backend, HookType.AFTER),
    ]
    return hooks


def register() -> None:
    """Entry point: register this era's hooks (SGLang's load_plugins applies them). Idempotent."""
    if _state.registered:
        return
    _state.registered = True
    era, release = active_era(), active_release()
    hooks = hooks_for(era, release)
    _state.originals = {}
    for target, hook, kind in hooks:
        try:
            _state.originals[target] = _resolve(target)
        except Exception:  # a target this release lacks: verify_hooks reports it when it matters
            _state.originals[target] = None
        HookRegistry.register(target, hook, kind)
    if era is not None:
        l3_plugin.register()  # juicefs/lmcache names (idempotent: its own entry point registers it too)
        if era.resolution_for(release or "") == "resolution_hook":
            from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

            register_resolution_hook(RESOLUTION_STEP)(_resolution_step)
            _state.resolution_hook_registered = True
    logger.info("kvtuner_hicache plugin: SGLang %s, era %s, %d hooks registered (inert without "
                "--enable-kvtuner-hicache)", release, era.name if era else "unsupported", len(hooks))


def _resolve(target: str) -> Any:
    owner_path, attr = target.rsplit(".", 1)
    owner = pkgutil.resolve_name(owner_path)
    raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    return getattr(raw, "__func__", raw)  # unwrap classmethod/staticmethod


def missing_hooks() -> list[str]:
    """Targets of this era whose attribute is still the original (HookRegistry failed to apply the hook,
    or the release lacks the target), plus the resolution hook when it could not be registered."""
    era, release = active_era(), active_release()
    originals = _state.originals or {}
    out = []
    for target, _hook, _kind in hooks_for(era, release):
        original = originals.get(target)
        try:
            current = _resolve(target)
        except Exception:
            current = None
        if original is None or current is None or current is original:
            out.append(target)
    if era is not None and era.resolution_for(release or "") == "resolution_hook" and not _state.resolution_hook_registered:
        out.append(RESOLUTION_TARGET)
    return out


def verify_hooks(required: bool) -> list[str]:
    """Check every hook of this era took effect; raise when `required` (quantization was asked for)."""
    missing = missing_hooks()
    if missing and required:
        raise ConfigError(
            f"kvtuner_hicache is enabled but these hooks of SGLang {active_release()} are not in place (see "
            "earlier plugin errors in the log; is the plugin installed and allowed by SGLANG_PLUGINS?): "
            + ", ".join(missing)
        )
    if missing:
        logger.warning("kvtuner_hicache hooks not applied: %s", ", ".join(missing))
    return missing
