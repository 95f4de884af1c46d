"""Native CUDA codec vs the pure-torch reference: bit-exact page bytes (encode) and device rows (decode).

GPU tests are marked `gpu` (scripts/gpu_test.sh runs them on the GPU machine, from the installed kernel
wheel with nvcc off the PATH); they skip without CUDA and fail if CUDA is there but the kernels are not
installed. The reference runs on CPU copies of the same inputs, so the GPU result is compared with the
ground truth computed independently of CUDA. Loads go through NativeCodec.load_layer (the serving path),
backups through NativeCodec.backup; encode_pages is the module-level wrapper of the same operator.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from kvtuner_hicache.config import KVShape, LayerBits, QuantConfig, load_layer_bits
from kvtuner_hicache.page_format import PageLayout
from kvtuner_hicache.quant import dispatch, native, reference
from kvtuner_hicache.quant.codec import DeviceKV, NativeCodec

REPO = pathlib.Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
POISON = 0xA5
DEV = "cuda"  # a CPU dry run of these helpers (native patched to the reference) sets "cpu"


def to_dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEV)


def pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if DEV == "cuda" else t


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def nat():
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    if not native.available():
        pytest.fail(f"CUDA is available but the native kernels are not loaded: {native.unavailable_reason()}")
    return native


# ---- inputs ------------------------------------------------------------------------------------


def make_values(shape: tuple[int, ...], kind: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Float data like a KV cache: per-channel scales and offsets, outliers; `special` adds zeros, -0,
    constants, +-inf, NaN, huge and subnormal values."""
    rows, heads, dim = shape
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "const":
        return torch.full(shape, 0.75, dtype=dtype)
    if kind == "grid":  # coarse grid: many quotients land exactly on .5 (round-half-even ties)
        return (torch.randint(-8, 8, shape, generator=gen).float() * 0.125).to(dtype)
    scale = torch.exp(torch.randn(1, heads, dim, generator=gen))
    offset = torch.randn(1, heads, dim, generator=gen) * 2
    x = torch.randn(shape, generator=gen) * scale + offset
    out = torch.rand(shape, generator=gen)
    x = torch.where(out < 0.002, x * 60.0, x)  # outliers
    if kind == "special":
        u = torch.rand(shape, generator=gen)
        tiny = 1e-40 if dtype == torch.bfloat16 else 3e-7
        cases = [
            (0.00, 0.04, 0.0),
            (0.04, 0.08, -0.0),
            (0.08, 0.09, float("inf")),
            (0.09, 0.10, float("-inf")),
            (0.10, 0.11, float("nan")),
            (0.11, 0.12, 1e6),
            (0.12, 0.13, -1e6),
            (0.13, 0.15, tiny),
            (0.15, 0.17, -tiny),
        ]
        for lo, hi, v in cases:
            x = torch.where((u >= lo) & (u < hi), torch.full_like(x, v), x)
        x[rows // 3] = 3.0  # a constant token row
        x[:, 0, 5] = -2.5  # a constant channel
        x[rows // 2, :, :] = -0.0  # a row of negative zeros
    return x.to(dtype)


def make_pool(layout: PageLayout, rows: int, dtype: torch.dtype, kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    sh = layout.shape
    L = layout.num_layers
    if sh.is_mla:
        cpu = [[make_values((rows, 1, sh.kv_lora_rank + sh.qk_rope_head_dim), kind, dtype, gen) for _ in range(L)]]
    else:
        cpu = [[make_values((rows, sh.heads, sh.head_dim), kind, dtype, gen) for _ in range(L)],
               [make_values((rows, sh.heads, sh.v_head_dim), kind, dtype, gen) for _ in range(L)]]
    return [[to_dev(t) for t in per] for per in cpu], cpu


def page_rows(slots, ps: int) -> torch.Tensor:
    return torch.cat([torch.arange(s * ps, (s + 1) * ps) for s in slots]).to(torch.int64)


# ---- diagnostics ---------------------------------------------------------------------------------


def describe_page_diff(layout: PageLayout, got: torch.Tensor, ref: torch.Tensor, limit: int = 12) -> str:
    diff = (got != ref).nonzero().tolist()
    lines = [f"{len(diff)} differing bytes of {got.numel()} ({layout.describe()})"]
    regions: dict[tuple, int] = {}
    examples = []
    for p, off in diff:
        if off < 128:
            key = ("header",)
        else:
            key = None
            for (s, layer), c in layout.chunks.items():
                if c.offset <= off < c.offset + c.nbytes:
                    r = off - c.offset
                    ng2 = c.num_groups * 2
                    if r < c.codes_bytes:
                        name = "codes"
                    elif c.scale_offset <= r < c.scale_offset + ng2:
                        name = "scale"
                    elif c.asym and c.min_offset <= r < c.min_offset + ng2:
                        name = "min"
                    else:
                        name = "pad"
                    key = (f"s{s}", f"L{layer}", name, f"b{c.bits}", f"ax{c.axis}")
                    if len(examples) < limit:
                        where = ""
                        if name == "codes":
                            el = r * 8 // c.bits
                            w = c.heads * c.dim
                            where = f"token {el // w} col {el % w}"
                        elif name in ("scale", "min"):
                            where = f"group {(r - (c.scale_offset if name == 'scale' else c.min_offset)) // 2}"
                        examples.append(f"  page {p} {key} byte {r} ({where}): got {got[p, off].item():#04x} "
                                        f"want {ref[p, off].item():#04x}")
                    break
            key = key or ("outside",)
        regions[key] = regions.get(key, 0) + 1
    for k, v in sorted(regions.items(), key=lambda kv: -kv[1])[:16]:
        lines.append(f"  {v:7d} bytes in {k}")
    return "\n".join(lines + examples)


def assert_rows_equal(dev_bufs, cpu_bufs, what: str) -> None:
    for b, (dper, cper) in enumerate(zip(dev_bufs, cpu_bufs, strict=True)):
        for layer, (d, c) in enumerate(zip(dper, cper, strict=True)):
            g = d.cpu()
            gi, ci = g.view(torch.int16), c.view(torch.int16)
            if not torch.equal(gi, ci):
                bad = (gi != ci).nonzero()
                ex = [f"row {r} head {h} col {k}: got {g[r, h, k].item()!r} ({gi[r, h, k].item() & 0xffff:#06x}) "
                      f"want {c[r, h, k].item()!r} ({ci[r, h, k].item() & 0xffff:#06x})"
                      for r, h, k in bad[:8].tolist()]
                raise AssertionError(f"{what}: buffer {b} layer {layer}: {bad.shape[0]} elements differ\n  "
                                     + "\n  ".join(ex))


# ---- checks ----------------------------------------------------------------------------------------


def check_encode(layout: PageLayout, dev_bufs, cpu_bufs, tidx: torch.Tensor) -> torch.Tensor:
    """native encode into a poisoned GPU tensor == reference encode on CPU; returns the reference pages."""
    n = tidx.numel() // layout.page_size
    big = torch.full((n + 2, layout.page_bytes), POISON, dtype=torch.uint8, device=DEV)
    native.encode_pages(layout, dev_bufs, to_dev(tidx), big[1:n + 1])
    sync()
    ref = torch.empty(n, layout.page_bytes, dtype=torch.uint8)
    reference.encode_pages(layout, cpu_bufs, tidx, ref)
    got = big.cpu()
    assert (got[0] == POISON).all() and (got[-1] == POISON).all(), "encode wrote outside its pages"
    if not torch.equal(got[1:n + 1], ref):
        raise AssertionError("encode differs from the reference:\n" + describe_page_diff(layout, got[1:n + 1], ref))
    return ref


def check_decode(layout: PageLayout, host_pages_cpu: torch.Tensor, pages_for_kernel: torch.Tensor, page_ids: torch.Tensor,
                 tidx: torch.Tensor, rows: int, dtype: torch.dtype, seed: int, blocks=None, fuse_pages=None) -> None:
    """native decode (zero-copy from `pages_for_kernel`) == reference decode, whole buffers compared.
    fuse_pages=None: the codec's default (a small load decodes every layer in one launch); 0: per layer."""
    dev, cpu = make_pool(layout, rows, dtype, "normal", seed + 1000)  # poison: untouched rows must stay
    pid_dev, tidx_dev = to_dev(page_ids), to_dev(tidx)
    extra = {} if fuse_pages is None else {"fuse_pages": fuse_pages}
    codec = NativeCodec(layout, DeviceKV.from_lists(dev), pages_for_kernel, torch.device(DEV), staging_pages=1,
                        load_blocks=blocks, **extra)
    for layer in range(layout.num_layers):
        codec.load_layer(layer, pid_dev, tidx_dev)
        reference.decode_layer(layout, layer, host_pages_cpu, page_ids, [per[layer] for per in cpu], tidx)
    sync()
    codec.check()
    codec.shutdown()
    assert_rows_equal(dev, cpu, "decode")


def roundtrip_check(cfg: QuantConfig, shape: KVShape, ps: int, dtype=torch.bfloat16, kind="special", n_pages=3,
                    seed=0, blocks=None) -> PageLayout:
    layout = PageLayout(cfg, shape, ps)
    assert native.supports(layout) is None, native.supports(layout)
    slots_total = n_pages + 3
    rows = slots_total * ps + 5
    dev, cpu = make_pool(layout, rows, dtype, kind, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    slots = torch.randperm(slots_total, generator=gen)[:n_pages].tolist()  # non-contiguous device pages
    tidx = page_rows(slots, ps)
    ref = check_encode(layout, dev, cpu, tidx)
    # host pool with the pages at out-of-order slots
    num_host = n_pages + 4
    host_ids = torch.randperm(num_host, generator=gen)[:n_pages]
    host = torch.zeros(num_host, layout.page_bytes, dtype=torch.uint8)
    host[host_ids] = ref
    dslots = torch.randperm(slots_total, generator=gen)[:n_pages].tolist()
    hp = pin(host)
    for b in ([blocks] if blocks is not None else [None, 1]):  # default grid (small units) and 1 block (big units)
        for fuse in (None, 0):  # one launch for a small load, and the per-layer launches
            check_decode(layout, host, hp, host_ids, page_rows(dslots, ps), rows, dtype, seed, b, fuse)
    return layout


# ---- the library ----------------------------------------------------------------------------------


@gpu
def test_installed_wheel_and_exported_limits(nat):
    """The kernels come from the installed wheel (not a JIT build) unless KVTQ_JIT_BUILD is set, and the
    planner's limits are the library's own."""
    import shutil

    if os.environ.get(native.ENV_JIT, "") in ("", "0"):
        import kvtuner_hicache_kernel

        assert native.build_name().startswith(f"kvtuner-hicache-kernel {native.KERNEL_VERSION}")
        assert "sgl-kernel" not in str(kvtuner_hicache_kernel.LIBRARY), "loaded from the checkout, not the wheel"
        assert torch.ops.kvtq.abi_stamp().startswith(kvtuner_hicache_kernel.expected_stamp())
    if os.environ.get("KVTQ_EXPECT_NO_NVCC") == "1":
        assert shutil.which("nvcc") is None, "scripts/gpu_test.sh hides nvcc: the tests must run without it"
    lim = native.limits()
    lay = PageLayout(QuantConfig(), KVShape.mha(4, 4, 128), 64)
    plan = native.plan_for(lay)
    assert plan.reason is None
    assert plan.dec_desc[0].shape == (2, lim["decode_fields"])
    assert len(plan.chunk_rows[0]) == lim["chunk_fields"]
    big = PageLayout(QuantConfig(q_group_size=lim["enc_max_group_per_channel"] * 2, axis_key=1, axis_value=1),
                     KVShape.mha(1, 2, 128), lim["enc_max_group_per_channel"] * 2)
    assert native.supports(big) is not None


@gpu
def test_encode_spans_group_the_units_by_class(nat):
    """The unit table is ordered by (axis, bits) class and the spans tile it: one specialised launch each."""
    lay = PageLayout(_mixed_cfg("llama"), KVShape.mha(32, 8, 128), 64)
    plan = native.plan_for(lay)
    A, B, U, S = native.ROW_AXIS, native.ROW_BITS, native.ROW_UNITS, native.ROW_UNIT_START
    classes = sorted({(r[A], r[B]) for r in plan.chunk_rows})
    assert [(a, b) for _, _, a, b in plan.encode_spans] == classes
    start = 0
    for begin, units, axis, bits in plan.encode_spans:
        assert begin == start
        assert {(plan.chunk_rows[i][A], plan.chunk_rows[i][B]) for i in plan.unit_chunk[begin:begin + units]} == {(axis, bits)}
        start += units
    assert start == plan.units_per_page
    for i, r in enumerate(plan.chunk_rows):  # each chunk's units are contiguous from its unit_start
        assert plan.unit_chunk[r[S]:r[S] + r[U]] == [i] * r[U]


@gpu
@pytest.mark.parametrize("case", ["wrong-class", "gap"])
def test_encode_refuses_spans_that_do_not_match_the_units(nat, monkeypatch, case):
    """A span table that is not the plan's: a gap is refused on the host before anything is enqueued; a span
    whose class is not its units' writes nothing there and is reported (the kernel's class check)."""
    lay = PageLayout(QuantConfig(nbits_key=4, nbits_value=2, axis_key=1, axis_value=0), KVShape.mha(2, 2, 128), 64)
    plan = native.plan_for(lay)
    (b0, u0, a0, k0), (b1, u1, a1, k1) = plan.encode_spans
    bad = [(b0, u0, a1, k1), (b1, u1, a0, k0)] if case == "wrong-class" else [(b0, u0 - 1, a0, k0), (b1, u1, a1, k1)]
    monkeypatch.setattr(plan, "encode_spans", bad)
    gen = torch.Generator().manual_seed(5)
    bufs = [[make_values((128, 2, 128), "normal", torch.bfloat16, gen).cuda() for _ in range(2)] for _ in range(2)]
    out = torch.full((2, lay.page_bytes), POISON, dtype=torch.uint8, device="cuda")
    if case == "gap":
        with pytest.raises(RuntimeError, match="bad encode span|encode spans cover"):
            native.encode_pages(lay, bufs, torch.arange(128, device="cuda"), out)
        return
    native.encode_pages(lay, bufs, torch.arange(128, device="cuda"), out)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="encode unit"):
        native._sink(torch.device("cuda", torch.cuda.current_device())).check()
    monkeypatch.undo()
    native.encode_pages(lay, bufs, torch.arange(128, device="cuda"), out)  # the context is intact
    want = torch.empty(2, lay.page_bytes, dtype=torch.uint8)
    reference.encode_pages(lay, [[t.cpu() for t in b] for b in bufs], torch.arange(128), want)
    assert torch.equal(out.cpu(), want)


# ---- GPU: the full config matrix --------------------------------------------------------------------

BITS = [(2, 2), (4, 4), (8, 8), (8, 4), (4, 2), (2, 8)]


@gpu
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("asym", [True, False], ids=["asym", "sym"])
@pytest.mark.parametrize("axes", [(1, 0), (0, 0), (1, 1), (0, 1)], ids=lambda a: f"axK{a[0]}V{a[1]}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"K{b[0]}V{b[1]}")
def test_config_matrix(nat, bits, axes, asym, group):
    cfg = QuantConfig(nbits_key=bits[0], nbits_value=bits[1], asym=asym, axis_key=axes[0], axis_value=axes[1],
                      q_group_size=group)
    ps = 128 if group == 128 else 64
    roundtrip_check(cfg, KVShape.mha(2, 4, 128), ps, seed=group + 17 * bits[0] + bits[1])


SHAPES = {
    "qwen2.5-7b": KVShape.mha(4, 4, 128),
    "llama-3.1-8b": KVShape.mha(3, 8, 128),
    "deepseek-mla": KVShape.mla(3, 512, 64),
    "kv-dims-differ": KVShape.mha(2, 2, 128, 64),
}


@gpu
@pytest.mark.parametrize("kind", ["normal", "special"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("ps", [16, 32, 64, 128])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_shapes_page_sizes_dtypes(nat, shape, ps, dtype, kind):
    g = min(64, ps)
    cfg = QuantConfig(nbits_key=8, nbits_value=4, axis_key=1, axis_value=0, q_group_size=g)
    roundtrip_check(cfg, SHAPES[shape], ps, dtype=dtype, kind=kind, n_pages=3, seed=ps)


@gpu
@pytest.mark.parametrize("kind", ["zeros", "const", "grid", "special"])
@pytest.mark.parametrize("asym", [True, False], ids=["asym", "sym"])
def test_degenerate_inputs(nat, kind, asym):
    for bits in (2, 4, 8):
        cfg = QuantConfig(nbits_key=bits, nbits_value=bits, asym=asym)
        roundtrip_check(cfg, KVShape.mha(2, 4, 128), 64, kind=kind, seed=bits)


@gpu
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("group", [2, 4, 8, 16])
def test_small_groups(nat, group, axis):
    cfg = QuantConfig(nbits_key=4, nbits_value=2, axis_key=axis, axis_value=axis, q_group_size=group)
    roundtrip_check(cfg, KVShape.mha(2, 2, 64), 64, seed=group)


@gpu
@pytest.mark.parametrize("case", ["ax0-g256", "ax0-g512", "ax0-g1024", "ax1-g256", "ax1-g512"])
def test_large_groups(nat, case):
    axis, g = int(case[2]), int(case.split("-g")[1])
    if axis == 0:
        shape, ps = KVShape.mha(1, 2 if g == 256 else 1, g), 16
    else:
        shape, ps = KVShape.mha(1, 2, 128), g
    cfg = QuantConfig(nbits_key=4, nbits_value=8, axis_key=axis, axis_value=axis, q_group_size=g)
    roundtrip_check(cfg, shape, ps, n_pages=2, seed=g)


def _mixed_cfg(model: str) -> QuantConfig:
    """Per-layer tables the repository ships (a fresh clone and the GPU machine skip nothing): the 28-layer test
    table for the Qwen2.5-7B depth, and a 32-layer table cycling every bit pair for the Llama-3.1-8B depth."""
    if model == "qwen":
        return QuantConfig(layer_bits=load_layer_bits(REPO / "test" / "data" / "mixed_28_layers.yaml"), axis_key=1,
                           axis_value=0)
    pairs = [(k, v) for k in (8, 4, 3, 2) for v in (8, 4, 3, 2)]  # every bit pair: 8 encode classes
    table = {layer: LayerBits(*pairs[layer % len(pairs)]) for layer in range(32)}
    return QuantConfig(layer_bits=table, axis_key=1, axis_value=0)


@gpu
@pytest.mark.parametrize("asym", [True, False], ids=["asym", "sym"])
@pytest.mark.parametrize("model", ["qwen", "llama"])
def test_mixed_presets(nat, model, asym):
    shape = KVShape.mha(28, 4, 128) if model == "qwen" else KVShape.mha(32, 8, 128)
    lay = roundtrip_check(_mixed_cfg(model).with_(asym=asym), shape, 64, n_pages=2, seed=3)
    assert len({lay.chunk(0, i).bits for i in range(lay.num_layers)}) > 1, "the table should mix bit widths"


# ---- GPU: index patterns, memory kinds, grid sizes ----------------------------------------------------


@gpu
@pytest.mark.parametrize("n_pages", [1, 2, 17, 96])
def test_page_counts(nat, n_pages):
    cfg = QuantConfig(nbits_key=4, nbits_value=4)
    roundtrip_check(cfg, KVShape.mha(2, 4, 128), 64, kind="normal", n_pages=n_pages, seed=n_pages)


@gpu
@pytest.mark.parametrize("fused_blocks", [1, 2, 8, 0])
@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed"])
def test_one_launch_load(nat, mixed, fused_blocks):
    """A load of <= fuse_pages pages decodes every layer on the layer-0 call, bit-exact, with layers of
    different precision (different units per page) and any grid share; the calls for layers 1..L-1 of
    the same index tensors enqueue nothing, other index tensors decode their layer."""
    table = {i: LayerBits(k, v) for i, (k, v) in enumerate([(8, 4), (2, 2), (4, 8), (4, 4)])}
    cfg = (QuantConfig(layer_bits=table, axis_key=1, axis_value=0, q_group_size=32)
           if mixed else QuantConfig(nbits_key=4, nbits_value=4, q_group_size=32))
    layout = PageLayout(cfg, KVShape.mha(4, 4, 128), 32)
    ps, n = layout.page_size, 5
    dev, cpu = make_pool(layout, 12 * ps, torch.bfloat16, "normal", 3)
    host = torch.zeros(n + 3, layout.page_bytes, dtype=torch.uint8)
    ids = torch.tensor([6, 0, 3, 1, 7])
    ref_pages = torch.empty(n, layout.page_bytes, dtype=torch.uint8)
    reference.encode_pages(layout, cpu, page_rows([0, 1, 2, 3, 4], ps), ref_pages)
    host[ids] = ref_pages
    hp = pin(host)
    codec = NativeCodec(layout, DeviceKV.from_lists(dev), hp, torch.device(DEV), staging_pages=1,
                        fused_blocks_per_layer=fused_blocks)
    assert codec.fuse_pages >= n
    drows = page_rows([9, 5, 11, 6, 10], ps)
    pid, tid = to_dev(ids), to_dev(drows)
    want = [[t.clone() for t in per] for per in cpu]
    codec.load_layer(0, pid, tid)
    sync()
    for layer in range(layout.num_layers):
        reference.decode_layer(layout, layer, host, ids, [per[layer] for per in want], drows)
    assert_rows_equal(dev, want, "one-launch load after the layer-0 call")
    for per in dev:  # the later calls of this load must not write again
        for t in per:
            t[drows.to(DEV)] = 0
    for layer in range(1, layout.num_layers):
        codec.load_layer(layer, pid, tid)
    sync()
    assert all(int(t[drows.to(DEV)].abs().sum()) == 0 for per in dev for t in per)
    # a call of another load for layer 2 only decodes layer 2
    pid2, tid2 = to_dev(ids[:2]), to_dev(drows[: 2 * ps])
    codec.load_layer(2, pid2, tid2)
    sync()
    got = [[t.cpu() for t in per] for per in dev]
    for b, per in enumerate(got):
        for layer, t in enumerate(per):
            rows_written = int((t[drows[: 2 * ps]].abs().sum(dim=(1, 2)) != 0).sum())
            assert rows_written == (2 * ps if layer == 2 else 0), (b, layer, rows_written)
    codec.check()
    codec.shutdown()


@gpu
def test_one_launch_load_bad_index_raises(nat):
    layout, dev, cpu, rows, host, codec, _ = _codec_setup(seed=57)
    ps = layout.page_size
    assert codec.fuse_pages > 0
    codec.load_layer(0, to_dev(torch.tensor([0, 9_000_000])), to_dev(page_rows([0, 1], ps)))
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="host page id 9000000"):
        codec.check()
    _assert_codec_roundtrip(layout, dev, cpu, rows, host, codec, 57)
    codec.shutdown()


@gpu
@pytest.mark.parametrize("blocks", [1, 3, 0, None])
def test_load_grid_sizes(nat, blocks):
    cfg = QuantConfig(nbits_key=8, nbits_value=2)
    roundtrip_check(cfg, KVShape.mha(2, 8, 128), 64, n_pages=9, seed=5, blocks=blocks)


def _layout_and_pages(seed=11, n=6, ps=32, shape=None, cfg=None):
    cfg = cfg or QuantConfig(nbits_key=4, nbits_value=2, q_group_size=32)
    layout = PageLayout(cfg, shape or KVShape.mha(3, 4, 128), ps)
    rows = (n + 4) * ps
    dev, cpu = make_pool(layout, rows, torch.bfloat16, "special", seed)
    return layout, dev, cpu, rows


@gpu
def test_arbitrary_token_rows(nat):
    """token_index need not be page-aligned runs: any distinct device rows work both ways."""
    layout, dev, cpu, rows = _layout_and_pages()
    gen = torch.Generator().manual_seed(1)
    n = 5
    tidx = torch.randperm(rows, generator=gen)[: n * layout.page_size]
    ref = check_encode(layout, dev, cpu, tidx)
    ids = torch.tensor([4, 0, 3, 1, 2])
    host = torch.zeros(n, layout.page_bytes, dtype=torch.uint8)
    host[ids] = ref
    tidx2 = torch.randperm(rows, generator=gen)[: n * layout.page_size]
    check_decode(layout, host, pin(host), ids, tidx2, rows, torch.bfloat16, 1)


@gpu
@pytest.mark.parametrize("memory", ["pinned-slice", "pinned-strided", "host-registered", "device"])
def test_page_memory_kinds(nat, memory):
    """Pages read zero-copy through their mapped device address (interior pointers, strided rows,
    cudaHostRegister'd memory) or straight from device memory."""
    layout, dev, cpu, rows = _layout_and_pages(seed=12)
    ps, pb = layout.page_size, layout.page_bytes
    tidx = page_rows([5, 1, 3, 0], ps)
    ref = check_encode(layout, dev, cpu, tidx)
    ids = torch.tensor([2, 5, 0, 3])
    host = torch.zeros(6, pb, dtype=torch.uint8)
    host[ids] = ref
    keep = None
    if memory == "pinned-slice":
        big = torch.zeros(7, pb, dtype=torch.uint8).pin_memory()
        big[1:] = host
        pages = big[1:]
    elif memory == "pinned-strided":
        big = torch.zeros(6, pb + 384, dtype=torch.uint8).pin_memory()
        big[:, :pb] = host
        pages = big[:, :pb]
    elif memory == "host-registered":
        pages = host.clone()
        rc = torch.cuda.cudart().cudaHostRegister(pages.data_ptr(), pages.numel(), 0)
        assert int(rc) == 0, f"cudaHostRegister failed: {rc}"
        keep = pages
    else:
        pages = host.cuda()
    try:
        check_decode(layout, host, pages, ids, page_rows([2, 0, 4, 1], ps), rows, torch.bfloat16, 12)
    finally:
        if keep is not None:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(keep.data_ptr())


@gpu
def test_pageable_pages_rejected(nat):
    layout, dev, cpu, rows = _layout_and_pages(seed=13)
    pages = torch.zeros(2, layout.page_bytes, dtype=torch.uint8)  # not pinned
    with pytest.raises(RuntimeError, match="pinned"):
        native.decode_layer(layout, 0, pages, torch.tensor([0], device=DEV),
                            [per[0] for per in dev], page_rows([0], layout.page_size).cuda())
    with pytest.raises(ValueError, match="pinned"):
        NativeCodec(layout, DeviceKV.from_lists(dev), pages, torch.device(DEV))


@gpu
@pytest.mark.parametrize("staging_pages", [1, 4, 16])
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_backup_to_host(nat, strided, staging_pages):
    layout, dev, cpu, rows = _layout_and_pages(seed=21, n=10)
    ps, pb = layout.page_size, layout.page_bytes
    slots = [9, 0, 3, 4, 5, 1, 7, 8, 2, 6]
    tidx = page_rows(slots, ps)
    ref = torch.empty(len(slots), pb, dtype=torch.uint8)
    reference.encode_pages(layout, cpu, tidx, ref)
    ids = torch.tensor([5, 6, 7, 0, 11, 2, 3, 4, 8, 1])  # runs and jumps
    extra = 256 if strided else 0
    host_buf = torch.full((12, pb + extra), POISON, dtype=torch.uint8).pin_memory()
    host = host_buf[:, :pb]
    staging_buf = torch.empty(staging_pages, pb + extra, dtype=torch.uint8, device=DEV)
    codec = NativeCodec(layout, DeviceKV.from_lists(dev), host, torch.device(DEV), staging=staging_buf[:, :pb])
    stream = torch.cuda.Stream()  # like SGLang's write stream
    with torch.cuda.stream(stream):
        codec.backup(ids, to_dev(tidx))
        done = torch.cuda.Event()
        done.record(stream)
    done.synchronize()  # an event on the caller's stream covers the side-stream copies
    for j, i in enumerate(ids.tolist()):
        if not torch.equal(host[i], ref[j]):
            raise AssertionError(f"host page {i} (source {j}):\n" + describe_page_diff(layout, host[i:i + 1], ref[j:j + 1]))
    untouched = sorted(set(range(12)) - set(ids.tolist()))
    assert (host_buf[untouched] == POISON).all()
    if strided:
        assert (host_buf[:, pb:] == POISON).all()
    codec.check()
    codec.shutdown()


@gpu
@pytest.mark.parametrize("direct,all_classes", [(0, 0), (16, 0), (0, 16), (16, 16), (2, 3)],
                         ids=["staged", "direct", "one-launch", "direct-one-launch", "direct2-one-launch3"])
@pytest.mark.parametrize("case", ["K4V2", "mixed-8-classes", "strided"])
def test_small_backups_direct_and_in_one_launch_equal_the_reference(nat, case, direct, all_classes):
    """Kernel 0.10.0: backups of <= direct_pages pages encode straight into their mapped host pages (one launch
    per run of host ids), and launches of <= all_classes_pages pages run every encode class at once. Either way
    each host page is the reference page byte for byte, and nothing else is written."""
    if case == "mixed-8-classes":
        layout, dev, cpu, rows = _layout_and_pages(seed=31, n=7, ps=64, shape=KVShape.mha(32, 8, 128),
                                                   cfg=_mixed_cfg("llama"))
        assert len({(c.axis, c.bits) for c in layout.chunks.values()}) == 8
    else:
        layout, dev, cpu, rows = _layout_and_pages(seed=31, n=7)
    ps, pb = layout.page_size, layout.page_bytes
    extra = 272 if case == "strided" else 0  # a 16-byte multiple: direct writes stay on
    num_host = 14
    host_buf = torch.full((num_host, pb + extra), POISON, dtype=torch.uint8).pin_memory()
    host = host_buf[:, :pb]
    codec = NativeCodec(layout, DeviceKV.from_lists(dev), host, torch.device(DEV), staging_pages=4,
                        direct_pages=direct, all_classes_pages=all_classes)
    assert codec.direct_pages == direct and codec.all_classes_pages == all_classes
    written: dict[int, torch.Tensor] = {}
    batches = [([3], [9]), ([5, 2], [4, 5]), ([0, 6, 1], [10, 11, 0]), ([4, 2, 6, 5, 0, 3, 1], [1, 2, 3, 7, 8, 12, 13])]
    stream = torch.cuda.Stream()  # like SGLang's write stream
    for slots, ids in batches:  # 1, 2, 3 and 7 pages: runs and jumps of host ids, above and below the limits
        tidx = page_rows(slots, ps)
        ref = torch.empty(len(slots), pb, dtype=torch.uint8)
        reference.encode_pages(layout, cpu, tidx, ref)
        with torch.cuda.stream(stream):
            codec.backup(torch.tensor(ids), to_dev(tidx))
        stream.synchronize()
        written.update({i: ref[j] for j, i in enumerate(ids)})
        for i, page in written.items():
            if not torch.equal(host[i], page):
                raise AssertionError(f"{len(ids)}-page backup, host page {i}:\n"
                                     + describe_page_diff(layout, host[i:i + 1], page[None]))
    untouched = sorted(set(range(num_host)) - set(written))
    assert (host_buf[untouched] == POISON).all()
    if extra:
        assert (host_buf[:, pb:] == POISON).all(), "a direct backup wrote into a row's padding"
    codec.check()
    codec.shutdown()


@gpu
def test_direct_backup_needs_16_byte_rows(nat):
    layout, dev, cpu, rows = _layout_and_pages(seed=32, n=2)
    host = torch.zeros(4, layout.page_bytes + 8, dtype=torch.uint8).pin_memory()[:, :layout.page_bytes]
    codec = NativeCodec(layout, DeviceKV.from_lists(dev), host, torch.device(DEV), direct_pages=8)
    assert codec.direct_pages == 0  # rows 8 bytes off 16-byte alignment: staged backups
    codec.shutdown()


@gpu
@pytest.mark.parametrize("n1,n2,staging_pages", [(100, 37, 32), (64, 9, 64), (3, 70, 8)])
def test_backups_back_to_back_cycle_the_staging_slots(nat, n1, n2, staging_pages):
    """Kernel 0.4.1 cuts a backup into chunks of ~n/16 pages that cycle through up to 16 staging slots;
    a second backup on another stream reuses slots the first one's copies may still read."""
    layout, dev, cpu, rows = _layout_and_pages(seed=23, n=n1 + n2)
    ps, pb = layout.page_size, layout.page_bytes
    gen = torch.Generator().manual_seed(5)
    src = torch.randperm(n1 + n2, generator=gen)
    ids = torch.randperm(n1 + n2 + 7, generator=gen)[: n1 + n2]
    ids[: n1 // 2] = torch.arange(n1 // 2) + 200  # a long run of consecutive host pages, then scattered ones
    host = torch.full((n1 + n2 + 207, pb), POISON, dtype=torch.uint8).pin_memory()
    ref = torch.empty(n1 + n2, pb, dtype=torch.uint8)
    reference.encode_pages(layout, cpu, page_rows(src.tolist(), ps), ref)
    codec = NativeCodec(layout, DeviceKV.from_lists(dev), host, torch.device(DEV), staging_pages=staging_pages)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s, part in zip(streams, (slice(0, n1), slice(n1, n1 + n2)), strict=True):
        with torch.cuda.stream(s):
            codec.backup(ids[part], to_dev(page_rows(src[part].tolist(), ps)))
    for s in streams:
        s.synchronize()
    for j, i in enumerate(ids.tolist()):
        if not torch.equal(host[i], ref[j]):
            raise AssertionError(f"host page {i} (source {j}):\n" + describe_page_diff(layout, host[i:i + 1], ref[j:j + 1]))
    untouched = sorted(set(range(host.shape[0])) - set(ids.tolist()))
    assert (host[untouched] == POISON).all()
    codec.check()
    codec.shutdown()


@gpu
def test_module_backup_wrapper(nat):
    layout, dev, cpu, rows = _layout_and_pages(seed=22, n=5)
    tidx = page_rows([4, 0, 2], layout.page_size)
    ref = torch.empty(3, layout.page_bytes, dtype=torch.uint8)
    reference.encode_pages(layout, cpu, tidx, ref)
    host = torch.zeros(4, layout.page_bytes, dtype=torch.uint8).pin_memory()
    staging = torch.empty(2, layout.page_bytes, dtype=torch.uint8, device=DEV)
    native.backup_to_host(layout, dev, to_dev(tidx), host, torch.tensor([3, 0, 1]), staging)
    sync()
    assert torch.equal(host[[3, 0, 1]], ref)


@gpu
def test_cpu_out_and_unsupported_layout(nat):
    """encode into a CPU `out`; a layout the kernels do not support is an error on CUDA (no silent
    reference fallback) unless the user opts in."""
    from kvtuner_hicache.quant.codec import NativeCodecUnavailable, ReferenceCodec, make_codec

    layout, dev, cpu, rows = _layout_and_pages(seed=31)
    tidx = page_rows([1, 2], layout.page_size)
    out = torch.empty(2, layout.page_bytes, dtype=torch.uint8)
    native.encode_pages(layout, dev, tidx, out)
    ref = torch.empty_like(out)
    reference.encode_pages(layout, cpu, tidx, ref)
    assert torch.equal(out, ref)
    odd = PageLayout(QuantConfig(q_group_size=32), KVShape.mha(1, 1, 96), 32)
    assert native.supports(odd) is not None
    d2, _ = make_pool(odd, 4 * 32, torch.bfloat16, "special", 3)
    host = torch.zeros(2, odd.page_bytes, dtype=torch.uint8).pin_memory()
    with pytest.raises(NativeCodecUnavailable, match="KVTQ_ALLOW_REFERENCE_CODEC"):
        make_codec(odd, d2, host, DEV, allow_reference=False)
    assert isinstance(make_codec(odd, d2, host, DEV, allow_reference=True), ReferenceCodec)


@gpu
@pytest.mark.parametrize("case", ["K3cV3t", "K3cV2t-sym", "K4tV3t-g4", "K3tV3c-g32", "K8cV3t-fp16"])
def test_three_bit_codes_run_natively(nat, case):
    """3-bit codes (eight in three bytes, kernel 0.7.0): the native codec serves them, bit for bit against the
    reference, through backup and load, symmetric and asymmetric, both axes, small groups, fp16."""
    from kvtuner_hicache.quant.codec import make_codec

    cfgs = {
        "K3cV3t": QuantConfig(nbits_key=3, nbits_value=3),
        "K3cV2t-sym": QuantConfig(nbits_key=3, nbits_value=2, asym=False),
        "K4tV3t-g4": QuantConfig(nbits_key=4, nbits_value=3, axis_key=0, axis_value=0, q_group_size=4),
        "K3tV3c-g32": QuantConfig(nbits_key=3, nbits_value=3, axis_key=0, axis_value=1, q_group_size=32),
        "K8cV3t-fp16": QuantConfig(nbits_key=8, nbits_value=3),
    }
    layout = PageLayout(cfgs[case], KVShape.mha(3, 4, 128), 64)
    assert native.supports(layout) is None
    d2, _ = make_pool(layout, 4 * 64, torch.bfloat16, "special", 4)
    host = torch.zeros(2, layout.page_bytes, dtype=torch.uint8).pin_memory()
    assert isinstance(make_codec(layout, d2, host, DEV, allow_reference=False), NativeCodec)
    dtype = torch.float16 if case.endswith("fp16") else torch.bfloat16
    for kind in ("normal", "special", "grid"):
        roundtrip_check(cfgs[case], KVShape.mha(3, 4, 128), 64, dtype=dtype, kind=kind, n_pages=3, seed=len(case))


@gpu
def test_reference_same_on_cuda_and_cpu(nat):
    """The ground truth itself must not depend on the device it runs on."""
    layout = PageLayout(QuantConfig(nbits_key=2, nbits_value=4, asym=False, axis_key=0), KVShape.mha(2, 4, 128), 64)
    dev, cpu = make_pool(layout, 4 * 64, torch.bfloat16, "special", 5)
    tidx = page_rows([2, 0], 64)
    a = torch.empty(2, layout.page_bytes, dtype=torch.uint8, device=DEV)
    reference.encode_pages(layout, dev, to_dev(tidx), a)
    b = torch.empty(2, layout.page_bytes, dtype=torch.uint8)
    reference.encode_pages(layout, cpu, tidx, b)
    if not torch.equal(a.cpu(), b):
        raise AssertionError("reference on CUDA != reference on CPU:\n" + describe_page_diff(layout, a.cpu(), b))


@gpu
def test_factory_and_dispatch_pick_native(nat):
    from kvtuner_hicache.quant.codec import make_codec

    assert dispatch.get_codec("cuda") is native
    assert dispatch.get_codec(torch.device("cuda", 0)) is native
    layout, dev, cpu, rows = _layout_and_pages(seed=41)
    host = torch.zeros(3, layout.page_bytes, dtype=torch.uint8).pin_memory()
    c = make_codec(layout, dev, host, DEV)
    assert isinstance(c, NativeCodec) and c.describe().startswith("native (")
    assert dispatch.codec_name(c) == c.describe()
    c.shutdown()


# ---- GPU: the per-pool codec: bad indices, replaced tensors, shutdown, graphs -------------------------


class _Owner:
    """Attribute-compatible with SGLang's MHATokenToKVPool as far as DeviceKV reads it."""

    def __init__(self, bufs):
        self.k_buffer, self.v_buffer = bufs
        self.rebuild_tables()

    def rebuild_tables(self):  # what SGLang's _init_data_ptrs_and_strides does
        self.k_data_ptrs = torch.tensor([t.data_ptr() for t in self.k_buffer], dtype=torch.uint64, device=DEV)
        self.v_data_ptrs = torch.tensor([t.data_ptr() for t in self.v_buffer], dtype=torch.uint64, device=DEV)


def _codec_setup(seed: int, n_host: int = 8, owner: bool = False):
    layout, dev, cpu, rows = _layout_and_pages(seed=seed, n=6)
    host = torch.zeros(n_host, layout.page_bytes, dtype=torch.uint8).pin_memory()
    src = _Owner(dev) if owner else DeviceKV.from_lists(dev)
    codec = NativeCodec(layout, src if isinstance(src, DeviceKV) else DeviceKV.from_sglang_pool(src), host,
                        torch.device(DEV), staging_pages=4)
    return layout, dev, cpu, rows, host, codec, src


def _assert_codec_roundtrip(layout, dev, cpu, rows, host, codec, seed):
    """A valid backup + load through `codec`, bit-exact against the reference (computed from what the
    device buffers hold now: a failed call may have written some rows before it met the bad index)."""
    sync()
    cpu = [[t.cpu() for t in per] for per in dev]
    ps = layout.page_size
    tidx = page_rows([3, 0, 5], ps)
    ids = torch.tensor([6, 1, 2])
    codec.backup(ids, to_dev(tidx))
    ref = torch.empty(3, layout.page_bytes, dtype=torch.uint8)
    reference.encode_pages(layout, cpu, tidx, ref)
    sync()
    assert torch.equal(host[ids], ref)
    drows = page_rows([1, 4, 2], ps)
    want = [[t.clone() for t in per] for per in cpu]
    for layer in range(layout.num_layers):
        codec.load_layer(layer, to_dev(ids), to_dev(drows))
        reference.decode_layer(layout, layer, host, ids, [per[layer] for per in want], drows)
    sync()
    codec.check()
    assert_rows_equal(dev, want, "load after the bad index")


@gpu
@pytest.mark.parametrize("case", ["load-page-id", "load-device-row", "backup-device-row", "backup-host-id",
                                  "load-negative-page-id"])
def test_out_of_range_index_raises_and_context_survives(nat, case):
    layout, dev, cpu, rows, host, codec, _ = _codec_setup(seed=51)
    ps = layout.page_size
    good_rows = to_dev(page_rows([0, 1], ps))
    good_ids = torch.tensor([0, 1])
    if case == "backup-host-id":  # ids on the host: checked before anything is enqueued
        with pytest.raises(IndexError, match="host page id 1000000"):
            codec.backup(torch.tensor([0, 1_000_000]), good_rows)
    else:
        if case == "load-page-id":
            codec.load_layer(1, to_dev(torch.tensor([0, 1_000_000])), good_rows)
        elif case == "load-negative-page-id":
            codec.load_layer(0, to_dev(torch.tensor([-3, 1])), good_rows)
        elif case == "load-device-row":
            bad = page_rows([0, 1], ps)
            bad[ps + 3] = rows + 10_000_000
            codec.load_layer(0, to_dev(good_ids), to_dev(bad))
        else:
            bad = page_rows([0, 1], ps)
            bad[5] = rows + 10_000_000
            codec.backup(good_ids, to_dev(bad))
        torch.cuda.synchronize()  # the kernel skipped the bad index: no illegal address
        what = "host page id" if "page-id" in case else "device row"
        with pytest.raises(IndexError, match=what):
            codec.check()
        codec.check()  # reported once
        if case == "load-page-id":  # the next call raises too when nobody called check()
            codec.load_layer(0, to_dev(torch.tensor([5_000_000])), to_dev(page_rows([0], ps)))
            torch.cuda.synchronize()
            with pytest.raises(IndexError, match="host page id 5000000"):
                codec.load_layer(1, to_dev(good_ids), good_rows)
    torch.cuda.synchronize()  # the CUDA context is intact
    _assert_codec_roundtrip(layout, dev, cpu, rows, host, codec, 51)
    codec.shutdown()


@gpu
@pytest.mark.parametrize("owner", [False, True], ids=["lists", "sglang-like-pool"])
def test_replaced_layer_tensor_is_used(nat, owner):
    """Replacing a layer's device tensor between calls (memory saver, VMM) is picked up: backup reads the
    new tensor (never a stale pointer) and load writes into it."""
    layout, dev, cpu, rows, host, codec, src = _codec_setup(seed=61, owner=owner)
    ps = layout.page_size
    tidx = page_rows([2], ps)
    codec.backup(torch.tensor([0]), to_dev(tidx))
    n0 = codec.pointer_rebuilds
    gen = torch.Generator().manual_seed(99)
    new_cpu = make_values(tuple(cpu[0][1].shape), "normal", torch.bfloat16, gen)
    cpu[0][1] = new_cpu
    dev[0][1] = to_dev(new_cpu)  # replace layer 1's K tensor in the owner's list
    if owner:
        src.rebuild_tables()  # as SGLang would; the stale-table case is covered below
    codec.backup(torch.tensor([1]), to_dev(tidx))
    sync()
    ref = torch.empty(1, layout.page_bytes, dtype=torch.uint8)
    reference.encode_pages(layout, cpu, tidx, ref)
    assert torch.equal(host[1], ref[0]), "backup read a stale layer tensor"
    assert not torch.equal(host[0], host[1])
    assert codec.pointer_rebuilds == n0 + 1
    # a replacement that the owner's table does not follow: the codec notices and uses its own table
    cpu[1][2] = make_values(tuple(cpu[1][2].shape), "normal", torch.bfloat16, gen)
    dev[1][2] = to_dev(cpu[1][2])
    codec.backup(torch.tensor([2]), to_dev(tidx))
    sync()
    reference.encode_pages(layout, cpu, tidx, ref)
    assert torch.equal(host[2], ref[0]), "backup used a stale pointer table"
    # load: writes into the tensor that is in the list now
    target = torch.zeros_like(dev[1][0])
    dev[1][0] = target
    drows = page_rows([4], ps)
    codec.load_layer(0, to_dev(torch.tensor([2])), to_dev(drows))
    sync()
    want = [cpu[0][0].clone(), torch.zeros_like(cpu[1][0])]
    reference.decode_layer(layout, 0, host, torch.tensor([2]), want, drows)
    assert torch.equal(target.cpu().view(torch.int16), want[1].view(torch.int16))
    assert codec.fuse_pages >= 1  # that load ran as one launch: its table followed the replacement
    # and the per-layer path does too
    target2 = torch.zeros_like(dev[0][2])
    dev[0][2] = target2
    codec.load_layer(2, to_dev(torch.tensor([2])), to_dev(drows))
    sync()
    want2 = [torch.zeros_like(cpu[0][2]), cpu[1][2].clone()]
    reference.decode_layer(layout, 2, host, torch.tensor([2]), want2, drows)
    assert torch.equal(target2.cpu().view(torch.int16), want2[0].view(torch.int16))
    codec.shutdown()


@gpu
def test_shutdown_drains_and_releases(nat):
    layout, dev, cpu, rows, host, codec, _ = _codec_setup(seed=71, n_host=24)
    ps = layout.page_size
    tidx = page_rows([0, 1, 2, 3, 4, 5] * 3, ps)
    ids = torch.arange(18)
    codec.backup(ids, to_dev(tidx))  # 18 pages through a 4-page staging area: the side stream is used
    side = codec._side
    assert side.live()
    codec.shutdown()  # no explicit sync before: shutdown drains
    assert not side.live()
    ref = torch.empty(18, layout.page_bytes, dtype=torch.uint8)
    reference.encode_pages(layout, cpu, tidx, ref)
    assert torch.equal(host[:18], ref)
    with pytest.raises(RuntimeError, match="shut down"):
        codec.backup(ids[:1], to_dev(tidx[:ps]))
    codec.shutdown()  # idempotent
    # a codec created afterwards works (its own stream)
    c2 = NativeCodec(layout, DeviceKV.from_lists(dev), host, torch.device(DEV), staging_pages=2)
    _assert_codec_roundtrip(layout, dev, cpu, rows, host, c2, 71)
    c2.shutdown()


@gpu
def test_load_layer_in_a_cuda_graph(nat):
    """The per-layer load is capturable: replaying the graph gives the reference rows."""
    layout, dev, cpu, rows, host, codec, _ = _codec_setup(seed=81)
    ps = layout.page_size
    tidx = page_rows([3, 1], ps)
    ids = torch.tensor([4, 0])
    codec.backup(ids, to_dev(tidx))
    sync()
    pid, drows = to_dev(ids), to_dev(page_rows([5, 2], ps))
    for per in dev:
        for t in per:
            t.zero_()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        codec.load_layer(0, pid, drows)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    for per in dev:
        for t in per:
            t.zero_()
    with torch.cuda.graph(g):
        for layer in range(layout.num_layers):
            codec.load_layer(layer, pid, drows)
    g.replay()
    sync()
    want = [[torch.zeros_like(t) for t in per] for per in cpu]
    for layer in range(layout.num_layers):
        reference.decode_layer(layout, layer, host, ids, [per[layer] for per in want], page_rows([5, 2], ps))
    assert_rows_equal(dev, want, "graph replay")
    codec.shutdown()


@gpu
def test_decode_op_under_torch_compile(nat):
    """torch.ops.kvtq.decode has a fake kernel: a compiled function that calls it runs and is exact."""
    layout, dev, cpu, rows, host, codec, _ = _codec_setup(seed=91)
    ps = layout.page_size
    ids = torch.tensor([1])
    codec.backup(ids, to_dev(page_rows([2], ps)))
    sync()
    plan = codec.plan
    desc, cfg, err = plan.decode_desc(0, 1, codec.blocks), codec._cfg, codec.err.word
    pid, drows = to_dev(ids), to_dev(page_rows([4], ps))
    k, v = dev[0][0], dev[1][0]

    @torch.compile(fullgraph=False)
    def load(pid, drows, k, v):
        torch.ops.kvtq.decode(desc, cfg, pid, drows, k, v, err)
        return k.sum()

    load(pid, drows, k, v)
    sync()
    want = [cpu[0][0].clone(), cpu[1][0].clone()]
    reference.decode_layer(layout, 0, host, ids, want, page_rows([4], ps))
    assert torch.equal(k.cpu().view(torch.int16), want[0].view(torch.int16))
    assert torch.equal(v.cpu().view(torch.int16), want[1].view(torch.int16))
    codec.shutdown()
