"""QuantConfig validation, per-layer YAML tables and the fingerprint."""

from __future__ import annotations

import pytest
from kvtuner_hicache.config import (
    ConfigError,
    KVShape,
    LayerBits,
    QuantConfig,
    check_table_flags,
    load_layer_bits,
    mean_bits,
    parse_layer_bits,
    preset_model_warning,
    quant_config_from_table,
    table_flag_errors,
    table_meta_line,
)

QWEN7B = KVShape.mha(28, 4, 128)


def test_defaults_are_the_documented_safe_ones():
    cfg = QuantConfig()
    assert (cfg.nbits_key, cfg.nbits_value, cfg.asym, cfg.axis_key, cfg.axis_value, cfg.q_group_size) == (4, 4, True, 1, 0, 64)
    cfg.validate_for(QWEN7B, 64)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"nbits_key": 5}, "--kvtuner-hicache-nbits-key"),
        ({"nbits_value": 16}, "--kvtuner-hicache-nbits-value"),
        ({"axis_key": 2}, "--kvtuner-hicache-axis-key"),
        ({"axis_value": -1}, "--kvtuner-hicache-axis-value"),
        ({"q_group_size": 0}, "--kvtuner-hicache-q-group-size"),
        ({"q_group_size": 48}, "power of two"),
        ({"residual_length": -1}, "--kvtuner-hicache-residual-length"),
    ],
)
def test_each_bad_flag_names_itself(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        QuantConfig(**kwargs)


def test_all_mistakes_reported_at_once():
    with pytest.raises(ConfigError) as e:
        QuantConfig(nbits_key=5, nbits_value=6)
    assert "nbits-key" in str(e.value) and "nbits-value" in str(e.value)


def test_group_must_divide_head_dim_for_per_token_axis():
    cfg = QuantConfig(axis_key=0, q_group_size=128)
    with pytest.raises(ConfigError, match="does not divide the key head dimension 64"):
        cfg.validate_for(KVShape.mha(4, 2, 64), 64)


def test_group_must_divide_page_size_for_per_channel_axis():
    with pytest.raises(ConfigError, match="does not divide --page-size 16"):
        QuantConfig(axis_key=1, q_group_size=64).validate_for(QWEN7B, 16)
    with pytest.raises(ConfigError, match="does not divide --page-size 1"):
        QuantConfig().validate_for(QWEN7B, 1)
    QuantConfig(q_group_size=16).validate_for(QWEN7B, 16)


def test_mla_requires_8_bit_rope():
    with pytest.raises(ConfigError, match="rope"):
        QuantConfig(nbits_key=4).validate_for(KVShape.mla(61), 64)
    QuantConfig(nbits_key=8, nbits_value=4).validate_for(KVShape.mla(61), 64)


def test_yaml_table_layer_count_mismatches(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("".join(f"{i}: {{nbits_key: 4, nbits_value: 2}}\n" for i in range(30)))
    cfg = QuantConfig(layer_bits=load_layer_bits(path), layer_bits_source=str(path))
    with pytest.raises(ConfigError, match=r"names layers the model lacks.*\[28, 29\]"):
        cfg.validate_for(QWEN7B, 64)
    with pytest.raises(ConfigError, match="is missing layers 30-31 of 32"):
        cfg.validate_for(KVShape.mha(32, 8, 128), 64)


@pytest.mark.parametrize(
    "text, msg",
    [
        ("0: {nbits_key: 5, nbits_value: 2}\n", "nbits_key=5"),
        ("0: {nbits_key: 4}\n", "expected exactly"),
        ("x: {nbits_key: 4, nbits_value: 4}\n", "not an integer"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("0: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_tables(tmp_path, text, msg):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_layer_bits(path)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_layer_bits(tmp_path / "nope.yaml")


# A small table in KVTuner's own format (no metadata), shipped with the test: 4 layers, named the
# way KVTuner names its presets (<model>_<mode>_KVTuner<budget>_<point>.yaml).
KVTUNER_STYLE = "".join(f"{i}:\n  nbits_key: {k}\n  nbits_value: {v}\n" for i, (k, v) in enumerate([(8, 8), (2, 2), (4, 4), (4, 2)]))


def test_kvtuner_format_tables_load_without_metadata(tmp_path):
    path = tmp_path / "Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml"
    path.write_text(KVTUNER_STYLE)
    table = load_layer_bits(path)
    assert table == {0: LayerBits(8, 8), 1: LayerBits(2, 2), 2: LayerBits(4, 4), 3: LayerBits(4, 2)}
    assert isinstance(table, dict) and table.meta is None and table.source == str(path)
    cfg = QuantConfig(layer_bits=table)
    assert mean_bits(cfg, 4) == pytest.approx((8 + 2 + 4 + 3) / 4)
    assert table_flag_errors(cfg) == []  # nothing recorded, nothing to disagree with


def _calibrated(tmp_path, **meta):
    path = tmp_path / "layers.yaml"
    rec = {"format": 1, "model": "qwen2.5-coder-1.5b", "axis_key": 1, "axis_value": 0, "q_group_size": 64, "asym": True}
    rec.update(meta)
    path.write_text("# made by a test\n" + table_meta_line(rec) + "\n" + KVTUNER_STYLE)
    return path


def test_recorded_flags_round_trip_and_agree(tmp_path):
    path = _calibrated(tmp_path)
    table = load_layer_bits(path)
    assert table.meta["axis_key"] == 1 and table.meta["asym"] is True
    cfg = QuantConfig(layer_bits=table, layer_bits_source=str(path))
    assert table_flag_errors(cfg) == []
    check_table_flags(cfg)
    # a config built from the table's own flags agrees by construction
    assert table_flag_errors(quant_config_from_table(table)) == []
    # and YAML readers that know nothing of the metadata see a plain KVTuner table
    import yaml
    assert set(yaml.safe_load(path.read_text())) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "flags, expect",
    [
        ({"axis_key": 0}, "calibrated with --kvtuner-hicache-axis-key 1, but this config has --kvtuner-hicache-axis-key 0: pass --kvtuner-hicache-axis-key 1"),
        ({"axis_value": 1}, "pass --kvtuner-hicache-axis-value 0"),
        ({"q_group_size": 32}, "pass --kvtuner-hicache-q-group-size 64"),
        ({"asym": False}, "but this config has --no-kvtuner-hicache-asym: pass --kvtuner-hicache-asym"),
    ],
)
def test_each_disagreeing_flag_is_named_with_the_fix(tmp_path, flags, expect):
    table = load_layer_bits(_calibrated(tmp_path))
    cfg = QuantConfig(layer_bits=table, **flags)
    errs = table_flag_errors(cfg)
    assert len(errs) == 1 and expect in errs[0] and "layers.yaml" in errs[0]
    with pytest.raises(ConfigError, match="does not match the quantization flags"):
        check_table_flags(cfg)


def test_all_disagreements_at_once_and_sym_recorded(tmp_path):
    table = load_layer_bits(_calibrated(tmp_path, asym=False, axis_key=0))
    errs = table_flag_errors(QuantConfig(layer_bits=table))
    assert len(errs) == 2
    assert any("pass --no-kvtuner-hicache-asym" in e for e in errs)
    assert table_flag_errors(quant_config_from_table(table)) == []
    # uniform configs have no table, hence nothing to check
    assert table_flag_errors(QuantConfig()) == []
    # metadata can also be passed explicitly (e.g. read elsewhere)
    assert table_flag_errors(QuantConfig(layer_bits=dict(table)), {"axis_key": 0}) != []


def test_bad_metadata_line(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("#@kvtuner-hicache {not json\n" + KVTUNER_STYLE)
    with pytest.raises(ConfigError, match="unreadable"):
        load_layer_bits(path)


@pytest.mark.parametrize(
    "name, model, warns",
    [
        ("Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml", "Qwen/Qwen2.5-7B-Instruct", False),
        ("Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml", "/models/qwen2.5-7b-instruct/", False),
        ("Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml", "Qwen/Qwen2.5-Coder-1.5B-Instruct", True),
        ("Meta-Llama-3.1-8B-Instruct_pertoken_KVTuner6_1.yaml", "meta-llama/Llama-3.1-8B-Instruct", False),  # renamed
        ("Meta-Llama-3.1-8B-Instruct_pertoken_KVTuner6_1.yaml", "mistralai/Mistral-7B-Instruct-v0.3", True),
        ("Meta-Llama-3.1-8B-Instruct_pertoken_KVTuner6_1.yaml", "meta-llama/Meta-Llama-3.1-8B-Instruct", False),
        ("my_table.yaml", "Qwen/Qwen2.5-Coder-1.5B-Instruct", False),  # nothing known: no warning
    ],
)
def test_preset_model_warning(tmp_path, name, model, warns):
    path = tmp_path / name
    path.write_text(KVTUNER_STYLE)
    msg = preset_model_warning(path, model)
    assert (msg is not None) == warns
    if warns:
        assert "was tuned on" in msg and model in msg


def test_preset_model_warning_uses_recorded_model_and_preset_mode(tmp_path):
    table_path = _calibrated(tmp_path)
    cfg = QuantConfig(layer_bits=load_layer_bits(table_path))
    assert preset_model_warning(table_path, "Qwen/Qwen2.5-Coder-1.5B-Instruct", cfg) is None
    assert "qwen2.5-coder-1.5b" in preset_model_warning(table_path, "Qwen/Qwen2.5-Coder-0.5B-Instruct", cfg)
    preset = tmp_path / "Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml"
    preset.write_text(KVTUNER_STYLE)
    per_token = QuantConfig(layer_bits=load_layer_bits(preset), axis_key=0)
    msg = preset_model_warning(preset, "Qwen/Qwen2.5-7B-Instruct", per_token)
    assert msg is not None and "'kivi' preset" in msg
    assert preset_model_warning(preset, "Qwen/Qwen2.5-7B-Instruct", QuantConfig(layer_bits=load_layer_bits(preset))) is None


def test_fingerprint_is_stable_and_tracks_page_shaping_options():
    a = QuantConfig()
    assert a.fingerprint() == QuantConfig().fingerprint()
    assert len(a.fingerprint()) == 16
    others = [a.with_(nbits_key=8), a.with_(asym=False), a.with_(axis_key=0), a.with_(q_group_size=32),
              a.with_(layer_bits={0: LayerBits(4, 4)})]
    assert len({c.fingerprint() for c in others} | {a.fingerprint()}) == len(others) + 1
    # residual length changes what stays full precision in L2, not the page bytes
    assert a.with_(residual_length=128).fingerprint() == a.fingerprint()


def test_parse_layer_bits_accepts_string_keys():
    table = parse_layer_bits({"0": {"nbits_key": 8, "nbits_value": 4}}, "inline")
    assert table == {0: LayerBits(8, 4)}


def test_pipeline_stage_tables():
    table = {i: LayerBits(4, 2) for i in range(8)}
    stage = KVShape.mha(4, 2, 64)
    QuantConfig(layer_bits=table).validate_for(stage, 64, total_layers=None, start_layer=4)  # stage 2 of 2
    with pytest.raises(ConfigError, match="names layers the model lacks"):
        QuantConfig(layer_bits=table).validate_for(stage, 64, total_layers=4)
    with pytest.raises(ConfigError, match="missing layers 8-9 of this pipeline stage"):
        QuantConfig(layer_bits=table).validate_for(stage, 64, total_layers=None, start_layer=6)
