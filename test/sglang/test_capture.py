"""The debug capture codec (KVTQ_CAPTURE_DIR) wrapping a real pool's codec, and benchmark/check_capture.py, on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from kvtuner_hicache.config import QuantConfig
from kvtuner_hicache.quant import capture
from sglang_pools import mha_device_pool, quant_host_pool

pytestmark = pytest.mark.sglang

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))
import check_capture  # noqa: E402

PS = 64


def _pages(pages: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in pages])


def _load(host, dev, h, dst):
    for layer in range(dev.layer_num):
        host.load_to_device_per_layer(dev, h, dst, layer, "kernel")


def test_off_by_default(monkeypatch):
    monkeypatch.delenv(capture.ENV_DIR, raising=False)
    host = quant_host_pool(mha_device_pool(2, 4, 128, PS, tokens=8 * PS))
    assert not isinstance(host.codec, capture.CapturingCodec)


@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(nbits_key=8, nbits_value=4), QuantConfig(nbits_key=8, nbits_value=8)],
                         ids=lambda c: c.short_name())
def test_capture_l2_and_l3_paths_check_bit_exact(tmp_path, monkeypatch, cfg):
    monkeypatch.setenv(capture.ENV_DIR, str(tmp_path))
    dev = mha_device_pool(3, 4, 128, PS, tokens=16 * PS)
    host = quant_host_pool(dev, cfg)
    assert isinstance(host.codec, capture.CapturingCodec)
    # warm-up traffic while paused: nothing saved
    (tmp_path / capture.PAUSE_FILE).touch()
    h0 = host.alloc(PS)
    host.backup_from_device_all_layer(dev, h0, _pages([0]), "kernel")
    assert host.codec.n_backup == 0
    (tmp_path / capture.PAUSE_FILE).unlink()
    # two backups (one node each); the first page of each call is captured
    h1, h2 = host.alloc(2 * PS), host.alloc(2 * PS)
    host.backup_from_device_all_layer(dev, h1, _pages([5, 2]), "kernel")
    host.backup_from_device_all_layer(dev, h2, _pages([3, 9]), "kernel")
    assert host.codec.n_backup == 2
    # L2 -> L1: load node 1 into other device rows
    _load(host, dev, h1, _pages([12, 1]))
    # L3 -> L2 -> L1: page of node 2 goes "to storage" and comes back into another host slot
    page = host.get_data_page(h2[0]).clone()
    h3 = host.alloc(PS)
    host.set_from_flat_data_page(int(h3[0]), page)
    _load(host, dev, h3, _pages([7]))
    res = check_capture.check([str(tmp_path)])
    assert len(res) == 1 and check_capture.passed(res[0]), res
    assert res[0]["l2"] == {"ok": 1, "bad": 0} and res[0]["l3"] == {"ok": 1, "bad": 0}
    assert res[0]["frac_elements_changed"] > 0  # quantization is lossy, and the check still holds
    assert check_capture.main([str(tmp_path)]) == 0


def test_overwritten_page_is_not_matched_and_corruption_is_caught(tmp_path, monkeypatch):
    monkeypatch.setenv(capture.ENV_DIR, str(tmp_path))
    dev = mha_device_pool(2, 4, 128, PS, tokens=16 * PS)
    host = quant_host_pool(dev)
    h = host.alloc(PS)
    host.backup_from_device_all_layer(dev, h, _pages([4]), "kernel")
    # the same host page is reused by another (uncaptured) backup: the capture must forget it
    host.backup_from_device_all_layer(dev, torch.cat([h, host.alloc(PS)]), _pages([6, 8]), "kernel")
    n_before = host.codec.n_load
    _load(host, dev, h[:PS], _pages([10]))
    # the reused page was captured again as the first page of the second call, so it matches that one
    assert host.codec.n_load == n_before + 1
    res = check_capture.check([str(tmp_path)])
    assert check_capture.passed(res[0]), res
    # flip one bit of the saved loaded rows: the checker must fail
    f = sorted((tmp_path).glob("pool_*/load_*.pt"))[0]
    ld = torch.load(f, weights_only=False)
    ld["rows"][0].view(torch.int16)[0, 0, 0, 0] ^= 1
    torch.save(ld, f)
    res = check_capture.check([str(tmp_path)])
    assert not check_capture.passed(res[0]) and res[0]["l2"]["bad"] == 1


def test_capture_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv(capture.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(capture.ENV_PAGES, "2")
    dev = mha_device_pool(2, 4, 128, PS, tokens=16 * PS)
    host = quant_host_pool(dev)
    for p in range(4):
        host.backup_from_device_all_layer(dev, host.alloc(PS), _pages([p]), "kernel")
    assert host.codec.n_backup == 2
    assert len([n for n in os.listdir(host.codec.dir) if n.startswith("backup_")]) == 2


def test_l2_loads_do_not_starve_l3_captures(tmp_path, monkeypatch):
    # regression (first real-server run): 16 L2 loads used the whole load budget, so no L3 load was checked
    monkeypatch.setenv(capture.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(capture.ENV_PAGES, "2")
    dev = mha_device_pool(2, 4, 128, PS, tokens=16 * PS)
    host = quant_host_pool(dev)
    h1, h2 = host.alloc(PS), host.alloc(PS)
    host.backup_from_device_all_layer(dev, h1, _pages([1]), "kernel")
    host.backup_from_device_all_layer(dev, h2, _pages([2]), "kernel")
    _load(host, dev, h1, _pages([10]))
    _load(host, dev, h2, _pages([11]))
    assert host.codec.n_loads == {"l2": 2, "l3": 0}
    h3 = host.alloc(PS)
    host.set_from_flat_data_page(int(h3[0]), host.get_data_page(h1[0]).clone())
    _load(host, dev, h3, _pages([12]))
    assert host.codec.n_loads == {"l2": 2, "l3": 1}
    res = check_capture.check([str(tmp_path)])
    assert check_capture.passed(res[0]) and res[0]["l2"]["ok"] == 2 and res[0]["l3"]["ok"] == 1
