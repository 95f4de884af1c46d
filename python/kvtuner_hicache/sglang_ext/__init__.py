"""The SGLang side of kvtuner_hicache (the only subpackage that imports sglang).

`plugin.register` is the `sglang.srt.plugins` entry point. Python-API users call
`enable_for_engine(...)` before `sglang.Engine(...)`.
"""

from __future__ import annotations

from typing import Any

PLUGIN_NAME = "kvtuner_hicache"
PLUGIN_GROUP = "sglang.srt.plugins"


def enable_for_engine(config: str | None = None, **cfg_kwargs: Any):
    """Turn quantized HiCache on for `sglang.Engine(...)` created later in this process.

    Keyword arguments are QuantConfig fields (nbits_key, nbits_value, asym, axis_key, axis_value,
    q_group_size, residual_length); `config` is a KVTuner per-layer YAML path. The config is
    validated now and exported in SGLANG_KVTUNER_HICACHE, which the Engine's scheduler processes
    inherit. Engine arguments must still include enable_hierarchical_cache=True (checked when
    the Engine builds its ServerArgs). Returns the QuantConfig.
    """
    import os
    from importlib.metadata import entry_points

    from kvtuner_hicache.config import ConfigError, QuantConfig, check_table_flags, load_layer_bits
    from kvtuner_hicache.sglang_ext import args as kargs
    from kvtuner_hicache.sglang_ext.eras import unsupported_release_error

    release_err = unsupported_release_error()
    if release_err:
        raise ConfigError(release_err.replace("--enable-kvtuner-hicache", "enable_for_engine"))

    if config is not None:
        clash = sorted({"nbits_key", "nbits_value"} & set(cfg_kwargs))
        if clash:  # the table sets bits per layer; uniform bits beside it would be ignored
            raise ConfigError(f"enable_for_engine: {', '.join(clash)} has no effect with config= (the per-layer table sets the bits)")
        cfg_kwargs["layer_bits"] = load_layer_bits(config)
        cfg_kwargs["layer_bits_source"] = f"config={config}"
    try:
        cfg = QuantConfig(**cfg_kwargs)
    except TypeError as e:
        raise ConfigError(f"enable_for_engine: {e}") from e
    check_table_flags(cfg)
    # Scheduler processes only get our hooks through the installed entry point.
    if not any(ep.name == PLUGIN_NAME for ep in entry_points(group=PLUGIN_GROUP)):
        raise ConfigError(f"the {PLUGIN_NAME} SGLang plugin entry point is not installed "
                          "(pip install -e python/)")
    allowed = os.environ.get("SGLANG_PLUGINS", "").strip()
    if allowed and PLUGIN_NAME not in {x.strip() for x in allowed.split(",")}:
        raise ConfigError(f"SGLANG_PLUGINS={allowed} excludes the {PLUGIN_NAME} plugin")
    kargs.set_env_config(cfg)
    from kvtuner_hicache.sglang_ext.plugin import register

    register()
    import sglang.srt.plugins as sgl_plugins

    if getattr(sgl_plugins, "_plugins_loaded", False):
        # load_plugins() already ran here, so it will not apply hooks again: apply ours now
        # (every plugin is registered by then, so nothing is skipped).
        sgl_plugins.HookRegistry.apply_hooks()
    return cfg


def disable_for_engine() -> None:
    """Undo enable_for_engine for Engines created later in this process."""
    from kvtuner_hicache.sglang_ext import args as kargs

    kargs.set_env_config(None)


__all__ = ["PLUGIN_GROUP", "PLUGIN_NAME", "disable_for_engine", "enable_for_engine"]
