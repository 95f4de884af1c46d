"""The elastic host pool (--kvtuner-hicache-elastic) through the real SGLang classes of the installed release:
flag to pool, byte accounting, demotion before eviction, top/floor accuracy, L3 pages, refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kvtuner_hicache.config import ConfigError, QuantConfig
from kvtuner_hicache.quant.reference import from_groups, quantize_groups, to_groups
from kvtuner_hicache.sglang_ext import args as kargs
from kvtuner_hicache.sglang_ext.elastic_pool import ElasticMHATokenToKVPoolHost
from l3_rig import file_proxy, get, put
from sglang_env import PS, device_streams, kv_host_pool, resolved_server_args, tree_cache
from sglang_pools import mha_device_pool, mla_device_pool, quant_host_pool

pytestmark = pytest.mark.sglang
ELASTIC = ["--enable-hierarchical-cache", "--enable-kvtuner-hicache", "--page-size", str(PS), "--kvtuner-hicache-elastic"]
EL = QuantConfig(elastic=True)


def _load(pool, dev, h, dst) -> list[list[torch.Tensor]]:
    for layer in range(dev.layer_num):
        pool.load_to_device_per_layer(dev, h, dst, layer, "kernel")
    return [[b[dst].float() for b in s] for s in device_streams(dev)]


def _top_bound(x: torch.Tensor, loaded: torch.Tensor, spec) -> torch.Tensor:
    """Per element: s / 2^(b+1) (the embedded b+b decode of a b-bit floor chunk) + bf16 rounding of the
    loaded value."""
    shape = (x.shape[0] // PS, PS, spec.heads, spec.dim)
    g = to_groups(x.reshape(shape), spec.axis, spec.group)
    _, scale, _ = quantize_groups(g, spec.bits, True)
    bound = from_groups((scale.float() / 2 ** (spec.bits + 1)).unsqueeze(-1).expand(g.shape), spec.axis, shape)
    bound = bound.reshape(x.shape)
    return bound * 1.0001 + loaded.float().abs() * 2.0**-8 + 1e-6


def test_flag_reaches_the_tree_cache_and_controller_loads_at_the_top(kvtq_hooks, tiny_model):
    sa = resolved_server_args(tiny_model, *ELASTIC)
    assert kargs.config_from_env().elastic is True
    kv = mha_device_pool(2, 4, 128, PS, tokens=1024)
    cache, alloc = tree_cache(kv, sa)
    host = kv_host_pool(cache)
    assert isinstance(host, ElasticMHATokenToKVPoolHost)
    cc = cache.cache_controller
    src = alloc.alloc(3 * PS)
    want = [[b[src].float() for b in s] for s in device_streams(kv)]
    h = cc.write(src)
    dst = cc.load(h)
    cc.start_loading()
    got = [[b[dst].float() for b in s] for s in device_streams(kv)]
    for s, stream in enumerate(host.page_layout.streams):
        for layer in range(kv.layer_num):
            x = want[stream.buffer][layer]
            y = got[stream.buffer][layer]
            assert ((y - x).abs() <= _top_bound(x, y, host.page_layout.chunk(s, layer))).all()
    assert host.elastic_stats()["served_tokens_by_bits"] == {"8": 3 * PS}


def test_capacity_is_the_fixed_floor_pools_and_pages_are_demoted_before_sglang_sees_it_full():
    dev = mha_device_pool(2, 2, 64, PS, tokens=16 * PS)
    fixed = quant_host_pool(dev, QuantConfig(), ratio=2.0)
    pool = quant_host_pool(dev, EL, ratio=2.0)
    assert (pool.page_num, pool.size, pool.size_per_token) == (fixed.page_num, fixed.size, fixed.size_per_token)
    rows = torch.arange(PS, 2 * PS)
    pages = []
    while True:
        h = pool.alloc(PS)
        if h is None:
            break
        pool.backup_from_device_all_layer(dev, h, rows, "kernel")
        pages.append(int(h[0]) // PS)
        stats = pool.elastic_stats()
        assert sum(stats["pages_by_bits"].values()) == len(pages)
    # SGLang saw a full pool only once every page was at the floor, and it holds the fixed pool's page count
    assert len(pages) == fixed.page_num
    stats = pool.elastic_stats()
    assert stats["pages_by_bits"] == {"4": fixed.page_num} and stats["plane_rows"] == 0
    assert stats["demotions"]["k"] > 0 and stats["demotions"]["v"] >= stats["demotions"]["k"]


def test_oldest_pages_lose_precision_first_and_a_load_protects_a_page():
    dev = mha_device_pool(2, 2, 64, PS, tokens=16 * PS)
    pool = quant_host_pool(dev, EL, ratio=2.0)
    n_top = pool.page_num * 2 // 4  # all at the top: one page row + one row for its two planes
    rows = torch.arange(PS, 2 * PS)
    hs = []
    for _ in range(n_top):
        hs.append(pool.alloc(PS))
        pool.backup_from_device_all_layer(dev, hs[-1], rows, "kernel")
    assert pool.elastic_stats()["pages_by_bits"] == {"8": n_top}
    first = int(hs[0][0]) // PS
    _load(pool, dev, hs[0], torch.arange(3 * PS, 4 * PS))  # the oldest page is now the most recently used
    for _ in range(3):  # three more pages: someone must give up planes
        hs.append(pool.alloc(PS))
        pool.backup_from_device_all_layer(dev, hs[-1], rows, "kernel")
    label = {int(h[0]) // PS: pool.bits_label(int(h[0]) // PS) for h in hs}
    assert label[first] == "8"
    assert [label[int(h[0]) // PS] for h in hs[-3:]] == ["8"] * 3  # new pages enter at the top
    demoted = [p for p, b in label.items() if b != "8"]
    order = [int(h[0]) // PS for h in hs[1:]]
    assert demoted == order[: len(demoted)]  # the coldest ones, in order of their last use
    assert demoted and all(label[p] == "4" for p in demoted[:-1])  # a page gives V then K before the next one
    assert label[demoted[-1]] in ("4", "6")


@pytest.mark.parametrize("floor, mse_ratio, label", [
    (QuantConfig(), 50, "4"),  # 4 + 4: about 1/256 of the floor's MSE
    (QuantConfig(nbits_key=2, nbits_value=2), 10, "2"),  # 2 + 2: about 1/16
    (QuantConfig(nbits_key=4, nbits_value=2), 10, "3"),
])
def test_a_demoted_page_is_the_fixed_floor_page_bit_for_bit(floor, mse_ratio, label):
    dev = mha_device_pool(3, 2, 64, PS, tokens=16 * PS, seed=3)
    fixed = quant_host_pool(dev, floor, ratio=2.0)
    pool = quant_host_pool(dev, floor.with_(elastic=True), ratio=2.0)
    src = torch.arange(2 * PS, 5 * PS)
    hf, he = fixed.alloc(3 * PS), pool.alloc(3 * PS)
    fixed.backup_from_device_all_layer(dev, hf, src, "kernel")
    pool.backup_from_device_all_layer(dev, he, src, "kernel")
    for i in range(3):  # the page row is the fixed pool's page, header and all
        assert torch.equal(pool.get_data_page(he[i * PS]), fixed.get_data_page(hf[i * PS]))
    dst = torch.arange(8 * PS, 11 * PS)
    want_floor = _load(fixed, dev, hf, dst)
    top = _load(pool, dev, he, dst)
    for b in range(2):
        for layer in range(3):
            x = [dev.k_buffer, dev.v_buffer][b][layer][src].float()
            spec = pool.page_layout.chunk(b, layer)
            assert ((top[b][layer] - x).abs() <= _top_bound(x, top[b][layer], spec)).all()
            err_top, err_floor = (top[b][layer] - x).pow(2).mean(), (want_floor[b][layer] - x).pow(2).mean()
            assert err_top * mse_ratio < err_floor
    assert pool.alloc(pool.available_size()) is not None  # every plane row taken back
    assert pool.elastic_stats()["pages_by_bits"] == {label: pool.page_num}
    floor_loaded = _load(pool, dev, he, dst)
    for b in range(2):
        for layer in range(3):
            assert torch.equal(floor_loaded[b][layer], want_floor[b][layer])


def test_values_step_down_before_keys():
    dev = mha_device_pool(2, 2, 64, PS, tokens=16 * PS)
    pool = quant_host_pool(dev, EL, ratio=2.0)
    h = pool.alloc(2 * PS)
    pool.backup_from_device_all_layer(dev, h, torch.arange(2 * PS), "kernel")
    p0 = int(h[0]) // PS
    pool.planes.demote_coldest()
    assert pool.bits_label(p0) == "6" and pool.planes.streams_of(p0) == (0,)  # keys kept
    dst = torch.arange(4 * PS, 6 * PS)
    got = _load(pool, dev, h, dst)
    k_err = (got[0][0][:PS] - dev.k_buffer[0][:PS].float()).abs().max()
    v_err = (got[1][0][:PS] - dev.v_buffer[0][:PS].float()).abs().max()
    assert v_err > 4 * k_err  # V at 4 bits, K still at 8
    assert pool.elastic_stats()["served_tokens_by_bits"] == {"6": PS, "8": PS}


def test_per_layer_table_refines_its_2_and_4_bit_layers_only(mixed_table):
    from kvtuner_hicache.config import load_layer_bits

    table = load_layer_bits(str(mixed_table))
    dev = mha_device_pool(28, 2, 64, PS, tokens=8 * PS)
    pool = quant_host_pool(dev, QuantConfig(layer_bits=table, elastic=True), ratio=2.0)
    rl = pool.refinement
    for s, key in ((0, "key"), (1, "value")):
        want = [layer for layer in range(28) if getattr(table[layer], key) in (2, 4)]
        assert [c.layer for c in rl.chunks.get(s, [])] == want
    h = pool.alloc(PS)
    pool.backup_from_device_all_layer(dev, h, torch.arange(PS), "kernel")
    dst = torch.arange(4 * PS, 5 * PS)
    got = _load(pool, dev, h, dst)
    fixed = quant_host_pool(dev, QuantConfig(layer_bits=table), ratio=2.0)
    hf = fixed.alloc(PS)
    fixed.backup_from_device_all_layer(dev, hf, torch.arange(PS), "kernel")
    ref = _load(fixed, dev, hf, dst)
    for s, key in ((0, "key"), (1, "value")):
        for layer in range(28):
            if getattr(table[layer], key) == 8:  # 8-bit chunks have no plane: exactly the fixed page's decode
                assert torch.equal(got[s][layer], ref[s][layer]), (s, layer)


def test_l3_holds_floor_pages_that_fixed_pools_read_too(tmp_path):
    dev = mha_device_pool(2, 4, 128, PS, tokens=8 * PS, seed=5)
    pool = quant_host_pool(dev, EL, ratio=2.0)
    h = pool.alloc(2 * PS)
    pool.backup_from_device_all_layer(dev, h, torch.arange(PS, 3 * PS), "kernel")
    proxy = file_proxy(pool, tmp_path)
    assert put(proxy, pool, h, ["a", "b"])
    # a fresh elastic pool reads them back: they enter at the floor, bit for bit the fixed page
    reader = quant_host_pool(dev, EL, ratio=2.0)
    got = get(file_proxy(reader, tmp_path), reader, ["a", "b"])
    assert all(g is not None for g in got)
    h2 = reader.alloc(2 * PS)
    for i, page in enumerate(got):
        reader.set_from_flat_data_page(int(h2[i * PS]), page)
        assert reader.bits_label(int(h2[i * PS]) // PS) == "4"
    fixed = quant_host_pool(dev, QuantConfig(), ratio=2.0)
    got_fixed = get(file_proxy(fixed, tmp_path), fixed, ["a", "b"])
    for i in range(2):
        assert got_fixed[i] is not None and torch.equal(got_fixed[i], pool.get_data_page(h[i * PS]))
        assert torch.equal(reader.get_data_page(h2[i * PS]), pool.get_data_page(h[i * PS]))


def test_freed_pages_give_their_planes_back_and_count_as_evictions():
    dev = mha_device_pool(2, 2, 64, PS, tokens=8 * PS)
    pool = quant_host_pool(dev, EL, ratio=2.0)
    free0 = pool.available_size()
    h = pool.alloc(3 * PS)
    pool.backup_from_device_all_layer(dev, h, torch.arange(3 * PS), "kernel")
    assert pool.available_size() == free0 - 3 * PS  # plane rows count as free for SGLang
    assert pool.planes.host_rows > 0
    pool.free(h)
    assert pool.planes.host_rows == 0 and pool.available_size() == free0
    assert pool.elastic_stats()["evicted_pages"] == 3


def test_refusals_name_the_flag():
    with pytest.raises(ConfigError, match="supports MHA/GQA models only"):
        quant_host_pool(mla_device_pool(2, PS, tokens=4 * PS), QuantConfig(nbits_key=8, elastic=True))
    sa = SimpleNamespace(enable_hierarchical_cache=True, device="npu", model_path="")
    with pytest.raises(ConfigError, match="--kvtuner-hicache-elastic runs on --device cuda .* this server has --device npu"):
        kargs.validate_server_args(sa, EL)
    for device in ("cpu", "cuda"):
        kargs.validate_server_args(SimpleNamespace(enable_hierarchical_cache=True, device=device, model_path=""), EL)


def test_the_accuracy_harness_top_roundtrip_is_the_pools_top_load():
    """eval's `NAME+e` configs (quant/elastic_pages.roundtrip_top) reconstruct exactly what the pool loads."""
    from kvtuner_hicache.quant.elastic_pages import roundtrip_top

    dev = mha_device_pool(3, 2, 64, PS, tokens=8 * PS, seed=9)
    pool = quant_host_pool(dev, EL, ratio=2.0)
    src = torch.arange(PS, 4 * PS)
    h = pool.alloc(3 * PS)
    pool.backup_from_device_all_layer(dev, h, src, "kernel")
    got = _load(pool, dev, h, torch.arange(4 * PS, 7 * PS))
    want = roundtrip_top(pool.page_layout, [[b[src] for b in s] for s in device_streams(dev)])
    for b in range(2):
        for layer in range(3):
            assert torch.equal(got[b][layer], want[b][layer].float()), (b, layer)


def test_eval_config_names_for_elastic_pages():
    from kvtuner_hicache.config import KVShape
    from kvtuner_hicache.eval.configs import ConfigContext, parse_config

    ctx = ConfigContext(KVShape.mha(2, 2, 64, 64), PS)
    cfg = parse_config("K4cV4t-a-g64+e", ctx)
    assert cfg.quant.elastic and cfg.quant.with_(elastic=False) == parse_config("K4cV4t-a-g64", ctx).quant
    from kvtuner_hicache.eval.report import sizes

    shape = ctx.shape
    top, kv8 = (sizes(c, c.layout(shape, PS), shape, PS, 4 * PS) for c in
                (cfg, parse_config("K8cV8t-a-g64", ctx)))
    assert top["effective_bits"] == pytest.approx(kv8["effective_bits"])  # planes counted: KV8's bytes
    with pytest.raises(ConfigError, match="needs a 2- or 4-bit floor"):
        parse_config("K8cV8t-a-g64+e", ctx)
    with pytest.raises(ConfigError, match="no residual window"):
        parse_config("K4cV4t-a-g64+r128+e", ctx)


def test_concurrent_allocations_never_give_a_load_another_pages_planes():
    """SGLang allocates from its prefetch thread while the scheduler backs up and loads: every loaded chunk
    must be exactly its own top decode or its own floor decode, never a mix with another page's plane.

    Every fourth iteration pauses the churn (at the top of its loop, holding nothing) and walks the three
    outcomes in order, so each is exercised whatever the thread scheduler does: two fresh pages load at
    the top; after one value plane of each is demoted, an allocation that needs one row pairs the two
    half-used rows (a key plane moves) and both pages still load their own keys at the top; after an
    allocation of everything available they load at the floor. The other iterations race the churn."""
    import random
    import sys
    import threading

    from kvtuner_hicache.quant.elastic_pages import roundtrip_top
    from kvtuner_hicache.quant.reference import roundtrip_pages

    dev = mha_device_pool(2, 2, 64, PS, tokens=16 * PS, seed=11)
    pool = quant_host_pool(dev, EL, ratio=0.6)
    srcs = [torch.arange(p * PS, (p + 1) * PS) for p in range(4)]
    ref = [(roundtrip_top(pool.page_layout, [[b[r] for b in s] for s in device_streams(dev)]),
            roundtrip_pages(pool.page_layout, [[b[r] for b in s] for s in device_streams(dev)])) for r in srcs]
    stop, go, idle, errors = threading.Event(), threading.Event(), threading.Event(), []
    go.set()

    def churn():
        rng = random.Random(0)
        while not stop.is_set():
            if not go.is_set():
                idle.set()
                go.wait(0.01)
                continue
            idle.clear()
            # most of the pool: planes must give way, some rows paired (a plane moved), some demoted
            need = pool.available_size() - pool.planes.host_rows * PS + rng.randint(1, 3) * PS
            h = pool.alloc(need) if need > 0 else None
            if h is not None:
                pool.free(h)

    def classify(i: int, h: torch.Tensor, j: int) -> tuple[set[str], set[str]]:
        """What each buffer (keys, values) of page `h` loaded as: {"top"}, {"floor"}; None marks a mix."""
        got = _load(pool, dev, h, torch.arange(12 * PS, 13 * PS))
        kinds = (set(), set())
        for b in range(2):
            for layer in range(2):
                top, floor = ref[j][0][b][layer].float(), ref[j][1][b][layer].float()
                which = "top" if torch.equal(got[b][layer], top) else "floor" if torch.equal(got[b][layer], floor) else None
                if which is None:
                    errors.append((i, b, layer))
                kinds[b].add(which)
        return kinds

    def backup(j: int) -> torch.Tensor:
        h = None
        while h is None:
            h = pool.alloc(PS)
        pool.backup_from_device_all_layer(dev, h, srcs[j], "kernel")
        held.append((h, j))
        return h

    def walk_outcomes(i: int) -> None:
        TOP, FLOOR = {"top"}, {"floor"}
        pool.free(pool.alloc(pool.available_size()))  # no planes left anywhere: a known start
        (a, ja), (b, jb) = [(backup(j), j) for j in (i % 4, (i + 1) % 4)]
        assert classify(i, a, ja) == (TOP, TOP) and classify(i, b, jb) == (TOP, TOP), i
        for page in (a, b):  # one value plane each: two half-used rows
            victim = pool.planes.demote_coldest()
            assert victim == (int(page[0]) // PS, 1), (i, victim)
            pool.planes.touch([victim[0]])
        moves, rows = pool.planes.stats.moves, pool.planes.host_rows
        pool.free(pool.alloc(pool.available_size() - (rows - 1) * PS))  # needs one row: pairing gives it
        assert pool.planes.stats.moves == moves + 1 and pool.planes.host_rows == rows - 1, i
        assert classify(i, a, ja) == (TOP, FLOOR) and classify(i, b, jb) == (TOP, FLOOR), i
        everything = pool.alloc(pool.available_size())
        assert everything is not None and pool.planes.host_rows == 0
        assert classify(i, a, ja) == (FLOOR, FLOOR) and classify(i, b, jb) == (FLOOR, FLOOR), i
        pool.free(everything)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    t = threading.Thread(target=churn)
    t.start()
    rng, held, walked = random.Random(1), [], 0
    try:
        for i in range(60):
            if i % 4 == 3:
                go.clear()
                idle.clear()
                assert idle.wait(10), "the churn thread did not pause"
                walk_outcomes(i)
                walked += 1
                go.set()
            else:
                backup(rng.randrange(4))
            for h2, j2 in held[-3:]:  # recent pages: some at the top, some demoted by the churn
                classify(i, h2, j2)
            while len(held) > 4:
                pool.free(held.pop(0)[0])
    finally:
        stop.set()
        go.set()
        t.join()
        sys.setswitchinterval(old)
    assert not errors
    assert walked == 15


def test_a_plane_moved_to_pair_rows_still_decodes_its_own_page():
    from kvtuner_hicache.quant.elastic_pages import roundtrip_top
    from kvtuner_hicache.quant.reference import roundtrip_pages

    dev = mha_device_pool(2, 2, 64, PS, tokens=8 * PS, seed=13)
    pool = quant_host_pool(dev, EL, ratio=2.0)
    h = pool.alloc(2 * PS)
    src = torch.arange(2 * PS, 4 * PS)
    pool.backup_from_device_all_layer(dev, h, src, "kernel")
    p0, p1 = int(h[0]) // PS, int(h[PS]) // PS
    assert pool.planes.demote_coldest() == (p0, 1)
    pool.planes.touch([p0])
    assert pool.planes.demote_coldest() == (p1, 1)  # two rows, each holding one K plane
    rows_before = pool.planes.host_rows
    assert pool.alloc(pool.available_size() - (rows_before - 1) * PS) is not None  # needs one row: pairing gives it
    assert pool.planes.stats.moves == 1 and pool.planes.host_rows == rows_before - 1
    assert pool.planes.stats.demotions == [0, 2]
    got = _load(pool, dev, h, torch.arange(5 * PS, 7 * PS))
    kv = [[b[src] for b in s] for s in device_streams(dev)]
    top, floor = roundtrip_top(pool.page_layout, kv), roundtrip_pages(pool.page_layout, kv)
    for layer in range(2):
        assert torch.equal(got[0][layer], top[0][layer].float())  # both pages' K planes, one of them moved
        assert torch.equal(got[1][layer], floor[1][layer].float())


def test_enable_metrics_exports_pages_demotions_evictions_and_hits(kvtq_hooks, tiny_model):
    from prometheus_client import REGISTRY

    sa = resolved_server_args(tiny_model, *ELASTIC, "--enable-metrics")
    kv = mha_device_pool(2, 2, 64, PS, tokens=16 * PS)
    cache, alloc = tree_cache(kv, sa)
    host = kv_host_pool(cache)
    assert host.metrics is not None

    def sample(name, **labels):
        return REGISTRY.get_sample_value(name, {"tp_rank": "0", **labels}) or 0.0

    before = {k: sample("sglang:kvtq_elastic_demotions_total", stream=k) for k in ("k", "v")}
    ev0, hit0 = sample("sglang:kvtq_elastic_evictions_total"), sample("sglang:kvtq_elastic_hit_tokens_total", bits="8")
    h = host.alloc(2 * PS)
    host.backup_from_device_all_layer(kv, h, torch.arange(2 * PS), "kernel")
    _load(host, kv, h, torch.arange(4 * PS, 6 * PS))
    assert sample("sglang:kvtq_elastic_pages", bits="8") == 2
    assert sample("sglang:kvtq_elastic_plane_rows") == host.planes.host_rows > 0
    assert sample("sglang:kvtq_elastic_hit_tokens_total", bits="8") - hit0 == 2 * PS
    rest = host.alloc(host.available_size())  # every plane goes
    assert sample("sglang:kvtq_elastic_pages", bits="8") == 0
    assert sample("sglang:kvtq_elastic_pages", bits="4") == host.page_num
    assert all(sample("sglang:kvtq_elastic_demotions_total", stream=k) - before[k] == 2 for k in ("k", "v"))
    host.free(rest)
    assert sample("sglang:kvtq_elastic_evictions_total") - ev0 == rest.numel() // PS


def test_no_metrics_without_the_flag(kvtq_hooks, tiny_model):
    sa = resolved_server_args(tiny_model, *ELASTIC)  # published: replaces any server with --enable-metrics
    cache, _ = tree_cache(mha_device_pool(2, 2, 64, PS, tokens=4 * PS), sa)
    assert kv_host_pool(cache).metrics is None


class _Event:
    """A CUDA event stand-in: pending until synchronize() (or `done`)."""

    made: list = []

    def __init__(self):
        self.done = self.waited = False
        _Event.made.append(self)

    def record(self, *a):
        pass

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = self.done = True


class _Stream:
    def __init__(self):
        self.waited_for: list = []

    def wait_event(self, ev):
        self.waited_for.append(ev)


@pytest.fixture
def fake_cuda_events(monkeypatch):
    _Event.made = []
    stream = _Stream()
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: stream)
    return stream


def test_the_cpu_touches_a_slot_only_after_the_kernels_that_used_it(fake_cuda_events):
    """On a GPU the codec reads and writes planes asynchronously. A row handed back to SGLang (or a plane
    moved) waits for the events of exactly the slots involved, and only while they are pending."""
    dev = mha_device_pool(2, 2, 64, PS, tokens=16 * PS, seed=3)
    pool = quant_host_pool(dev, EL, ratio=0.6)
    pool._cuda = True  # the fences as on CUDA; the reference codec still does the work
    h1 = pool.alloc(2 * PS)
    pool.backup_from_device_all_layer(dev, h1, torch.arange(2 * PS), "kernel")
    _load(pool, dev, h1, torch.arange(4 * PS, 6 * PS))
    old = list(_Event.made)
    assert len(old) == 3  # the backup's, the load's layer-0 and last-layer events
    for ev in old:
        ev.done = True  # long since run
    h2 = pool.alloc(PS)
    pool.backup_from_device_all_layer(dev, h2, torch.arange(2 * PS, 3 * PS), "kernel")
    new = [ev for ev in _Event.made if ev not in old]
    assert len(new) == 1 and not fake_cuda_events.waited_for  # fresh slots: no load to wait for
    everything = pool.alloc(pool.available_size())  # hands every plane row back to SGLang
    assert everything is not None and pool.planes.host_rows == 0
    assert new[0].waited and not any(ev.waited for ev in old)  # waited for the pending backup only


def test_a_backup_that_takes_a_slot_a_queued_load_reads_waits_for_it_on_the_gpu(fake_cuda_events):
    dev = mha_device_pool(2, 2, 64, PS, tokens=16 * PS, seed=4)
    pool = quant_host_pool(dev, EL, ratio=0.6)
    pool._cuda = True
    h1 = pool.alloc(PS)
    pool.backup_from_device_all_layer(dev, h1, torch.arange(PS), "kernel")
    _load(pool, dev, h1, torch.arange(4 * PS, 5 * PS))  # queued: its events stay pending
    reads = [ev for ev in _Event.made[1:]]
    rest = pool.alloc(pool.available_size() - pool.planes.host_rows * PS)  # every free row, no plane given up
    assert rest is not None and pool.planes.planes == 2
    h2 = rest[:PS]
    pool.backup_from_device_all_layer(dev, h2, torch.arange(PS, 2 * PS), "kernel")  # takes h1's planes
    assert pool.planes.streams_of(int(h1[0]) // PS) == () and pool.planes.streams_of(int(h2[0]) // PS)
    assert fake_cuda_events.waited_for and set(map(id, fake_cuda_events.waited_for)) <= set(map(id, reads))
    assert not any(ev.waited for ev in _Event.made)  # on the GPU: the host did not wait
