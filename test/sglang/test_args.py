"""Flags, config transport and start-up validation through SGLang's real argument parsing."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from kvtuner_hicache.config import ConfigError, LayerBits, QuantConfig
from kvtuner_hicache.sglang_ext import args as kargs
from kvtuner_hicache.sglang_ext import plugin

pytestmark = pytest.mark.sglang

ENABLE = ["--enable-hierarchical-cache", "--enable-kvtuner-hicache", "--page-size", "64"]


def _parse(tiny_model, *extra):
    """Parse and resolve as the launcher does (validation runs in the release's resolution step)."""
    from sglang_env import resolved_server_args

    return resolved_server_args(tiny_model, *extra)


def _cfg():
    return plugin.active_config()


def _fails(capsys, tiny_model, *extra) -> str:
    with pytest.raises(SystemExit) as exc:
        _parse(tiny_model, *extra)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_help_lists_all_our_flags(kvtq_hooks):
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    text = parser.format_help()
    assert len(kargs.ALL_FLAGS) == 10
    for flag in kargs.ALL_FLAGS + ["--no-kvtuner-hicache-asym"]:
        assert flag in text, flag


def test_defaults_come_from_quantconfig(kvtq_hooks, tiny_model, monkeypatch):
    seen = []
    real = kargs.validate_server_args
    monkeypatch.setattr(kargs, "validate_server_args", lambda sa, cfg, era=None: seen.append(cfg) or real(sa, cfg, era))
    _parse(tiny_model, *ENABLE)
    assert _cfg() == QuantConfig()  # what the scheduler processes will read (SGLANG_KVTUNER_HICACHE)
    assert seen == [QuantConfig()]  # the release's resolution step ran our validation, once


def test_off_by_default(kvtq_hooks, tiny_model):
    _parse(tiny_model, "--enable-hierarchical-cache")
    assert _cfg() is None
    assert kargs.ENV_VAR not in os.environ


def test_every_flag_reaches_the_config(kvtq_hooks, tiny_model, mixed_table):
    _parse(tiny_model, *ENABLE, "--kvtuner-hicache-nbits-key", "8", "--kvtuner-hicache-nbits-value", "2",
           "--no-kvtuner-hicache-asym", "--kvtuner-hicache-axis-key", "0", "--kvtuner-hicache-axis-value", "0",
           "--kvtuner-hicache-q-group-size", "32", "--kvtuner-hicache-residual-length", "100")
    cfg = _cfg()
    assert (cfg.nbits_key, cfg.nbits_value, cfg.asym, cfg.axis_key, cfg.axis_value, cfg.q_group_size,
            cfg.residual_length) == (8, 2, False, 0, 0, 32, 100)
    _parse(tiny_model, *ENABLE, "--kvtuner-hicache-config", str(mixed_table))
    cfg = _cfg()
    assert len(cfg.layer_bits) == 28 and str(mixed_table) in cfg.layer_bits_source
    assert cfg.layer_bits[0] == LayerBits(8, 4) and cfg.layer_bits[1] == LayerBits(8, 2)


def test_stale_env_does_not_enable_a_cli_launch(kvtq_hooks, tiny_model):
    kargs.set_env_config(QuantConfig(nbits_key=8))  # e.g. left over from an Engine session
    _parse(tiny_model, "--enable-hierarchical-cache")
    assert _cfg() is None
    assert kargs.ENV_VAR not in os.environ


def test_seed_asym_flag_still_works(kvtq_hooks, tiny_model):
    _parse(tiny_model, *ENABLE, "--kvtuner-hicache-asym")
    assert _cfg().asym is True


@pytest.mark.parametrize("extra, needle", [
    (["--kvtuner-hicache-nbits-key", "2"], "--kvtuner-hicache-nbits-key needs --enable-kvtuner-hicache"),
    (["--no-kvtuner-hicache-asym"], "--kvtuner-hicache-asym needs --enable-kvtuner-hicache"),
    (["--enable-kvtuner-hicache"], "requires --enable-hierarchical-cache"),
    # 0.5.20+ rewrite page_first + direct to page_first_direct (and back); 0.5.19 keeps what was given
    ([*ENABLE, "--hicache-io-backend", "direct"], ("page_first_direct", "--hicache-io-backend direct is not supported")),
    ([*ENABLE, "--hicache-mem-layout", "layer_first"], "--hicache-mem-layout resolved to layer_first"),
    ([*ENABLE, "--hicache-mem-layout", "page_head"], "resolved to page_head"),
    ([*ENABLE, "--hicache-mem-layout", "page_first_direct"], ("--hicache-io-backend direct", "resolved to page_first_direct")),
    ([*ENABLE, "--hicache-mem-layout", "page_first_kv_split"], "resolved to page_first_kv_split"),
    ([*ENABLE, "--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
    ([*ENABLE, "--use-ray"], "--use-ray"),
    ([*ENABLE, "--hicache-storage-backend", "hf3fs"], "hf3fs"),
    ([*ENABLE, "--kvtuner-hicache-q-group-size", "48"], "--kvtuner-hicache-q-group-size must be a power of two"),
    ([*ENABLE, "--kvtuner-hicache-residual-length", "-1"], "--kvtuner-hicache-residual-length"),
    ([*ENABLE, "--kvtuner-hicache-config", "/nonexistent.yaml"], "--kvtuner-hicache-config /nonexistent.yaml"),
    ([*ENABLE, "--kvtuner-hicache-nbits-key", "5"], "--kvtuner-hicache-nbits-key"),  # argparse choices
    ([*ENABLE, "--kvtuner-hicache-config", "PRESET", "--kvtuner-hicache-nbits-value", "2"],
     "--kvtuner-hicache-nbits-value has no effect with --kvtuner-hicache-config"),
    (["--kvtuner-hicache-elastic"], "--kvtuner-hicache-elastic needs --enable-kvtuner-hicache"),
    ([*ENABLE, "--kvtuner-hicache-elastic", "--no-kvtuner-hicache-asym"],
     "--kvtuner-hicache-elastic needs the asymmetric quantizer"),
    ([*ENABLE, "--kvtuner-hicache-elastic", "--kvtuner-hicache-residual-length", "64"],
     "--kvtuner-hicache-elastic cannot be combined with --kvtuner-hicache-residual-length"),
    ([*ENABLE, "--kvtuner-hicache-elastic", "--kvtuner-hicache-nbits-key", "8", "--kvtuner-hicache-nbits-value", "8"],
     "--kvtuner-hicache-elastic needs a 2- or 4-bit floor"),
])
def test_cli_mistakes_fail_cleanly(kvtq_hooks, tiny_model, capsys, mixed_table, extra, needle):
    err = _fails(capsys, tiny_model, *[str(mixed_table) if x == "PRESET" else x for x in extra])
    assert any(n in err for n in ((needle,) if isinstance(needle, str) else needle)), err[-400:]
    assert "Traceback" not in err


def test_hnd_device_layout_rejected(kvtq_hooks, tiny_model, capsys):
    os.environ["SGLANG_USE_HND_KVCACHE"] = "1"
    assert "SGLANG_USE_HND_KVCACHE" in _fails(capsys, tiny_model, *ENABLE)


def test_unified_tree_env_on_hiradix_releases_only(kvtq_hooks, tiny_model, capsys, era):
    """0.5.17/0.5.18 plug into HiRadixCache: their opt-in unified tree is refused; from 0.5.19 it is the only tree."""
    os.environ["SGLANG_ENABLE_UNIFIED_RADIX_TREE"] = "1"
    if era.pool_seam == "hiradix":
        assert "SGLANG_ENABLE_UNIFIED_RADIX_TREE" in _fails(capsys, tiny_model, *ENABLE)
    else:
        _parse(tiny_model, *ENABLE)
        assert _cfg() == QuantConfig()


def test_two_mistakes_two_lines(kvtq_hooks, tiny_model, capsys):
    err = _fails(capsys, tiny_model, *ENABLE, "--hicache-storage-backend", "hf3fs", "--use-ray")
    assert err.count("\n  - ") == 2


def _engine_args(**kw):
    """What Engine(**kwargs) does: ServerArgs(**kwargs), then the release's resolution."""
    from sglang.srt.server_args import ServerArgs

    sa = ServerArgs(**kw)
    resolve = getattr(sa, "resolve_once", None)
    if resolve is not None:
        resolve()
    return sa


def test_engine_kwargs_use_env(kvtq_hooks, tiny_model):
    """Engine(**kwargs) builds ServerArgs directly: the env var carries the config and the checks run."""
    kargs.set_env_config(QuantConfig(nbits_key=8))
    _engine_args(model_path=tiny_model, device="cpu", enable_hierarchical_cache=True, page_size=64)
    assert _cfg().nbits_key == 8
    with pytest.raises(ConfigError, match="requires --enable-hierarchical-cache"):
        _engine_args(model_path=tiny_model, device="cpu")


def test_enable_for_engine(kvtq_hooks, monkeypatch, mixed_table):
    import importlib.metadata as md

    from kvtuner_hicache.sglang_ext import enable_for_engine

    class EP:
        name = "kvtuner_hicache"

    monkeypatch.setattr(md, "entry_points", lambda group=None: [EP()])
    cfg = enable_for_engine(axis_key=0, config=str(mixed_table))
    assert kargs.config_from_env() == cfg and cfg.layer_bits is not None
    with pytest.raises(ConfigError, match="nbits-key"):
        enable_for_engine(nbits_key=5)
    with pytest.raises(ConfigError, match="nbits_key has no effect with config="):
        enable_for_engine(nbits_key=8, config=str(mixed_table))
    monkeypatch.setenv("SGLANG_PLUGINS", "other")
    with pytest.raises(ConfigError, match="SGLANG_PLUGINS"):
        enable_for_engine()
    monkeypatch.setattr(md, "entry_points", lambda group=None: [])
    monkeypatch.delenv("SGLANG_PLUGINS")
    with pytest.raises(ConfigError, match="entry point is not installed"):
        enable_for_engine()


def test_env_json_roundtrip_and_errors():
    cfg = QuantConfig(nbits_key=8, asym=False, residual_length=64, layer_bits={0: LayerBits(2, 4), 1: LayerBits(8, 8)})
    assert kargs.config_from_json(kargs.config_to_json(cfg)) == cfg
    assert kargs.config_from_json(kargs.config_to_json(cfg)).residual_length == 64
    with pytest.raises(ConfigError, match=kargs.ENV_VAR):
        kargs.config_from_json("{not json")
    with pytest.raises(ConfigError, match="nbits-key"):
        kargs.config_from_json(json.dumps({"nbits_key": 5}))


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("backend, config, needle", [
    ("juicefs", '{"mount_point": "/nonexistent/jfs"}', "mount point /nonexistent/jfs does not exist"),
    ("juicefs", "{}", "needs a mount point"),
    ("lmcache", '{"endpoint": "127.0.0.1:1", "connect_timeout_s": 2}', "cannot reach an LMCache server at 127.0.0.1:1"),
])
def test_seed_l3_commands_fail_fast_in_the_launcher(kvtq_hooks, tiny_model, capsys, quantized, backend, config, needle):
    """The seed's L3 commands, with a missing mount or a dead server: one clear line before any model loads."""
    extra = ENABLE if quantized else ["--enable-hierarchical-cache"]
    err = _fails(capsys, tiny_model, *extra, "--hicache-storage-backend", backend,
                 "--hicache-storage-backend-config", config)
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("extra, needle", [
    (["--enable-hierarchical-cache", "--enable-kvtuner-hicache"],  # SGLang's default page size is 1
     "--kvtuner-hicache-q-group-size 64 does not divide --page-size 1"),
    ([*ENABLE, "--kvtuner-hicache-axis-key", "0", "--kvtuner-hicache-q-group-size", "128"],
     "does not divide the key head dimension 64"),
    ([*ENABLE, "--kvtuner-hicache-config", "LLAMA"], "names layers the model lacks (it has 28"),
])
def test_model_mismatches_fail_in_the_launcher(kvtq_hooks, tiny_model, capsys, table_32_layers, extra, needle):
    """Page size, group and per-layer table are checked against the local config.json before any process starts."""
    llama = str(table_32_layers)
    err = _fails(capsys, tiny_model, *[llama if x == "LLAMA" else x for x in extra])
    assert needle in err and "Traceback" not in err


def test_unsupported_release_fails_at_start_up(kvtq_hooks, tiny_model, capsys, monkeypatch):
    from kvtuner_hicache.sglang_ext import eras

    monkeypatch.setattr(eras, "installed_sglang_version", lambda: "0.5.24")
    err = _fails(capsys, tiny_model, *ENABLE)
    assert "SGLang 0.5.24 is not supported" in err and "0.5.17 to 0.5.23" in err and "Traceback" not in err
    _parse(tiny_model, "--enable-hierarchical-cache")  # without the flag the plugin stays out of the way
    assert _cfg() is None


def test_buffer_only_host_mode_is_refused(kvtq_hooks, tiny_model, capsys, era):
    """--hicache-host-memory-mode (0.5.19+) buffer_only makes L2 a staging buffer: refused at start-up."""
    if era.pool_seam == "hiradix":  # 0.5.17/0.5.18 have no such flag: argparse itself refuses it
        _fails(capsys, tiny_model, *ENABLE, "--hicache-host-memory-mode", "buffer_only")
        return
    err = _fails(capsys, tiny_model, *ENABLE, "--hicache-host-memory-mode", "buffer_only",
                 "--hicache-storage-backend", "file")
    assert "--hicache-host-memory-mode buffer_only is not supported" in err and "Traceback" not in err


def test_table_calibrated_with_other_flags_is_refused(kvtq_hooks, tiny_model, capsys, tmp_path, mixed_table):
    """A table records the flags it was calibrated with; launching it with other flags is a one-line error."""
    from kvtuner_hicache.config import table_meta_line

    table = tmp_path / "calibrated.yaml"
    table.write_text(table_meta_line({"axis_key": 1, "axis_value": 0, "q_group_size": 64, "asym": True,
                                      "model": "Qwen/Qwen2.5-7B"}) + "\n" + mixed_table.read_text())
    err = _fails(capsys, tiny_model, *ENABLE, "--kvtuner-hicache-config", str(table), "--kvtuner-hicache-axis-key", "0")
    assert "calibrated with" in err and "--kvtuner-hicache-axis-key 1" in err and "Traceback" not in err
    _parse(tiny_model, *ENABLE, "--kvtuner-hicache-config", str(table))  # the recorded flags: accepted
    assert _cfg().layer_bits is not None
