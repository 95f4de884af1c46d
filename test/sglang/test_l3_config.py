"""Start-up checks of the L3 options (`storage_config_errors`) and the L3 plugin's backend mapping."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from kvtuner_hicache_l3.config_check import storage_config_errors
from kvtuner_hicache_l3.plugin import as_dynamic, extend_parser, startup_errors

pytestmark = pytest.mark.sglang
BACKENDS = ["file", "mooncake", "nixl", "hf3fs", "dynamic", "juicefs", "lmcache"]


def _args(backend, extra):
    return argparse.Namespace(hicache_storage_backend=backend, hicache_storage_backend_extra_config=extra)


BAD_VALUES = {
    "array": ("[1, 2]", "must be a JSON object"),
    "null": ("null", "got null"),
    "bare string": ('"abc"', "got a string"),
    "number": ("3", "got a number"),
    "invalid JSON": ("{mount_point: /mnt}", "is not valid JSON"),
    "truncated JSON": ('{"a": 1', "is not valid JSON"),
    "not JSON at all": ("/mnt/jfs", "is not valid JSON"),
    "deep nesting": ("[" * 100000 + "]" * 100000, "not valid JSON"),
    "wrong type": ('{"prefetch_threshold": "256"}', '"prefetch_threshold" must be an integer'),
    "bool as int": ('{"prefetch_threshold": true}', "must be an integer"),
    "pass prefix keys": ('{"hicache_storage_pass_prefix_keys": 1}', "must be a boolean"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_every_bad_value_is_one_line_naming_the_flag(backend, case):
    raw, expect = BAD_VALUES[case]
    errs = storage_config_errors(_args(backend, raw))
    # one line per problem (dynamic also lacks its three fields when the object parses)
    assert len(errs) == (2 if backend == "dynamic" and "must be a" in expect and "object" not in expect else 1), errs
    assert expect in errs[0], errs
    assert all("--hicache-storage-backend-extra-config" in e and "\n" not in e and len(e) < 300 for e in errs)


@pytest.mark.parametrize("raw", [None, "", "{}", '{"mount_point": "/mnt/jfs", "prefetch_threshold": 128}'])
def test_good_values_pass(raw):
    assert storage_config_errors(_args("file", raw)) == []


def test_config_files(tmp_path):
    good = {".json": '{"a": 1}', ".toml": "a = 1\n", ".yaml": "a: 1\n", ".yml": "a: 1\n"}
    for ext, text in good.items():
        (tmp_path / f"c{ext}").write_text(text)
        assert storage_config_errors(_args("file", f"@{tmp_path}/c{ext}")) == [], ext
    cases = {
        "@/nonexistent/x.json": "no such file",
        f"@{tmp_path}/c.ini": "unsupported config file type .ini",
        f"@{tmp_path}/list.yaml": "must be a JSON object",
        f"@{tmp_path}/bad.toml": "not valid TOML",
        f"@{tmp_path}/bad.json": "not valid JSON",
        f"@{tmp_path}": "unsupported config file type",
    }
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad.toml").write_text("a = = 1\n")
    (tmp_path / "bad.json").write_text("{")
    for raw, expect in cases.items():
        errs = storage_config_errors(_args("juicefs", raw))
        assert len(errs) == 1 and expect in errs[0] and "\n" not in errs[0], (raw, errs)


def test_dynamic_needs_its_fields_and_never_raises():
    assert "needs backend_name, module_path, class_name" in storage_config_errors(_args("dynamic", "{}"))[0]
    assert storage_config_errors(object()) == []  # no storage options at all
    assert storage_config_errors(_args("file", 42))[0].endswith("got a number")


def test_startup_errors_check_the_options_before_the_engines():
    assert startup_errors(_args("lmcache", "[1, 2]")) == storage_config_errors(_args("lmcache", "[1, 2]"))
    errs = startup_errors(_args("lmcache", "{}"))
    assert len(errs) == 1 and "needs a server" in errs[0]
    errs = startup_errors(_args("juicefs", '{"mount_point": "/nonexistent/jfs"}'))
    assert len(errs) == 1 and "does not exist" in errs[0]


def test_our_names_become_sglangs_dynamic_backend():
    from l3_rig import storage_config

    name, cfg = as_dynamic("juicefs", storage_config(extra={"mount_point": "/mnt/jfs"}))
    assert name == "dynamic"
    assert cfg.extra_config == {"mount_point": "/mnt/jfs", "backend_name": "juicefs",
                                "module_path": "kvtuner_hicache_l3.juicefs", "class_name": "JuiceFSStore"}
    assert as_dynamic("file", cfg) == ("file", cfg)


def test_factory_builds_our_store_through_the_public_dynamic_path(tmp_path):
    """No hook at all: SGLang's own `dynamic` backend builds our JuiceFS store (require_fuse off)."""
    from kvtuner_hicache_l3.juicefs import JuiceFSStore
    from l3_rig import storage_config
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    extra = {"backend_name": "juicefs", "module_path": "kvtuner_hicache_l3.juicefs", "class_name": "JuiceFSStore",
             "mount_point": str(tmp_path), "require_fuse": False}
    b = StorageBackendFactory.create_backend("dynamic", storage_config(extra=extra), None)
    while type(b).__name__ == "HiCacheStorageFailureInjector":
        b = b._backend
    assert isinstance(b, JuiceFSStore) and b.dir == str(tmp_path / "hicache")
    b.close()


def test_parser_gets_our_names_and_the_alias():
    p = argparse.ArgumentParser()
    p.add_argument("--hicache-storage-backend", choices=["file", "mooncake"])
    p.add_argument("--hicache-storage-backend-extra-config", default=None)
    extend_parser(p)
    extend_parser(p)  # idempotent
    ns = p.parse_args(["--hicache-storage-backend", "juicefs", "--hicache-storage-backend-config", "{}"])
    assert ns.hicache_storage_backend == "juicefs" and ns.hicache_storage_backend_extra_config == "{}"


def test_launch_server_rejects_bad_json_before_loading_the_model(tiny_model):
    """End to end, with the installed plugins: one line, naming the flag, no traceback."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", tiny_model, "--device", "cpu",
           "--enable-hierarchical-cache", "--hicache-storage-backend", "file",
           "--hicache-storage-backend-extra-config", "[1, 2]"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "--hicache-storage-backend-extra-config" in out and "must be a JSON object" in out, out[-3000:]
    assert "Load weight begin" not in out
    assert "Traceback" not in out, out[-3000:]
    print(json.dumps({"rc": r.returncode, "last_line": out.strip().splitlines()[-1]}))
