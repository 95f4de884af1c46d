"""How the backend names `juicefs` and `lmcache` get into SGLang 0.5.17 (hooks for the plugin).

- `ServerArgs.add_cli_args` (the plugin's own AROUND hook calls `extend_parser`): add our names
  to `--hicache-storage-backend`'s fixed choices and add `--hicache-storage-backend-config` as an alias of `--hicache-storage-backend-extra-config`
  (same dest, so SGLang sees only its own field).
- `StorageBackendFactory.create_backend` (BEFORE): put our names in the factory's registry (a class
  dict) so the normal lookup path runs; it changes no arguments.
- `StorageBackendFactory._create_builtin_backend` (AROUND): build our classes for our names.
None of these bypasses another hook, so the order relative to the namespacing proxy's AROUND hook
on `create_backend` does not matter: our backends come out of `create_backend` like built-in ones
and get wrapped the same way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
from typing import Any

from sglang.srt.plugins.hook_registry import HookType

from kvtuner_hicache.sglang_ext.backends import BACKENDS

logger = logging.getLogger(__name__)

T_CREATE = "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory.create_backend"
T_BUILTIN = "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory._create_builtin_backend"
ALIAS_FLAG = "--hicache-storage-backend-config"
EXTRA_DEST = "hicache_storage_backend_extra_config"
BACKEND_DEST = "hicache_storage_backend"


def extend_parser(parser: argparse.ArgumentParser) -> None:
    """Add our backend names to the choices and the config alias. Idempotent."""
    for action in parser._actions:
        if action.dest == BACKEND_DEST and action.choices is not None:
            action.choices = list(action.choices) + [n for n in BACKENDS if n not in action.choices]
    if ALIAS_FLAG not in parser._option_string_actions:
        # SUPPRESS: leave SGLang's own default in place when only the canonical flag (or neither) is given
        parser.add_argument(ALIAS_FLAG, dest=EXTRA_DEST, default=argparse.SUPPRESS, metavar="JSON",
                            help="Alias of --hicache-storage-backend-extra-config (JSON or @file).")


def ensure_registered(factory: Any) -> None:
    reg = factory._registry
    for name, (module, cls_name) in BACKENDS.items():
        if name not in reg:
            factory.register_backend(name, module, cls_name)


def _before_create_backend(cls: Any, *args: Any, **kwargs: Any) -> None:
    ensure_registered(cls)
    return None  # arguments unchanged


def build_backend(backend_name: str, storage_config: Any, mem_pool_host: Any = None) -> Any:
    """Construct our backend `backend_name` (also used by tests without the factory)."""
    module, cls_name = BACKENDS[backend_name]
    cls = getattr(importlib.import_module(module), cls_name)
    extra = dict(getattr(storage_config, "extra_config", None) or {})
    return cls(storage_config, extra)


def _create_builtin_backend(orig: Any, cls: Any, backend_name: str, backend_class: Any, storage_config: Any,
                            mem_pool_host: Any, *args: Any, **kwargs: Any) -> Any:
    if backend_name in BACKENDS:
        return backend_class(storage_config, dict(getattr(storage_config, "extra_config", None) or {}))
    return orig(cls, backend_name, backend_class, storage_config, mem_pool_host, *args, **kwargs)


# The CLI part (extend_parser) runs inside the plugin's own add_cli_args hook: one AROUND hook per target.
HOOKS: list[tuple[str, Any, HookType]] = [
    (T_CREATE, _before_create_backend, HookType.BEFORE),
    (T_BUILTIN, _create_builtin_backend, HookType.AROUND),
]


def preflight_errors(server_args: Any) -> list[str]:
    """Start-up checks of our L3 backends in the launcher, before any model is loaded.

    The backends check again when the scheduler builds them; this only makes a missing JuiceFS
    mount or an unreachable LMCache server fail at once, whatever else the server was asked for.
    """
    name = getattr(server_args, BACKEND_DEST, None)
    if name not in BACKENDS:
        return []
    raw = getattr(server_args, EXTRA_DEST, None) or "{}"
    if isinstance(raw, str) and raw.startswith("@"):
        return []  # a config file in another format: the backend itself checks it when built
    try:
        extra = raw if isinstance(raw, dict) else json.loads(raw)
    except json.JSONDecodeError as e:
        return [f"--hicache-storage-backend-config is not valid JSON: {e}"]
    from kvtuner_hicache.sglang_ext.backends._base import BackendConfigError

    try:
        if name == "juicefs":
            from kvtuner_hicache.sglang_ext.backends.juicefs import check_mount

            mp = extra.get("mount_point") or os.environ.get("SGLANG_HICACHE_JUICEFS_MOUNT_POINT")
            if not mp:
                return ['--hicache-storage-backend juicefs needs a mount point: '
                        '--hicache-storage-backend-config \'{"mount_point": "/mnt/jfs"}\'']
            check_mount(str(mp), bool(extra.get("require_fuse", True)))
        elif name == "lmcache":
            from kvtuner_hicache.sglang_ext.backends.lmcache import check_server

            ep = extra.get("endpoint") or os.environ.get("SGLANG_HICACHE_LMCACHE_ENDPOINT")
            if not ep:
                return ['--hicache-storage-backend lmcache needs a server: '
                        '--hicache-storage-backend-config \'{"endpoint": "localhost:65432"}\'']
            check_server(str(ep), float(extra.get("connect_timeout_s", 3.0)))
    except (BackendConfigError, ValueError) as e:
        return [str(e)]
    return []
