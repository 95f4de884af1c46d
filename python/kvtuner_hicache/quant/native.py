"""Native CUDA page codec: the kernel library (`torch.ops.kvtq`), its limits and per-layout plans.

The kernels ship as their own wheel, `kvtuner-hicache-kernel` (sources in `sgl-kernel/`, built by
`scripts/device/build_kernel_wheel.sh`), whose import checks that it was built for the running
torch. This module only loads it: serving never compiles. `KVTQ_JIT_BUILD=1` is the developer option
that instead JIT-builds `sgl-kernel/csrc` with `torch.utils.cpp_extension` (needs nvcc).

Importing this module never loads or raises: `available()` says whether the operators can be used and
`unavailable_reason()` why not, with the command that installs them. Whether a missing library is an
error is decided once, by `kvtuner_hicache.quant.codec.make_codec` (on CUDA it is, unless the user opts
in to the reference codec).

The per-pool codec object is `codec.NativeCodec`. The module-level functions at the end
(`encode_pages`, `decode_layer`, `backup_to_host`, `roundtrip_pages`) keep the reference's page-level
signatures for tests and tools; they resolve pointers on every call and are not the serving path.

Environment:
  KVTQ_JIT_BUILD       1 = JIT-build the kernels from sgl-kernel/csrc instead of importing the wheel.
  KVTQ_KERNEL_SRC      (JIT) directory holding kvtq_kernels.cu (default: <repo>/sgl-kernel/csrc).
  KVTQ_BUILD_DIR       (JIT) build cache root (default: ~/.cache/kvtuner_hicache).
  KVTQ_BUILD_VERBOSE   (JIT) print the nvcc command lines and ptxas resource usage.
  KVTQ_LOAD_BLOCKS     blocks of the per-layer load kernel; default DEFAULT_LOAD_BLOCKS.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvtuner_hicache import page_format
from kvtuner_hicache.config import AXIS_PER_TOKEN, NATIVE_BITS
from kvtuner_hicache.page_format import HEADER_BYTES, HEADER_CRC_OFFSET, PageLayout
from kvtuner_hicache.quant.elastic_pages import RefinementLayout

log = logging.getLogger(__name__)

name = "native"  # label for logs

KERNEL_VERSION = "0.10.0"  # the kvtuner-hicache-kernel version this package is written against
ENV_JIT = "KVTQ_JIT_BUILD"
SOURCES = ("kvtq_kernels.cu", "kvtq_ops.cpp", "kvtq_crc.cpp")
HEADERS = ("kvtq_kernels.h", "kvtq_check.h")
DEFAULT_LOAD_BLOCKS = 64
SMALL_UNIT_ELEMENTS = 8192  # planning choice (not a kernel limit): small-batch decode units
INSTALL_HINT = ("install the kernel wheel built for this torch: `bash scripts/device/build_kernel_wheel.sh` "
                "(writes and installs dist/kvtuner_hicache_kernel-*.whl; or `pip install ./sgl-kernel "
                "--no-build-isolation`), or use the image of docker/Dockerfile; developers can JIT-build with "
                f"{ENV_JIT}=1 (needs nvcc)")

_lock = threading.Lock()
_ops: Any = None
_reason: str | None = None
_build: str | None = None
_limits: dict[str, int] | None = None
_tried = False


# ---- loading -----------------------------------------------------------------------------------


def source_dir() -> Path | None:
    """Directory with the CUDA sources (JIT builds only), or None."""
    cands = []
    if os.environ.get("KVTQ_KERNEL_SRC"):
        cands.append(Path(os.environ["KVTQ_KERNEL_SRC"]))
    cands.append(Path(__file__).resolve().parents[3] / "sgl-kernel" / "csrc")  # repo checkout
    for c in cands:
        if all((c / f).is_file() for f in SOURCES + HEADERS):
            return c
    return None


def _jit_build() -> tuple[Any, str]:
    src = source_dir()
    if src is None:
        raise RuntimeError(f"{ENV_JIT}=1 but the kernel sources (sgl-kernel/csrc) were not found; set KVTQ_KERNEL_SRC")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError(f"{ENV_JIT}=1 but nvcc was not found (CUDA_HOME unset, nvcc not on PATH)")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update((src / f).read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|sm_{arch}|{KERNEL_VERSION}".encode())
    mod = f"kvtq_jit_{h.hexdigest()[:12]}"
    build_dir = Path(os.environ.get("KVTQ_BUILD_DIR") or Path.home() / ".cache" / "kvtuner_hicache") / mod
    build_dir.mkdir(parents=True, exist_ok=True)
    defs = [f'-DKVTQ_VERSION="{KERNEL_VERSION}"', f'-DKVTQ_TORCH_VERSION="{torch.__version__}"',
            f'-DKVTQ_CUDA_ARCHS="{arch}-real(jit)"']
    cuda_flags = ["-O3", "-fmad=false", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo", *defs]
    verbose = os.environ.get("KVTQ_BUILD_VERBOSE", "") not in ("", "0")
    if verbose:
        cuda_flags.append("--ptxas-options=-v")
    cpp_extension.load(name=mod, sources=[str(src / f) for f in SOURCES], build_directory=str(build_dir),
                       extra_cflags=["-O3", *defs], extra_cuda_cflags=cuda_flags, verbose=verbose,
                       is_python_module=False)
    return torch.ops.kvtq, f"JIT build {mod} (sm_{arch}, {ENV_JIT}=1)"


def _wheel() -> tuple[Any, str]:
    try:
        import kvtuner_hicache_kernel as kernel
    except ModuleNotFoundError as e:
        raise RuntimeError(f"the kernel package is not installed ({e})") from e
    if kernel.__version__ != KERNEL_VERSION:
        raise RuntimeError(f"kvtuner-hicache-kernel {kernel.__version__} is installed, this kvtuner_hicache needs "
                           f"{KERNEL_VERSION}")
    ops = kernel.load()  # raises KernelABIError (an ImportError) on a torch mismatch
    info = kernel.build_info()
    return ops, f"kvtuner-hicache-kernel {info['version']} (torch {info['torch']}, CUDA {info['cuda']}, {info['archs']})"


def _load() -> Any:
    global _ops, _reason, _build, _limits, _tried
    if _tried:
        return _ops
    with _lock:
        if not _tried:
            try:
                if torch.version.cuda is None:
                    raise RuntimeError(f"torch {torch.__version__} is built without CUDA")
                if not torch.cuda.is_available():
                    raise RuntimeError("no CUDA device (torch.cuda.is_available() is False)")
                jit = os.environ.get(ENV_JIT, "") not in ("", "0")
                ops, build = _jit_build() if jit else _wheel()
                _limits = {str(k): int(v) for k, v in ops.limits().items()}
                _ops, _build = ops, build
                if ops.crc32c_hardware():  # L3 page checks: one call per batch, without the GIL
                    page_format.set_batch_crc(page_crcs, f"kvtq page_crcs ({CRC_THREADS} threads, GIL released)")
                log.info("kvtuner_hicache native kernels: %s; L3 page CRCs: %s", build, page_format.batch_crc_name())
            except Exception as e:  # never raise at import or availability checks
                _ops = None
                _reason = f"{type(e).__name__}: {e}"
            _tried = True
    return _ops


def available() -> bool:
    """True when the kernel operators are loaded (installed wheel, or the JIT developer build)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (with the install command); None when it is True."""
    _load()
    return None if _ops is not None else f"{_reason}; {INSTALL_HINT}"


def build_name() -> str | None:
    """What was loaded: the kernel wheel's version and build, or the JIT build."""
    _load()
    return _build


def ops() -> Any:
    """`torch.ops.kvtq`; raises RuntimeError with the reason and the install command when unavailable."""
    o = _load()
    if o is None:
        raise RuntimeError(f"kvtuner_hicache native kernels unavailable: {unavailable_reason()}")
    return o


CRC_THREADS = max(1, min(4, os.cpu_count() or 1))


def page_crcs(pages: Sequence[memoryview], library: Any = None) -> list[int]:
    """`page_format.page_crc` of each page in one operator call (kvtq_crc.cpp): the GIL is released
    once for the batch, where the crc32c package hands it back once per page. Same values.
    `library`: the operators to call (default the loaded kernels; a benchmark passes a CPU build)."""
    import numpy as np

    addrs = torch.tensor([np.frombuffer(p, np.uint8).ctypes.data for p in pages], dtype=torch.int64)
    lens = torch.tensor([p.nbytes for p in pages], dtype=torch.int64)
    lib = library if library is not None else ops()
    return lib.page_crcs(addrs, lens, HEADER_CRC_OFFSET, HEADER_BYTES, CRC_THREADS).tolist()


def limits() -> dict[str, int]:
    """The kernel limits, as exported by the library (`torch.ops.kvtq.limits()`)."""
    ops()
    assert _limits is not None
    return _limits


def load_blocks() -> int:
    """Blocks of the per-layer load kernel (env KVTQ_LOAD_BLOCKS, else DEFAULT_LOAD_BLOCKS)."""
    try:
        return max(1, int(os.environ.get("KVTQ_LOAD_BLOCKS", DEFAULT_LOAD_BLOCKS)))
    except ValueError:
        return DEFAULT_LOAD_BLOCKS


# ---- bad-index reports ---------------------------------------------------------------------------

_ERRORS = {1: ("device row", "encode"), 2: ("host page id", "load"), 3: ("device row", "load"),
           4: ("refinement plane offset", "backup"), 5: ("refinement plane offset", "load"),
           6: ("encode unit (out of its launch's class: a bad plan)", "encode")}


class ErrorSink:
    """Where the kernels report the first bad index of a call instead of faulting (see kvtq_kernels.h).

    `word` is a CUDA int32 (one reporter is elected with an atomicCAS), `report` a pinned int64[4] the
    kernels write through its mapped address, so `check()` is a plain host read: no copy, no sync. A
    kernel that meets a bad index skips that access; the error surfaces at the next `check()`.
    """

    def __init__(self, device: torch.device):
        self.word = torch.zeros(1, dtype=torch.int32, device=device)
        self.report = torch.zeros(4, dtype=torch.int64).pin_memory()
        self.report_ptr = int(ops().mapped_pointer(self.report))
        self._code = ctypes.c_int64.from_address(self.report.data_ptr())

    def pending(self) -> bool:
        return self._code.value != 0

    def check(self) -> None:
        """Raise IndexError if a kernel reported a bad index since the last check (then reset)."""
        if self._code.value == 0:
            return
        code, value, bound, _ = self.report.tolist()
        self.report.zero_()
        self.word.zero_()  # on the current stream: later kernels may report again
        what, op = _ERRORS.get(int(code), ("index", "transfer"))
        raise IndexError(f"kvtuner_hicache: {what} {value} out of range [0, {bound}) in a {op}; the kernel skipped "
                         "it (the rows of that call are not valid) and the CUDA context is intact")


# ---- per-layout plan (built once) ----------------------------------------------------------------


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def _decode_unit_tokens(lim: dict[str, int], ps: int, width: int, bits: int, axis: int, group: int,
                        max_elements: int | None = None) -> int | None:
    """Largest token count per decode unit within the kernel's per-block budget (and `max_elements`)."""
    best = None
    for tu in range(1, ps + 1):
        if ps % tu:
            continue
        if best is not None and max_elements is not None and tu * width > max_elements:
            break
        code = tu * width * bits // 8
        if code > lim["dec_max_code_bytes"] or code % 16:
            continue
        if axis != AXIS_PER_TOKEN and group % tu and tu % group:
            continue
        meta = tu * width // group if axis == AXIS_PER_TOKEN else -(-tu // group) * width
        if meta > lim["dec_max_meta"]:
            continue
        best = tu
    return best


# Fields of a chunk row (ChunkDesc in kvtq_kernels.h, field order) that the planner reads back.
ROW_BITS, ROW_AXIS, ROW_UNITS, ROW_UNIT_START = 2, 3, 16, 17


class Plan:
    """Kernel tables of one PageLayout: chunk descriptors, unit map, decode descriptors per layer.

    Built from the layout and the library's limits only (no device pointers), so one plan serves every
    pool of that layout. `reason` is None when the kernels handle the layout, else why not.
    """

    def __init__(self, layout: PageLayout):
        self.layout = layout
        self.lim = limits()
        self.reason = self._check(layout)
        self.page_bytes = layout.page_bytes
        self.nbuf = 1 + max(st.buffer for st in layout.streams)
        self._dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if self.reason is None:
            self._build_tables()

    def _check(self, layout: PageLayout) -> str | None:
        ps, lim = layout.page_size, self.lim
        for s, st in enumerate(layout.streams):
            width = st.heads * st.dim
            if st.dim % 8 or st.col_offset % 8:
                return f"stream {st.name}: dim {st.dim} / column offset {st.col_offset} not a multiple of 8"
            if width % 64:
                return f"stream {st.name}: heads*dim {width} not a multiple of 64"
            if ps * width // 8 >= 1 << 24:  # the encode kernel's in-block division (DivBy) is exact below 2^24
                return f"stream {st.name}: page_size*heads*dim/8 = {ps * width // 8} items per page >= 2^24"
            for layer in range(layout.num_layers):
                c = layout.chunk(s, layer)
                if c.bits not in NATIVE_BITS:
                    return (f"layer {layer} {st.name}: {c.bits}-bit codes have no CUDA kernel (kernel wheel "
                            f"{KERNEL_VERSION} encodes and decodes {', '.join(map(str, NATIVE_BITS))} bits)")
                if c.axis == AXIS_PER_TOKEN and c.group > lim["enc_max_group_per_token"]:
                    return f"per-token group {c.group} > {lim['enc_max_group_per_token']}"
                if c.axis != AXIS_PER_TOKEN and c.group > lim["enc_max_group_per_channel"]:
                    return f"per-channel group {c.group} > {lim['enc_max_group_per_channel']}"
                if _decode_unit_tokens(lim, ps, width, c.bits, c.axis, c.group) is None:
                    return f"stream {st.name} layer {layer}: no decode unit fits {width} columns"
        return None

    def _build_tables(self) -> None:
        lay, lim = self.layout, self.lim
        ps = lay.page_size
        # where each chunk's refinement codes sit in its stream's plane (used only when a call passes planes)
        refinement = RefinementLayout(lay)
        rows, unit_chunk = [], []
        smem_codes, smem_meta = 16, 8
        dec_rows: dict[str, dict[int, list[list[int]]]] = {
            kind: {layer: [] for layer in range(lay.num_layers)} for kind in ("big", "small")}
        max_rows = lim["enc_max_tokens_per_thread"] * lim["threads"]
        for s, st in enumerate(lay.streams):
            width = st.heads * st.dim
            w8 = width // 8
            for layer in range(lay.num_layers):
                c = lay.chunk(s, layer)
                if c.axis == AXIS_PER_TOKEN:
                    kc = ncb = 0
                    units = -(-ps * w8 // lim["enc_items_per_unit"])
                else:
                    kc = _pow2_floor(min(32, w8, max(1, max_rows // c.group)))
                    ncb = -(-w8 // kc)
                    units = (ps // c.group) * ncb
                rc = refinement.chunk(s, layer)
                plane_stream, plane_off = (s, rc.offset) if rc is not None else (-1, 0)
                rows.append([st.buffer, layer, c.bits, c.axis, c.group, int(c.asym), st.heads, st.dim, width,
                             st.col_offset, c.offset, c.scale_offset, c.min_offset, c.codes_bytes, c.num_groups,
                             c.nbytes, units, 0, kc, ncb, plane_stream, plane_off])
                min_off = c.min_offset if c.asym else c.scale_offset
                for kind, limit in (("big", None), ("small", SMALL_UNIT_ELEMENTS)):
                    tu = _decode_unit_tokens(lim, ps, width, c.bits, c.axis, c.group, limit)
                    assert tu is not None
                    meta = tu * width // c.group if c.axis == AXIS_PER_TOKEN else -(-tu // c.group) * width
                    smem_codes = max(smem_codes, tu * width * c.bits // 8)
                    smem_meta = max(smem_meta, -(-meta // 8) * 8)
                    dec_rows[kind][layer].append([c.offset, c.scale_offset, min_off, st.buffer, c.bits, c.axis, c.group,
                                                  int(c.asym), st.heads, st.dim, width, st.col_offset, tu, ps // tu,
                                                  int(rc is not None), plane_off])
        assert all(len(r) == lim["chunk_fields"] for r in rows)
        # The unit table in (axis, bits) class order: the kernel library launches one specialised encode
        # kernel per class over its contiguous span of units (geometry() passes the spans).
        spans: list[tuple[int, int, int, int]] = []
        for i in sorted(range(len(rows)), key=lambda i: (rows[i][ROW_AXIS], rows[i][ROW_BITS], i)):
            r = rows[i]
            r[ROW_UNIT_START] = len(unit_chunk)
            cls, units = (r[ROW_AXIS], r[ROW_BITS]), r[ROW_UNITS]
            if spans and spans[-1][2:] == cls:
                b, u, a, bits = spans[-1]
                spans[-1] = (b, u + units, a, bits)
            else:
                spans.append((len(unit_chunk), units, *cls))
            unit_chunk += [i] * units
        assert len(spans) <= lim["enc_max_spans"]
        self.encode_spans = spans
        self.chunk_rows = rows
        self.unit_chunk = unit_chunk
        self.units_per_page = len(unit_chunk)
        self.smem_codes = -(-smem_codes // 16) * 16
        self.smem_meta = smem_meta
        # Two unit sizes per layer: "big" units (up to the kernel's code budget, per-channel metadata read
        # once per tile) for batches that fill the bounded grid, "small" ones so that a batch of one or a
        # few pages still spreads over many blocks.
        self.dec_desc = [torch.tensor(dec_rows["big"][layer], dtype=torch.int64) for layer in range(lay.num_layers)]
        self.dec_desc_small = [torch.tensor(dec_rows["small"][layer], dtype=torch.int64) for layer in range(lay.num_layers)]
        self.dec_units_big = [sum(r[13] for r in dec_rows["big"][layer]) for layer in range(lay.num_layers)]
        self.header = torch.frombuffer(bytearray(lay.header()), dtype=torch.uint8)

    def device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chunk table, unit table, header) on `device`, made once per device."""
        t = self._dev.get(device)
        if t is None:
            t = (torch.tensor(self.chunk_rows, dtype=torch.int32).to(device),
                 torch.tensor(self.unit_chunk, dtype=torch.int32).to(device),
                 self.header.to(device))
            self._dev[device] = t
        return t

    def decode_desc(self, layer: int, n_pages: int, blocks: int) -> torch.Tensor:
        """The layer's decode descriptor for a batch of n_pages: big units when they fill the grid."""
        units = n_pages * self.dec_units_big[layer]
        big = units >= (2 * blocks if blocks > 0 else 256)
        return self.dec_desc[layer] if big else self.dec_desc_small[layer]


_plans: weakref.WeakKeyDictionary[PageLayout, Plan] = weakref.WeakKeyDictionary()


def plan_for(layout: PageLayout) -> Plan:
    """The (cached) Plan of a layout; needs the library (its limits)."""
    p = _plans.get(layout)
    if p is None:
        p = Plan(layout)
        _plans[layout] = p
    return p


def supports(layout: PageLayout) -> str | None:
    """None when the kernels handle `layout`, else why not (needs the library)."""
    return plan_for(layout).reason


def validate_buffers(layout: PageLayout, buffers: Sequence[Sequence[torch.Tensor]]) -> tuple[list[int], list[int], list[int], torch.dtype]:
    """Check the device buffers against the layout; returns (row strides, head strides, rows, dtype)."""
    nbuf = 1 + max(st.buffer for st in layout.streams)
    if len(buffers) < nbuf:
        raise ValueError(f"{len(buffers)} device buffers, the layout needs {nbuf}")
    rs, hs, nr = [0, 0], [0, 0], [0, 0]
    t00 = buffers[0][0]
    dtype, device = t00.dtype, t00.device
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"device KV dtype must be bfloat16 or float16, got {dtype}")
    for b in range(nbuf):
        if len(buffers[b]) != layout.num_layers:
            raise ValueError(f"buffers[{b}] has {len(buffers[b])} layers, the layout {layout.num_layers}")
        t0 = buffers[b][0]
        for t in buffers[b]:
            if t.device != device or t.dtype != dtype or t.dim() != 3 or t.stride() != t0.stride() or t.shape != t0.shape:
                raise ValueError("device buffers must share device, dtype, shape and strides across layers")
            if t.stride(2) != 1 or t.stride(0) % 8 or t.stride(1) % 8 or t.data_ptr() % 16:
                raise ValueError("device rows must be contiguous in the last dim and 16-byte aligned")
        for st in layout.streams:
            if st.buffer == b and (t0.size(1) != st.heads or t0.size(2) < st.col_offset + st.dim):
                raise ValueError(f"buffer {b} shape {tuple(t0.shape)} does not fit stream {st.name}")
        rs[b], hs[b], nr[b] = t0.stride(0), t0.stride(1), t0.size(0)
    if nbuf == 1:
        rs[1], hs[1], nr[1] = rs[0], hs[0], nr[0]
    return rs, hs, nr, dtype


def geometry(layout: PageLayout, plan: Plan, rs: list[int], hs: list[int], rows: list[int], dtype: torch.dtype,
             err: ErrorSink) -> torch.Tensor:
    """The CPU int64 `geom` tensor of the encode/backup operators (field order: kvtq_ops.cpp Geom)."""
    spans = [f for span in plan.encode_spans for f in span]
    g = [layout.num_layers, layout.page_size, plan.units_per_page, 0 if dtype == torch.bfloat16 else 1,
         rs[0], rs[1], hs[0], hs[1], rows[0], rows[1], err.report_ptr, len(plan.encode_spans)]
    g += spans + [0] * (4 * limits()["enc_max_spans"] - len(spans))
    assert len(g) == limits()["geom_fields"]
    return torch.tensor(g, dtype=torch.int64)


def decode_cfg(pages: torch.Tensor, pages_ptr: int, layout: PageLayout, plan: Plan, blocks: int, err: ErrorSink, *,
               row_bytes: int | None = None) -> torch.Tensor:
    """The CPU int64 `cfg` tensor of the decode operator (field order: kvtq_ops.cpp DecCfg). `row_bytes`:
    the smallest row `pages` may have (default a whole page; staging rows hold a group of layers)."""
    need = layout.page_bytes if row_bytes is None else row_bytes
    if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.stride(1) != 1 or pages.size(1) < need:
        raise ValueError(f"pages must be a uint8 [num_pages, >= {need}] tensor with contiguous rows")
    c = [pages_ptr, pages.stride(0), pages.size(0), layout.page_size, plan.smem_codes, plan.smem_meta, blocks,
         err.report_ptr]
    assert len(c) == limits()["cfg_fields"]
    return torch.tensor(c, dtype=torch.int64)


# ---- the reference's page-level signatures (tests and tools; not the serving path) --------------

_sinks: dict[torch.device, ErrorSink] = {}
_streams: dict[torch.device, Any] = {}


def _sink(device: torch.device) -> ErrorSink:
    s = _sinks.get(device)
    if s is None:
        s = _sinks[device] = ErrorSink(device)
    s.check()
    return s


def _plan_or_raise(layout: PageLayout) -> Plan:
    plan = plan_for(layout)
    if plan.reason is not None:
        raise ValueError(f"the native kernels do not support this layout: {plan.reason}")
    return plan


def _index(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device != device or t.dtype is not torch.int64 or not t.is_contiguous():
        t = t.to(device=device, dtype=torch.int64).contiguous()
    return t


_POINTER_TABLES: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}
_POINTER_TABLES_MAX = 64  # distinct address lists kept; more clears the cache (tests build many pools)


def pointer_tables(buffers: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-buffer int64 [L] tables of layer data pointers, on the buffers' device (the second repeats
    the first for a one-buffer layout). Each table is made once per list of addresses and device: a table
    holds addresses only, so it stays right for any tensors at them. Making one is a copy from pageable
    memory, which synchronizes the stream; per call, it kept the module-level encode/decode (tests,
    benchmark/bench_quantize.py) from queueing ahead of the GPU. NativeCodec keeps its own tables."""
    dev = buffers[0][0].device
    tabs = []
    for per in buffers:
        key = (dev, tuple(t.data_ptr() for t in per))
        tab = _POINTER_TABLES.get(key)
        if tab is None:
            if len(_POINTER_TABLES) >= _POINTER_TABLES_MAX:
                _POINTER_TABLES.clear()
            tab = _POINTER_TABLES[key] = torch.tensor(key[1], dtype=torch.int64).to(dev)
        tabs.append(tab)
    return tabs[0], tabs[1] if len(tabs) > 1 else tabs[0]


def encode_pages(layout: PageLayout, buffers: Sequence[Sequence[torch.Tensor]], token_index: torch.Tensor, out: torch.Tensor) -> None:
    """Gather, quantize and write whole pages (header included) into `out`: one kernel launch for all layers.

    buffers[b][layer]: device buffer b (0 = K or MLA latent row, 1 = V) of a local layer, [rows, H, D_total].
    token_index: int64 [n_pages * page_size] device rows, whole pages. out: uint8 [n_pages, page_bytes]
    (a CPU `out` is filled through a temporary GPU buffer). A bad row raises IndexError at the next call.
    """
    plan = _plan_or_raise(layout)
    ps = layout.page_size
    n_pages = token_index.numel() // ps
    assert token_index.numel() == n_pages * ps, "token_index must cover whole pages"
    assert out.shape == (n_pages, layout.page_bytes) and out.dtype == torch.uint8
    if n_pages == 0:
        return
    rs, hs, nr, dtype = validate_buffers(layout, buffers)
    dev = buffers[0][0].device
    err = _sink(dev)
    p0, p1 = pointer_tables(buffers)
    chunks, units, header = plan.device_tables(dev)
    direct = out.device == dev and out.stride(1) == 1 and out.data_ptr() % 16 == 0 and out.stride(0) % 16 == 0
    target = out if direct else torch.empty(n_pages, layout.page_bytes, dtype=torch.uint8, device=dev)
    ops().encode(chunks, units, p0, p1, _index(token_index, dev), header, target,
                 geometry(layout, plan, rs, hs, nr, dtype, err), err.word)
    if not direct:
        out.copy_(target)


def decode_layer(layout: PageLayout, layer: int, pages: torch.Tensor, page_ids: torch.Tensor, buffers: Sequence[torch.Tensor],
                 token_index: torch.Tensor, blocks: int | None = None) -> None:
    """Dequantize one local layer of pages `page_ids` of `pages` and scatter into the device pool.

    pages: uint8 [num_pages, page_bytes], pinned CPU memory (read zero-copy) or a CUDA tensor;
    page_ids: int64 [n]; buffers[b]: this layer's device buffer b, [rows, H, D_total]; token_index: int64
    [n * page_size] device rows. One launch on the current stream with a bounded grid of `blocks` (default
    KVTQ_LOAD_BLOCKS; 0 = one block per unit). A bad page id or row raises IndexError at the next call.
    """
    plan = _plan_or_raise(layout)
    dst0 = buffers[0]
    dst1 = buffers[1] if len(buffers) > 1 else dst0
    dev = dst0.device
    err = _sink(dev)
    nb = load_blocks() if blocks is None else int(blocks)
    pid = _index(page_ids, dev)
    cfg = decode_cfg(pages, int(ops().mapped_pointer(pages)), layout, plan, nb, err)
    ops().decode(plan.decode_desc(layer, pid.numel(), nb), cfg, pid, _index(token_index, dev), dst0, dst1, err.word)


def backup_to_host(layout: PageLayout, buffers: Sequence[Sequence[torch.Tensor]], token_index: torch.Tensor,
                   host_pages: torch.Tensor, host_page_ids_cpu: torch.Tensor, staging: torch.Tensor) -> None:
    """Quantize pages on the GPU and copy them to pinned host pages, all on the current stream.

    token_index: GPU int64 [n * page_size] device rows; host_pages: pinned uint8 [num_pages, page_bytes];
    host_page_ids_cpu: CPU int64 [n]; staging: GPU uint8 [chunk_pages, page_bytes]. Uses one backup stream
    per device for the whole process (the per-pool codec owns its own instead).
    """
    plan = _plan_or_raise(layout)
    ps = layout.page_size
    n = token_index.numel() // ps
    assert token_index.numel() == n * ps, "token_index must cover whole pages"
    ids = _index(host_page_ids_cpu, torch.device("cpu"))
    assert ids.numel() == n, f"{ids.numel()} host page ids for {n} pages"
    if n == 0:
        return
    rs, hs, nr, dtype = validate_buffers(layout, buffers)
    dev = buffers[0][0].device
    err = _sink(dev)
    side = _streams.get(dev)
    if side is None:
        side = _streams[dev] = torch.classes.kvtq.BackupStream(dev.index if dev.index is not None else torch.cuda.current_device())
    p0, p1 = pointer_tables(buffers)
    chunks, units, header = plan.device_tables(dev)
    ops().backup(chunks, units, p0, p1, _index(token_index, dev), header, staging, host_pages, ids,
                 geometry(layout, plan, rs, hs, nr, dtype, err), err.word, side)


def check_errors(device: torch.device | str = "cuda") -> None:
    """Raise IndexError if a kernel launched by the functions above reported a bad index."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    s = _sinks.get(dev)
    if s is not None:
        s.check()


def roundtrip_pages(layout: PageLayout, layer_kv: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Native twin of reference.roundtrip_pages (GPU tensors; pages stay on the GPU)."""
    tokens = layer_kv[0][0].shape[0]
    dev = layer_kv[0][0].device
    idx = torch.arange(tokens, device=dev)
    pages = torch.empty(tokens // layout.page_size, layout.page_bytes, dtype=torch.uint8, device=dev)
    encode_pages(layout, layer_kv, idx, pages)
    out = [[t.clone() for t in per_layer] for per_layer in layer_kv]
    pid = torch.arange(pages.shape[0], device=dev)
    for layer in range(layout.num_layers):
        decode_layer(layout, layer, pages, pid, [out[b][layer] for b in range(len(out))], idx, blocks=0)
    return out


__all__ = ["CRC_THREADS", "DEFAULT_LOAD_BLOCKS", "ENV_JIT", "INSTALL_HINT", "KERNEL_VERSION", "ErrorSink", "Plan", "available",
           "backup_to_host", "build_name", "check_errors", "decode_cfg", "decode_layer", "encode_pages", "geometry",
           "limits", "load_blocks", "ops", "page_crcs", "plan_for", "pointer_tables", "roundtrip_pages", "supports",
           "unavailable_reason", "validate_buffers"]
