"""Quantization config: the seed's options, per-layer KVTuner tables, validation, fingerprint.

Pure Python (no torch, no sglang) so that argument validation and tests stay cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ALLOWED_BITS = (2, 3, 4, 8)
NATIVE_BITS = (2, 3, 4, 8)  # what the CUDA kernels encode and decode (3 since kernel wheel 0.7.0)
AXIS_PER_TOKEN = 0  # groups run along head_dim inside one token and head
AXIS_PER_CHANNEL = 1  # groups run along tokens inside one page, one (head, channel)


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the flag or file at fault."""


@dataclass(frozen=True)
class LayerBits:
    key: int
    value: int


@dataclass(frozen=True)
class KVShape:
    """What the host pool needs to know about the model's KV cache (per rank).

    MHA/GQA: `heads` KV heads of `head_dim` (keys) and `v_head_dim` (values).
    MLA: one latent row per token: `kv_lora_rank` latent + `qk_rope_head_dim` rope dims.
    """

    num_layers: int
    heads: int = 1
    head_dim: int = 0
    v_head_dim: int = 0
    is_mla: bool = False
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0

    @staticmethod
    def mha(num_layers: int, heads: int, head_dim: int, v_head_dim: int | None = None) -> KVShape:
        return KVShape(num_layers, heads, head_dim, head_dim if v_head_dim is None else v_head_dim)

    @staticmethod
    def mla(num_layers: int, kv_lora_rank: int = 512, qk_rope_head_dim: int = 64) -> KVShape:
        return KVShape(num_layers, 1, 0, 0, True, kv_lora_rank, qk_rope_head_dim)

    def bf16_bytes_per_token(self) -> int:
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * 2
        return self.num_layers * self.heads * (self.head_dim + self.v_head_dim) * 2


@dataclass(frozen=True)
class QuantConfig:
    """The seed's flags, one field each, plus an optional per-layer bit table.

    Defaults depart from the seed on purpose (docs/accuracy.md has the numbers): keys are
    grouped per channel and the quantizer is asymmetric. On Qwen2.5-Coder-1.5B, 4-bit
    per-token keys raise perplexity by +31,513 % (the seed's symmetric defaults +146 %),
    asymmetric per-channel 4-bit keys by +0.09 %.
    """

    nbits_key: int = 4
    nbits_value: int = 4
    asym: bool = True
    axis_key: int = AXIS_PER_CHANNEL
    axis_value: int = AXIS_PER_TOKEN
    q_group_size: int = 64
    residual_length: int = 0
    elastic: bool = False  # host pool only (floor pages are the fixed pages): not in canonical()
    layer_bits: Mapping[int, LayerBits] | None = field(default=None, compare=True)
    layer_bits_source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        errors = self._static_errors()
        if errors:
            raise ConfigError("invalid KVTuner HiCache config:\n  - " + "\n  - ".join(errors))

    def _static_errors(self) -> list[str]:
        errs = []
        for flag, bits in (("nbits-key", self.nbits_key), ("nbits-value", self.nbits_value)):
            if bits not in ALLOWED_BITS:
                errs.append(f"--kvtuner-hicache-{flag} must be one of {ALLOWED_BITS}, got {bits!r}")
        for flag, axis in (("axis-key", self.axis_key), ("axis-value", self.axis_value)):
            if axis not in (AXIS_PER_TOKEN, AXIS_PER_CHANNEL):
                errs.append(
                    f"--kvtuner-hicache-{flag} must be 0 (per-token) or 1 (per-channel), got {axis!r}"
                )
        if not isinstance(self.q_group_size, int) or self.q_group_size < 2:
            errs.append(f"--kvtuner-hicache-q-group-size must be an integer >= 2, got {self.q_group_size!r}")
        elif self.q_group_size & (self.q_group_size - 1):
            errs.append(f"--kvtuner-hicache-q-group-size must be a power of two, got {self.q_group_size}")
        if not isinstance(self.residual_length, int) or self.residual_length < 0:
            errs.append(
                f"--kvtuner-hicache-residual-length must be an integer >= 0, got {self.residual_length!r}"
            )
        if self.elastic:
            errs += self._elastic_errors()
        return errs

    def _elastic_errors(self) -> list[str]:
        errs = []
        if not self.asym:
            errs.append("--kvtuner-hicache-elastic needs the asymmetric quantizer (its 8-bit planes refine "
                        "asymmetric 4-bit codes): drop --no-kvtuner-hicache-asym")
        if self.residual_length:
            errs.append("--kvtuner-hicache-elastic cannot be combined with --kvtuner-hicache-residual-length "
                        "(the bf16 tail store and the refinement planes would compete for the same budget)")
        floors = ({b.key for b in self.layer_bits.values()} | {b.value for b in self.layer_bits.values()}
                  if self.layer_bits else {self.nbits_key, self.nbits_value})
        if not floors & {2, 4}:
            errs.append(f"--kvtuner-hicache-elastic needs a 2- or 4-bit floor on keys or values (the bit flags or "
                        f"the per-layer table give the floor; these give {sorted(floors)}): pages enter at twice "
                        "the floor's bits and step down to it")
        return errs

    # ---- per-layer bits -------------------------------------------------------------------------

    def bits_for_layer(self, layer: int) -> LayerBits:
        """Bits of one global layer index: the YAML table wins over the uniform flags."""
        if self.layer_bits is not None:
            return self.layer_bits[layer]
        return LayerBits(self.nbits_key, self.nbits_value)

    def validate_for(self, shape: KVShape, page_size: int, total_layers: int | None = 0,
                     start_layer: int = 0) -> None:
        """Check the config against a model's KV shape and the server's page size.

        `shape.num_layers` are this rank's layers, global indices `start_layer` onwards. A per-layer
        table must name exactly the model's `total_layers` layers; with `total_layers=None` (a
        pipeline stage that does not know the model's depth) it must cover this stage's layers.

        Raises one ConfigError listing every mistake, each naming the flag or file at fault.
        """
        if total_layers == 0:  # the default: this rank holds the whole model
            total_layers = start_layer + shape.num_layers
        errs: list[str] = []
        g = self.q_group_size
        src = self.layer_bits_source or "--kvtuner-hicache-config"
        if page_size < 1:
            errs.append(f"--page-size must be >= 1, got {page_size}")
        for name, dim, axis, axis_flag in self._streams(shape):
            if axis == AXIS_PER_TOKEN and dim % g:
                errs.append(
                    f"--kvtuner-hicache-q-group-size {g} does not divide the {name} dimension {dim} "
                    f"(per-token groups, --kvtuner-hicache-{axis_flag} 0)"
                )
            if axis == AXIS_PER_CHANNEL and page_size % g:
                errs.append(
                    f"--kvtuner-hicache-q-group-size {g} does not divide --page-size {page_size} "
                    f"(per-channel {name} groups run along the tokens of one page, "
                    f"--kvtuner-hicache-{axis_flag} 1); use --page-size {max(g, 64)} or a smaller group"
                )
        if self.layer_bits is not None:
            have = set(self.layer_bits)
            if total_layers is not None:
                want = set(range(total_layers))
                if have - want:
                    errs.append(f"{src} names layers the model lacks (it has {total_layers}: "
                                f"0..{total_layers - 1}): {sorted(have - want)}")
                if want - have:
                    errs.append(f"{src} is missing layers {_ranges(sorted(want - have))} of {total_layers}")
            else:
                want = set(range(start_layer, start_layer + shape.num_layers))
                if want - have:
                    errs.append(f"{src} is missing layers {_ranges(sorted(want - have))} of this pipeline stage")
        if shape.is_mla:
            key_bits = {self.bits_for_layer(i).key for i in range(start_layer, start_layer + shape.num_layers) if self._has_layer(i)}
            if any(b < 8 for b in key_bits):
                errs.append(
                    "MLA models map key bits onto the rope part of the latent row, which is position "
                    "sensitive and must stay at 8 bits: pass --kvtuner-hicache-nbits-key 8 "
                    "(and nbits_key: 8 in every layer of a per-layer table)"
                )
        if errs:
            raise ConfigError("KVTuner HiCache config does not fit this model:\n  - " + "\n  - ".join(errs))

    def _has_layer(self, layer: int) -> bool:
        return self.layer_bits is None or layer in self.layer_bits

    def _streams(self, shape: KVShape) -> list[tuple[str, int, int, str]]:
        if shape.is_mla:
            return [
                ("MLA latent", shape.kv_lora_rank, self.axis_value, "axis-value"),
                ("MLA rope", shape.qk_rope_head_dim, self.axis_key, "axis-key"),
            ]
        return [
            ("key head", shape.head_dim, self.axis_key, "axis-key"),
            ("value head", shape.v_head_dim, self.axis_value, "axis-value"),
        ]

    # ---- identity -------------------------------------------------------------------------------

    def canonical(self) -> dict[str, Any]:
        """Everything that changes the bytes of a page, in a stable JSON-able form."""
        return {
            "nbits_key": self.nbits_key,
            "nbits_value": self.nbits_value,
            "asym": self.asym,
            "axis_key": self.axis_key,
            "axis_value": self.axis_value,
            "q_group_size": self.q_group_size,
            "layer_bits": None
            if self.layer_bits is None
            else {str(k): [v.key, v.value] for k, v in sorted(self.layer_bits.items())},
        }

    def fingerprint(self) -> str:
        """Stable 16-hex-digit id of the page-shaping options (residual length is not one)."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def short_name(self) -> str:
        """Human label such as `K4cV4t-a-g64` or `mixed(3.93b)cV4t` used in tables and logs."""
        kb = f"K{self.nbits_key}" if self.layer_bits is None else "Kmix"
        vb = f"V{self.nbits_value}" if self.layer_bits is None else "Vmix"
        ax = {AXIS_PER_TOKEN: "t", AXIS_PER_CHANNEL: "c"}
        return f"{kb}{ax[self.axis_key]}{vb}{ax[self.axis_value]}-{'a' if self.asym else 's'}-g{self.q_group_size}"

    def with_(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def parse_layer_bits(data: Any, source: str) -> dict[int, LayerBits]:
    """Parse a KVTuner per-layer table `{layer: {nbits_key: k, nbits_value: v}}`."""
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{source}: expected a mapping {{layer_index: {{nbits_key, nbits_value}}}}")
    table: dict[int, LayerBits] = {}
    errs = []
    for raw_layer, entry in data.items():
        try:
            layer = int(raw_layer)
        except (TypeError, ValueError):
            errs.append(f"layer key {raw_layer!r} is not an integer")
            continue
        if layer < 0:
            errs.append(f"layer {layer} is negative")
            continue
        if not isinstance(entry, Mapping) or set(entry) != {"nbits_key", "nbits_value"}:
            errs.append(f"layer {layer}: expected exactly {{nbits_key, nbits_value}}, got {entry!r}")
            continue
        k, v = entry["nbits_key"], entry["nbits_value"]
        bad = [f"{n}={b!r}" for n, b in (("nbits_key", k), ("nbits_value", v)) if b not in ALLOWED_BITS]
        if bad:
            errs.append(f"layer {layer}: bits must be one of {ALLOWED_BITS}, got {', '.join(bad)}")
            continue
        if layer in table:
            errs.append(f"layer {layer} appears twice")
        table[layer] = LayerBits(int(k), int(v))
    if errs:
        raise ConfigError(f"{source}: invalid per-layer table:\n  - " + "\n  - ".join(errs))
    return table


TABLE_META_PREFIX = "#@kvtuner-hicache "
"""A per-layer YAML may carry one comment line `#@kvtuner-hicache {json}`: the flags it was
calibrated with. Being a comment, every YAML reader (KVTuner's included) ignores it."""

# recorded flag -> (QuantConfig field, server flag)
_RECORDED_FLAGS: dict[str, tuple[str, str]] = {
    "axis_key": ("axis_key", "--kvtuner-hicache-axis-key"),
    "axis_value": ("axis_value", "--kvtuner-hicache-axis-value"),
    "q_group_size": ("q_group_size", "--kvtuner-hicache-q-group-size"),
    "asym": ("asym", "--kvtuner-hicache-asym"),
}


class LayerTable(dict):  # type: ignore[type-arg]
    """A per-layer table `{layer: LayerBits}` (a plain dict to every existing caller) that also
    remembers where it came from (`source`) and the flags it was calibrated with (`meta`, the
    `#@kvtuner-hicache` block, or None for a table without one, e.g. a KVTuner preset).

    `QuantConfig(layer_bits=table)` keeps the object, so `table_flag_errors(cfg)` can check the
    config's flags against `meta` later.
    """

    meta: dict[str, Any] | None = None
    source: str | None = None


def table_meta_line(meta: Mapping[str, Any]) -> str:
    """The comment line that records `meta` in a per-layer YAML (see TABLE_META_PREFIX)."""
    return TABLE_META_PREFIX + json.dumps(dict(meta), sort_keys=True, separators=(", ", ": "))


def parse_table_meta(text: str, source: str = "table") -> dict[str, Any] | None:
    """The `#@kvtuner-hicache {json}` block of a YAML text, or None when it has none."""
    for line in text.splitlines():
        if line.startswith(TABLE_META_PREFIX):
            try:
                meta = json.loads(line[len(TABLE_META_PREFIX):])
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source}: unreadable {TABLE_META_PREFIX.strip()} line: {e}") from e
            if not isinstance(meta, dict):
                raise ConfigError(f"{source}: {TABLE_META_PREFIX.strip()} must be a JSON object")
            return meta
    return None


def load_layer_bits(path: str | os.PathLike) -> LayerTable:
    """Load a KVTuner per-layer YAML (or JSON) file.

    Returns a LayerTable: a dict {layer: LayerBits} with `.meta` (the recorded calibration flags,
    None if the file has no `#@kvtuner-hicache` line) and `.source` (the path).
    """
    import yaml  # local: only needed when a table is given

    path = os.fspath(path)
    source = f"--kvtuner-hicache-config {path}"
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    table = LayerTable(parse_layer_bits(data, source))
    table.meta = parse_table_meta(text, source)
    table.source = path
    return table


def _flag_value(name: str, value: Any) -> str:
    if name == "asym":
        return "--kvtuner-hicache-asym" if value else "--no-kvtuner-hicache-asym"
    flag = _RECORDED_FLAGS[name][1]
    return f"{flag} {value}"


def table_flag_errors(cfg: QuantConfig, meta: Mapping[str, Any] | None = None) -> list[str]:
    """Which flags of `cfg` disagree with the flags its per-layer table was calibrated with.

    `meta` defaults to `cfg.layer_bits.meta` (set by `load_layer_bits` from the table's
    `#@kvtuner-hicache` line). Checked: axis_key, axis_value, q_group_size, asym: the flags that
    change what a layer's bits cost in accuracy. (The page size is recorded for information only:
    groups never cross a page, so a table's bits mean the same at every page size its group fits.)
    Returns one message per disagreement, naming the recorded value and the flag to pass; [] when
    all agree, when `cfg` has no table, or when the table records nothing (KVTuner's presets:
    see `preset_model_warning`).
    """
    if meta is None:
        meta = getattr(cfg.layer_bits, "meta", None)
    if not meta or cfg.layer_bits is None:
        return []
    src = getattr(cfg.layer_bits, "source", None) or cfg.layer_bits_source or "the per-layer table"
    errs = []
    for name, (fld, _flag) in _RECORDED_FLAGS.items():
        if name not in meta:
            continue
        want, have = meta[name], getattr(cfg, fld)
        if (bool(want) != bool(have)) if name == "asym" else (int(want) != int(have)):
            errs.append(f"{src} was calibrated with {_flag_value(name, want)}, but this config has "
                        f"{_flag_value(name, have)}: pass {_flag_value(name, want)} (or recalibrate "
                        "with python -m kvtuner_hicache.calibrate for these flags)")
    return errs


def check_table_flags(cfg: QuantConfig) -> None:
    """Raise one ConfigError listing every `table_flag_errors(cfg)`; nothing when they agree."""
    errs = table_flag_errors(cfg)
    if errs:
        raise ConfigError("the per-layer table does not match the quantization flags:\n  - " + "\n  - ".join(errs))


def quant_config_from_table(table: Mapping[int, LayerBits], **overrides: Any) -> QuantConfig:
    """A QuantConfig holding `table` with the flags recorded in its metadata (project defaults for
    flags it does not record); `overrides` win (and are then checked by `table_flag_errors`)."""
    meta = getattr(table, "meta", None) or {}
    fields: dict[str, Any] = {fld: meta[name] for name, (fld, _) in _RECORDED_FLAGS.items() if name in meta}
    fields.update(overrides)
    return QuantConfig(layer_bits=table, layer_bits_source=getattr(table, "source", None), **fields)


_PRESET_NAME = re.compile(r"^(?P<model>.+?)_(?P<mode>kivi|pertoken)_KVTuner(?P<budget>\d+)_(?P<point>\d+)$", re.I)


def _model_key(name: str) -> str:
    """'Qwen/Qwen2.5-7B-Instruct' or '/m/qwen2.5-7b-instruct/' -> 'qwen257binstruct'."""
    base = os.path.basename(os.path.normpath(str(name))) or str(name)
    return re.sub(r"[^a-z0-9]", "", base.lower())


def table_model(path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> str | None:
    """The model a table was tuned on: `meta['model']`, else a KVTuner preset file name's
    `<model>_<kivi|pertoken>_KVTuner<b>_<p>.yaml`, else None."""
    if meta and meta.get("model"):
        return str(meta["model"])
    m = _PRESET_NAME.match(os.path.splitext(os.path.basename(os.fspath(path)))[0])
    return m["model"] if m else None


def preset_model_warning(path: str | os.PathLike, model_path: str, cfg: QuantConfig | None = None) -> str | None:
    """A warning when the table at `path` was tuned on another model than `model_path`, else None.

    The tuned-on model comes from the table's recorded metadata or a KVTuner preset's file name.
    Names are compared after lower-casing and dropping everything but letters and digits, and a
    match of either name inside the other counts (so 'qwen2.5-coder-1.5b' matches
    'Qwen/Qwen2.5-Coder-1.5B-Instruct'). With `cfg`, a KVTuner preset's mode (kivi: per-channel
    keys, per-token values, group 32; pertoken: per-token keys and values, group = head_dim) is
    also compared with cfg's axes and mentioned when it differs. None when nothing is known.
    """
    meta = getattr(cfg.layer_bits, "meta", None) if cfg is not None else None
    tuned = table_model(path, meta)
    notes = []
    if tuned is not None:
        a, b = _model_key(tuned), _model_key(model_path)
        if a and b and a not in b and b not in a:
            notes.append(f"per-layer table {os.fspath(path)} was tuned on {tuned}, not on {model_path}: its layer "
                         "choices reflect that model's sensitivities, not this one's; calibrate a table for "
                         "this model with python -m kvtuner_hicache.calibrate")
    m = _PRESET_NAME.match(os.path.splitext(os.path.basename(os.fspath(path)))[0])
    if m and cfg is not None and not meta:
        mode = m["mode"].lower()
        want = (AXIS_PER_CHANNEL, AXIS_PER_TOKEN) if mode == "kivi" else (AXIS_PER_TOKEN, AXIS_PER_TOKEN)
        if (cfg.axis_key, cfg.axis_value) != want:
            notes.append(f"{os.path.basename(os.fspath(path))} is a KVTuner '{mode}' preset (keys axis {want[0]}, "
                         f"values axis {want[1]}), used here with --kvtuner-hicache-axis-key {cfg.axis_key} "
                         f"--kvtuner-hicache-axis-value {cfg.axis_value}")
    return "; ".join(notes) if notes else None


def mean_bits(cfg: QuantConfig, num_layers: int) -> float:
    """KVTuner's 'equivalent bits': mean of (k+v)/2 over layers, metadata excluded."""
    return sum((cfg.bits_for_layer(i).key + cfg.bits_for_layer(i).value) / 2 for i in range(num_layers)) / num_layers
