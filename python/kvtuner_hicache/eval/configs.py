"""Named KV configs for the accuracy harness: name grammar, sweeps, the outlier-driven mixed table.

A config name is one of

    fp32                      the model's own fp32 KV, untouched
    bf16                      KV cast to bf16 and back: the unquantized reference (the real pool is bf16)
    K{b}{t|c}V{b}{t|c}[-a|-s][-g{G}][+r{N}]
                              uniform bits; t = per-token groups (axis 0), c = per-channel (axis 1);
                              a/s = asymmetric/symmetric (default a); G = q_group_size (default 64);
                              +rN = residual length N tokens (the last ceil(N/page_size) prefix pages
                              stay bf16, as the host pool does). Example: K4cV4t-a-g64+r128
    default                   QuantConfig(): the project's defaults
    seed                      the seed's (KVTuner FlexibleQuantizedCacheConfig) defaults:
                              4/4 bits, symmetric, per-token K and V, group 64, residual 128
    mixed                     per-layer table built from the model's key outliers (see `mixed_table`)
    table:PATH                a KVTuner per-layer YAML table, with the axes/group/asym it records
                              (`#@kvtuner-hicache` line), else the project's defaults
    NAME+e                    an elastic page of floor NAME at the top (--kvtuner-hicache-elastic): the
                              floor page plus refinement planes that double the bits of its 2-/4-bit asym layers.
                              Its demoted form is NAME itself, bit for bit (test_elastic_pool.py).
                              Example: K4cV4t-a-g64+e, table:PATH+e

Every quantized config goes through the exact page format (`PageLayout` + `roundtrip_pages`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtuner_hicache.config import (
    AXIS_PER_CHANNEL,
    AXIS_PER_TOKEN,
    ConfigError,
    KVShape,
    LayerBits,
    QuantConfig,
    load_layer_bits,
    quant_config_from_table,
)
from kvtuner_hicache.page_format import PageLayout

UNQUANTIZED = ("fp32", "bf16")
SEED_CONFIG = QuantConfig(
    nbits_key=4, nbits_value=4, asym=False, axis_key=AXIS_PER_TOKEN, axis_value=AXIS_PER_TOKEN,
    q_group_size=64, residual_length=128,
)
_UNIFORM = re.compile(r"^K(?P<kb>[2348])(?P<ka>[tc])V(?P<vb>[2348])(?P<va>[tc])(?:-(?P<sym>[as]))?(?:-g(?P<g>\d+))?$")
_AX = {"t": AXIS_PER_TOKEN, "c": AXIS_PER_CHANNEL}

SWEEPS: dict[str, tuple[str, ...]] = {
    "quick": ("bf16", "K8tV8t-a-g64", "K2tV2t-a-g64"),
    "default": (
        "fp32",
        "K8tV8t-a-g64",  # KV8, per-token K and V
        "K8cV4t-a-g64",  # K8V4
        "K4tV4t-a-g64",  # KV4, per-token keys
        "K4cV4t-a-g64",  # KV4, per-channel keys = QuantConfig() defaults
        "K4cV2t-a-g64",  # K4V2
        "K2cV2t-a-g64",  # KV2, per-channel keys
        "seed",  # K4tV4t-s-g64+r128
        "K4tV4t-s-g64",  # the seed without its residual window
        "mixed",  # K8V4 in the key-outlier layers, K4V2 elsewhere
        "K4cV4t-s-g64",  # symmetric KV4c
        "K4cV4t-a-g32",
        "K4cV4t-a-g128",  # invalid at page 64 (per-channel groups must fit in a page): reported as skipped
        "K4cV2t-s-g64",  # sym keys: under 3.5 bits
        "K4tV4t-a-g64+r128",  # does a residual window rescue per-token keys?
        "K2cV2t-a-g64+r128",  # what 2 bf16 pages buy at 2 bits
    ),
}
# the configs worth the task passes (GSM8K / MMLU) when --task-configs main is given
MAIN_CONFIGS = ("fp32", "K8tV8t-a-g64", "K8cV4t-a-g64", "K4tV4t-a-g64", "K4cV4t-a-g64",
                "K4cV2t-a-g64", "K2cV2t-a-g64", "seed", "mixed")


@dataclass(frozen=True)
class EvalConfig:
    """One row of the sweep: an unquantized baseline or a QuantConfig (with its residual length)."""

    name: str
    quant: QuantConfig | None  # None: unquantized (kv_dtype says which)
    kv_dtype: str = "bf16"  # 'fp32' or 'bf16': what the KV is before and after the page round trip
    description: str = ""
    mixed_layers: tuple[int, ...] = field(default=(), compare=False)

    @property
    def residual_length(self) -> int:
        return 0 if self.quant is None else self.quant.residual_length

    def residual_pages(self, page_size: int) -> int:
        return math.ceil(self.residual_length / page_size)

    def layout(self, shape: KVShape, page_size: int) -> PageLayout | None:
        return None if self.quant is None else PageLayout(self.quant, shape, page_size)


def uniform_name(cfg: QuantConfig) -> str:
    """`K4cV4t-a-g64[+r128]` for a uniform config (the grammar `parse_config` reads)."""
    name = cfg.short_name()
    return name + (f"+r{cfg.residual_length}" if cfg.residual_length else "")


HIGH_BITS = LayerBits(8, 4)
LOW_BITS = LayerBits(4, 2)


def mixed_table(key_ratio: Sequence[float], high: LayerBits = HIGH_BITS, low: LayerBits = LOW_BITS,
                max_fraction: float = 0.25, threshold: float = 2.0) -> tuple[dict[int, LayerBits], tuple[int, ...]]:
    """Per-layer bits: `high` in the layers whose key channel ratio is an outlier, `low` elsewhere.

    Outlier layers: ratio >= threshold x the median ratio over layers, at most
    ceil(max_fraction * layers) of them (largest first), and always at least the largest one.
    A stand-in until the calibration tool produces measured tables.
    """
    n = len(key_ratio)
    order = sorted(range(n), key=lambda i: -key_ratio[i])
    med = sorted(key_ratio)[n // 2] if n % 2 else 0.5 * (sorted(key_ratio)[n // 2 - 1] + sorted(key_ratio)[n // 2])
    cap = max(1, math.ceil(max_fraction * n))
    chosen = [i for i in order if key_ratio[i] >= threshold * med][:cap] or order[:1]
    table = {i: (high if i in chosen else low) for i in range(n)}
    return table, tuple(sorted(chosen))


@dataclass
class ConfigContext:
    """What resolving a name may need: the model's shape, the page size, key statistics."""

    shape: KVShape
    page_size: int
    residual_length: int = 0  # default for names without +rN (the --residual-length flag)
    key_ratio: Sequence[float] | None = None  # per-layer key channel ratio, for `mixed`


def parse_config(name: str, ctx: ConfigContext) -> EvalConfig:
    """Resolve one config name (grammar in the module docstring); raises ConfigError when invalid."""
    elastic = name.endswith("+e")  # an elastic page at the top: the floor config plus its refinement planes
    base, _, res = name.removesuffix("+e").partition("+r")
    if res and not res.isdigit():
        raise ConfigError(f"{name}: residual suffix must be +r<tokens>")
    residual = int(res) if res else None
    if base in UNQUANTIZED:
        if residual is not None:
            raise ConfigError(f"{name}: an unquantized config has no residual window")
        desc = "model's fp32 KV, untouched" if base == "fp32" else "KV cast to bf16 and back (reference)"
        return EvalConfig(name, None, base, desc)
    layers: tuple[int, ...] = ()
    if base == "default":
        q, desc = QuantConfig(), "project defaults QuantConfig()"
    elif base == "seed":
        q, desc = SEED_CONFIG, "seed defaults: K4V4 per-token, sym, g64, residual 128"
    elif base == "mixed":
        if ctx.key_ratio is None:
            raise ConfigError("mixed: needs the per-layer key statistics of a prefill")
        table, layers = mixed_table(ctx.key_ratio)
        q = QuantConfig(layer_bits=table, layer_bits_source="mixed (key-outlier heuristic)")
        desc = f"K8V4 in key-outlier layers {list(layers)}, K4V2 elsewhere; Kc Vt asym g64"
    elif base.startswith("table:"):
        path = base[len("table:"):]
        table = load_layer_bits(path)
        q = quant_config_from_table(table)  # the flags the table records, else the defaults
        desc = f"per-layer table {path}" + (" (its recorded flags)" if table.meta else "")
    else:
        m = _UNIFORM.match(base)
        if not m:
            raise ConfigError(f"unknown config name {name!r} (grammar: fp32, bf16, default, seed, mixed, "
                              "table:PATH, or K4cV4t-a-g64[+r128])")
        q = QuantConfig(nbits_key=int(m["kb"]), nbits_value=int(m["vb"]), axis_key=_AX[m["ka"]],
                        axis_value=_AX[m["va"]], asym=(m["sym"] or "a") == "a", q_group_size=int(m["g"] or 64))
        desc = ""
    if elastic:
        if residual is not None or ctx.residual_length:
            raise ConfigError(f"{name}: an elastic page has no residual window")
        q = q.with_(elastic=True)  # validates: asymmetric, a 2- or 4-bit floor somewhere
    if residual is not None:
        q = q.with_(residual_length=residual)
    elif base not in ("seed",) and ctx.residual_length:
        q = q.with_(residual_length=ctx.residual_length)
    layout = PageLayout(q, ctx.shape, ctx.page_size)  # validates against the model and page size
    if not desc:
        desc = (f"K{q.nbits_key} {'per-channel' if q.axis_key else 'per-token'}, V{q.nbits_value} "
                f"{'per-channel' if q.axis_value else 'per-token'}, {'asym' if q.asym else 'sym'}, g{q.q_group_size}")
    if q.elastic:
        desc += ", elastic top: refinement planes double the 2-/4-bit layers' bits (the floor is the name without +e)"
    if q.residual_length:
        desc += f", last {math.ceil(q.residual_length / ctx.page_size)} page(s) bf16"
    del layout
    return EvalConfig(name, q, "bf16", desc, layers)


def expand_names(sweep: str | None, configs: str | None) -> list[str]:
    """The config names to run: `--configs a,b,c` wins over `--sweep NAME`."""
    if configs:
        names = [c.strip() for c in configs.split(",") if c.strip()]
    else:
        sweep = sweep or "default"
        if sweep not in SWEEPS:
            raise ConfigError(f"--sweep {sweep!r}: choose one of {sorted(SWEEPS)}")
        names = list(SWEEPS[sweep])
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]


def resolve(names: Sequence[str], ctx: ConfigContext) -> tuple[list[EvalConfig], list[tuple[str, str]]]:
    """(valid configs, [(name, reason) skipped]). Invalid configs are skipped, never fatal."""
    ok: list[EvalConfig] = []
    skipped: list[tuple[str, str]] = []
    for n in names:
        try:
            ok.append(parse_config(n, ctx))
        except ConfigError as e:
            skipped.append((n, " ".join(str(e).split())))
    return ok, skipped
