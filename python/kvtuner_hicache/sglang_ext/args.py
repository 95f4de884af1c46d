"""Command-line flags, the config transport (env var), and start-up validation.

The config travels as JSON in `SGLANG_KVTUNER_HICACHE`: the launcher sets it before SGLang
spawns its scheduler processes, which inherit it; `Engine(**kwargs)` users set it through
`enable_for_engine()`. Every process reads the same value, so every TP/PP rank builds the same
page layout (a rank-local difference would deadlock SGLang's MIN all-reduces).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any

from kvtuner_hicache.config import (
    ALLOWED_BITS,
    ConfigError,
    LayerBits,
    QuantConfig,
    check_table_flags,
    load_layer_bits,
    preset_model_warning,
)

ENV_VAR = "SGLANG_KVTUNER_HICACHE"

ALLOWED_KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16", "float16", "fp16")

# argparse dest -> QuantConfig field (None: not a QuantConfig field)
_FLAG_FIELDS = {
    "kvtuner_hicache_nbits_key": "nbits_key",
    "kvtuner_hicache_nbits_value": "nbits_value",
    "kvtuner_hicache_asym": "asym",
    "kvtuner_hicache_axis_key": "axis_key",
    "kvtuner_hicache_axis_value": "axis_value",
    "kvtuner_hicache_q_group_size": "q_group_size",
    "kvtuner_hicache_residual_length": "residual_length",
    "kvtuner_hicache_elastic": "elastic",
    "kvtuner_hicache_config": None,
}
ALL_FLAGS = ["--enable-kvtuner-hicache"] + ["--" + d.replace("_", "-") for d in _FLAG_FIELDS]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add our flags. Defaults are None so that 'given' can be told from 'left out';
    the effective defaults come from QuantConfig() and are shown in --help."""
    d = QuantConfig()
    g = parser.add_argument_group("KVTuner quantized HiCache (kvtuner_hicache plugin)")
    g.add_argument("--enable-kvtuner-hicache", action="store_true", default=False,
                   help="Store HiCache L2 (host) and L3 (storage) KV pages quantized. "
                        "Requires --enable-hierarchical-cache.")
    g.add_argument("--kvtuner-hicache-nbits-key", type=int, choices=ALLOWED_BITS, default=None,
                   help=f"Key bits (default {d.nbits_key}).")
    g.add_argument("--kvtuner-hicache-nbits-value", type=int, choices=ALLOWED_BITS, default=None,
                   help=f"Value bits (default {d.nbits_value}).")
    g.add_argument("--kvtuner-hicache-asym", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Asymmetric (min/scale) quantizer; --no-kvtuner-hicache-asym selects "
                        f"symmetric (default {'asymmetric' if d.asym else 'symmetric'}).")
    g.add_argument("--kvtuner-hicache-axis-key", type=int, choices=(0, 1), default=None,
                   help=f"Key grouping axis: 0 per-token, 1 per-channel (default {d.axis_key}).")
    g.add_argument("--kvtuner-hicache-axis-value", type=int, choices=(0, 1), default=None,
                   help=f"Value grouping axis: 0 per-token, 1 per-channel (default {d.axis_value}).")
    g.add_argument("--kvtuner-hicache-q-group-size", type=int, default=None,
                   help=f"Quantization group size (default {d.q_group_size}).")
    g.add_argument("--kvtuner-hicache-residual-length", type=int, default=None,
                   help=f"Keep the last ceil(R/page_size) pages of every backed-up node also in bf16 "
                        f"in a host tail store (1/8 of the host budget); 0 disables (default "
                        f"{d.residual_length}).")
    g.add_argument("--kvtuner-hicache-elastic", action="store_true", default=None,
                   help="Precision-elastic host pool: pages enter L2 with refinement planes that double the bits "
                        "of their 2- and 4-bit layers and drop them (coldest first, values before keys) before SGLang evicts "
                        "any page; the bit flags or the per-layer table give the floor. L3 stores floor "
                        "pages.")
    g.add_argument("--kvtuner-hicache-config", type=str, default=None, metavar="PATH",
                   help="KVTuner per-layer YAML {layer: {nbits_key, nbits_value}} that sets the bits "
                        "of every layer; giving --kvtuner-hicache-nbits-key/-value beside it is an error.")


def config_from_namespace(args: argparse.Namespace) -> QuantConfig | None:
    """The QuantConfig the flags ask for, None when --enable-kvtuner-hicache is absent.

    Raises ConfigError for flags given without --enable-kvtuner-hicache (nothing is accepted
    and then ignored) and for invalid values.
    """
    given = {dest: getattr(args, dest, None) for dest in _FLAG_FIELDS}
    given = {k: v for k, v in given.items() if v is not None}
    if not getattr(args, "enable_kvtuner_hicache", False):
        if given:
            raise ConfigError(
                "; ".join(f"{_flag(k)} needs --enable-kvtuner-hicache" for k in given)
            )
        return None
    fields: dict[str, Any] = {f: given[k] for k, f in _FLAG_FIELDS.items() if f and k in given}
    path = given.get("kvtuner_hicache_config")
    if path is not None:
        clash = [k for k in ("kvtuner_hicache_nbits_key", "kvtuner_hicache_nbits_value") if k in given]
        if clash:  # the table sets bits per layer; a uniform bit flag beside it would be ignored
            raise ConfigError("; ".join(f"{_flag(k)} has no effect with --kvtuner-hicache-config "
                                        "(the per-layer table sets the bits)" for k in clash))
        fields["layer_bits"] = load_layer_bits(path)
        fields["layer_bits_source"] = f"--kvtuner-hicache-config {path}"
    cfg = QuantConfig(**fields)
    check_table_flags(cfg)  # a table records the flags it was calibrated with: they must match
    return cfg


def table_warning(args: argparse.Namespace, cfg: QuantConfig | None) -> str | None:
    """A warning when the per-layer table was tuned on another model than --model-path (None otherwise)."""
    path = getattr(args, "kvtuner_hicache_config", None)
    model = getattr(args, "model_path", None)
    if cfg is None or not path or not model:
        return None
    return preset_model_warning(path, str(model), cfg)


def config_to_json(cfg: QuantConfig) -> str:
    d = cfg.canonical()
    d["residual_length"] = cfg.residual_length
    d["elastic"] = cfg.elastic
    d["layer_bits_source"] = cfg.layer_bits_source
    return json.dumps(d, sort_keys=True)


def config_from_json(text: str, source: str = ENV_VAR) -> QuantConfig:
    try:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        table = d.pop("layer_bits", None)
        if table is not None:
            d["layer_bits"] = {int(k): LayerBits(int(v[0]), int(v[1])) for k, v in table.items()}
        return QuantConfig(**d)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        raise ConfigError(f"{source} is not a valid kvtuner_hicache config (JSON from "
                          f"enable_for_engine / the CLI flags): {e}") from e


def config_from_env() -> QuantConfig | None:
    """The config carried by SGLANG_KVTUNER_HICACHE; None when unset or empty (parsed once per value:
    the hooks ask on every tree-cache and backend build)."""
    return _config_from_text(os.environ.get(ENV_VAR, "").strip())


@functools.cache
def _config_from_text(text: str) -> QuantConfig | None:
    return config_from_json(text) if text else None


def set_env_config(cfg: QuantConfig | None) -> None:
    if cfg is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = config_to_json(cfg)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def server_args_errors(sa: Any, era: Any = None) -> list[str]:
    """Every reason these (resolved) ServerArgs cannot run a quantized HiCache on this era."""
    errs: list[str] = []
    if not getattr(sa, "enable_hierarchical_cache", False):
        errs.append("--enable-kvtuner-hicache requires --enable-hierarchical-cache "
                    "(it never runs silently unquantized)")
        return errs  # the HiCache knobs below are meaningless without HiCache
    io = getattr(sa, "hicache_io_backend", "kernel")
    if io != "kernel":
        errs.append(f"--hicache-io-backend {io} is not supported; quantized pages need --hicache-io-backend kernel")
    layout = getattr(sa, "hicache_mem_layout", "page_first")
    if layout != "page_first":
        errs.append(f"--hicache-mem-layout resolved to {layout}; quantized pages need --hicache-mem-layout "
                    "page_first (with --hicache-io-backend kernel; SGLang rewrites page_first+direct to "
                    "page_first_direct)")
    dtype = getattr(sa, "kv_cache_dtype", "auto")
    if dtype not in ALLOWED_KV_CACHE_DTYPES:
        errs.append(f"--kv-cache-dtype {dtype} is not supported; quantized HiCache reads a bf16/fp16 "
                    "device KV cache (use auto or bf16)")
    storage = getattr(sa, "hicache_storage_backend", None)
    if storage == "hf3fs":
        errs.append("--hicache-storage-backend hf3fs is not supported: it assumes equal K and V "
                    "page halves, which mixed key/value bits break (use file, mooncake or nixl)")
    if getattr(sa, "use_ray", False):
        errs.append("--use-ray is not supported: Ray scheduler actors do not load SGLang plugins")
    if (getattr(sa, "dcp_size", 1) or 1) > 1:
        errs.append("--dcp-size > 1 is not supported by the quantized host pool")
    if _env_true("SGLANG_USE_HND_KVCACHE"):
        errs.append("SGLANG_USE_HND_KVCACHE=1 (HND device layout) is not supported; unset it")
    if era is not None and era.pool_seam == "hiradix" and _env_true("SGLANG_ENABLE_UNIFIED_RADIX_TREE"):
        errs.append("SGLANG_ENABLE_UNIFIED_RADIX_TREE=1 is not supported on this SGLang release (the quantized "
                    "pool plugs into HiRadixCache there); unset it")
    mode = getattr(sa, "hicache_host_memory_mode", "cache") or "cache"
    if mode != "cache":
        errs.append(f"--hicache-host-memory-mode {mode} is not supported: quantized pages need the host pool "
                    "as a cache tier (use --hicache-host-memory-mode cache)")
    if getattr(sa, "disaggregation_decode_retraction_backup", None) == "host_pool":
        errs.append("--disaggregation-decode-retraction-backup host_pool is not supported with quantized pages; "
                    "drop it or run without --enable-kvtuner-hicache")
    if getattr(sa, "disaggregation_decode_enable_offload_kvcache", False):
        errs.append("--disaggregation-decode-enable-offload-kvcache is not supported: the PD decode offload "
                    "pool would stay bf16; drop it or run without --enable-kvtuner-hicache")
    return errs


def model_errors(sa: Any, cfg: QuantConfig) -> list[str]:
    """Page size, group/axes and per-layer table against the model, in the launcher when its
    config.json is local (the host pool checks again per rank, with the real shapes)."""
    from kvtuner_hicache.model_shape import kv_shape_from_model_path

    shape = kv_shape_from_model_path(str(getattr(sa, "model_path", "") or ""))
    if shape is None:
        return []
    page_size = getattr(sa, "page_size", None) or 1  # SGLang's default on CUDA
    try:
        cfg.validate_for(shape, page_size)
    except ConfigError as e:
        return [line.strip()[2:] for line in str(e).splitlines()[1:] if line.strip().startswith("- ")]
    return []


def validate_server_args(sa: Any, cfg: QuantConfig, era: Any = None) -> None:
    """Raise one ConfigError listing every reason `sa` (resolved) cannot run `cfg`."""
    errs = server_args_errors(sa, era)
    device = getattr(sa, "device", None)
    if cfg.elastic and device not in (None, "cpu", "cuda"):
        errs.append(f"--kvtuner-hicache-elastic runs on --device cuda (native kernels) or cpu (reference codec), "
                    f"this server has --device {device}: drop the flag")
    if not errs:
        errs = model_errors(sa, cfg)
    if errs:
        raise ConfigError("kvtuner_hicache cannot run with these server arguments:\n  - " + "\n  - ".join(errs))

