"""QuantConfig validation, per-layer YAML tables and the fingerprint."""

from __future__ import annotations

import pytest
from kvtuner_hicache.config import (
    ConfigError,
    KVShape,
    LayerBits,
    QuantConfig,
    load_layer_bits,
    mean_bits,
    parse_layer_bits,
)

QWEN7B = KVShape.mha(28, 4, 128)


def test_defaults_are_the_documented_safe_ones():
    cfg = QuantConfig()
    assert (cfg.nbits_key, cfg.nbits_value, cfg.asym, cfg.axis_key, cfg.axis_value, cfg.q_group_size) == (4, 4, True, 1, 0, 64)
    cfg.validate_for(QWEN7B, 64)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"nbits_key": 3}, "--kvtuner-hicache-nbits-key"),
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
        QuantConfig(nbits_key=3, nbits_value=5)
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
        ("0: {nbits_key: 3, nbits_value: 2}\n", "nbits_key=3"),
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


def test_kvtuner_presets_load_and_match_published_means(presets_dir):
    # Mean bits published in the KVTuner paper (kvtuner-method.md §2.2).
    expected = {
        "Qwen2.5-7B-Instruct_pertoken_KVTuner4_0.yaml": (28, 4.000),
        "Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml": (28, 3.929),
        "Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_1.yaml": (32, 3.250),
        "Meta-Llama-3.1-8B-Instruct_pertoken_KVTuner6_1.yaml": (32, 5.438),
    }
    for name, (layers, mean) in expected.items():
        table = load_layer_bits(presets_dir / name)
        assert sorted(table) == list(range(layers))
        cfg = QuantConfig(layer_bits=table)
        assert mean_bits(cfg, layers) == pytest.approx(mean, abs=1e-3)
    for path in sorted(presets_dir.glob("*.yaml")):
        assert load_layer_bits(path)


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
