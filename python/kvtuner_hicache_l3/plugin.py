"""How `--hicache-storage-backend juicefs|lmcache` reaches SGLang 0.5.17 .. 0.5.23 (plugin entry point).

SGLang's public `StorageBackendFactory.register_backend(name, module, class)` is not enough on any of
these releases: a registered name is built by `_create_builtin_backend`, which dispatches on the
name and raises "Unknown built-in backend" for every name it does not know. The one public path
that builds an outside class is the `dynamic` backend (`backend_name`, `module_path`, `class_name`
in the extra config). So, with two hooks on public methods:
- `ServerArgs.add_cli_args` (AFTER): our names join `--hicache-storage-backend`'s fixed choices
  (argparse has no public way to extend them; we edit the existing action's `choices`), and
  `--hicache-storage-backend-config` becomes an alias of `--hicache-storage-backend-extra-config`.
- `StorageBackendFactory.create_backend` (BEFORE): our names become SGLang's `dynamic` backend with
  our module and class added to the extra config. SGLang then builds, logs and (0.5.23) wraps our
  store exactly like any dynamic backend; the cache controller still sees our name, so it uses the
  generic (copying) page path.
Neither hook bypasses another hook on the same target, so the order relative to other plugins
(kvtuner-hicache's namespace proxy) does not matter. `startup_errors` is the launcher check.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any

from kvtuner_hicache_l3 import BACKENDS
from kvtuner_hicache_l3.config_check import ALIAS, BACKEND_DEST, EXTRA_DEST, load_extra_config, storage_config_errors

logger = logging.getLogger(__name__)

T_ADD_CLI = "sglang.srt.server_args.ServerArgs.add_cli_args"
T_CREATE = "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory.create_backend"
_registered = False


def extend_parser(parser: argparse.ArgumentParser) -> None:
    """Add our backend names to the choices and the config alias. Idempotent."""
    for action in parser._actions:
        if action.dest == BACKEND_DEST and action.choices is not None:
            action.choices = list(action.choices) + [n for n in BACKENDS if n not in action.choices]
    if ALIAS not in parser._option_string_actions:
        # SUPPRESS: leave SGLang's own default in place when only the canonical flag (or neither) is given
        parser.add_argument(ALIAS, dest=EXTRA_DEST, default=argparse.SUPPRESS, metavar="JSON",
                            help="Alias of --hicache-storage-backend-extra-config (JSON or @file).")


def _after_add_cli_args(result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
    extend_parser(parser)
    return None


def as_dynamic(backend_name: str, storage_config: Any) -> tuple[str, Any]:
    """SGLang's `dynamic` backend name and a copy of `storage_config` naming our class (our names only)."""
    if backend_name not in BACKENDS:
        return backend_name, storage_config
    module, cls_name = BACKENDS[backend_name]
    extra = dict(getattr(storage_config, "extra_config", None) or {})
    extra.update(backend_name=backend_name, module_path=module, class_name=cls_name)
    return "dynamic", dataclasses.replace(storage_config, extra_config=extra)


def _before_create_backend(cls: Any, backend_name: str, storage_config: Any, *args: Any, **kwargs: Any) -> Any:
    if backend_name not in BACKENDS:
        return None  # arguments unchanged
    name, cfg = as_dynamic(backend_name, storage_config)
    return (cls, name, cfg, *args), kwargs


HOOKS: list[tuple[str, Any, Any]] = []  # filled by register(): (target, hook, HookType)


def hooks() -> list[tuple[str, Any, Any]]:
    from sglang.srt.plugins.hook_registry import HookType

    return [(T_ADD_CLI, _after_add_cli_args, HookType.AFTER), (T_CREATE, _before_create_backend, HookType.BEFORE)]


def register() -> None:
    """Entry point (`sglang.srt.plugins`): register the two hooks. Idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry

    HOOKS[:] = hooks()
    for target, hook, kind in HOOKS:
        HookRegistry.register(target, hook, kind)


def engine_errors(server_args: Any) -> list[str]:
    """Our engines reachable? A missing JuiceFS mount or a dead LMCache server, before model loading.

    The stores check again when the scheduler builds them; this only makes the mistake fail at
    once, whatever else the server was asked for. Empty for other backends.
    """
    name = getattr(server_args, BACKEND_DEST, None)
    if name not in BACKENDS:
        return []
    extra, err = load_extra_config(getattr(server_args, EXTRA_DEST, None))
    if err:
        return [err]
    from kvtuner_hicache_l3._base import BackendConfigError

    try:
        if name == "juicefs":
            from kvtuner_hicache_l3.juicefs import check_mount

            mp = extra.get("mount_point") or os.environ.get("SGLANG_HICACHE_JUICEFS_MOUNT_POINT")
            if not mp:
                return ['--hicache-storage-backend juicefs needs a mount point: '
                        '--hicache-storage-backend-config \'{"mount_point": "/mnt/jfs"}\'']
            check_mount(str(mp), bool(extra.get("require_fuse", True)))
        elif name == "lmcache":
            from kvtuner_hicache_l3.lmcache import check_server

            ep = extra.get("endpoint") or os.environ.get("SGLANG_HICACHE_LMCACHE_ENDPOINT")
            if not ep:
                return ['--hicache-storage-backend lmcache needs a server: '
                        '--hicache-storage-backend-config \'{"endpoint": "localhost:65432"}\'']
            check_server(str(ep), float(extra.get("connect_timeout_s", 3.0)))
    except (BackendConfigError, ValueError, TypeError) as e:
        return [str(e).splitlines()[0] if str(e) else type(e).__name__]
    return []


def startup_errors(server_args: Any) -> list[str]:
    """Every L3 start-up check, one line each: the options of any backend, then our engines."""
    return storage_config_errors(server_args) or engine_errors(server_args)


__all__ = ["HOOKS", "as_dynamic", "engine_errors", "extend_parser", "register", "startup_errors",
           "storage_config_errors"]
