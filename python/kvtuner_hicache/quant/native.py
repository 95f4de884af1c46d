"""Native CUDA page codec: the reference's page-level signatures, on the GPU.

`encode_pages` and `decode_layer` take exactly the arguments of `kvtuner_hicache.quant.reference`
and write bit-identical bytes and rows. `backup_to_host` is the backup path of the quantized host
pool: encode into a GPU staging area, then one DMA per run of consecutive host pages.

The CUDA sources live in `sgl-kernel/csrc/` and are JIT-built with `torch.utils.cpp_extension.load`
on first use (cached under `~/.cache/kvtuner_hicache/`, see sgl-kernel/README.md). Importing this
module never builds or raises: `available()` says whether the kernels can be used and
`unavailable_reason()` why not (no CUDA, no nvcc, build error, KVTQ_DISABLE_NATIVE=1).

Environment:
  KVTQ_LOAD_BLOCKS     blocks of the per-layer load kernel (bounded grid so that the load overlaps
                       the forward pass); default DEFAULT_LOAD_BLOCKS.
  KVTQ_DISABLE_NATIVE  never build or use the kernels.
  KVTQ_KERNEL_SRC      directory holding kvtq_kernels.cu (default: <repo>/sgl-kernel/csrc).
  KVTQ_BUILD_DIR       build cache root (default: ~/.cache/kvtuner_hicache).
  KVTQ_BUILD_VERBOSE   print the nvcc command lines and ptxas resource usage while building.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvtuner_hicache.config import AXIS_PER_TOKEN
from kvtuner_hicache.page_format import PageLayout
from kvtuner_hicache.quant import reference

log = logging.getLogger(__name__)

name = "native"  # label for logs (dispatch.codec_name)

SOURCES = ("kvtq_kernels.cu", "kvtq_ops.cpp")
HEADERS = ("kvtq_kernels.h",)
DEFAULT_LOAD_BLOCKS = 64

# Must match sgl-kernel/csrc/kvtq_kernels.h.
_THREADS = 256
_ENC_ITEMS_PER_UNIT = 1024
_ENC_MAX_TOKENS_PER_THREAD = 16
_DEC_MAX_CODE_BYTES = 16384
_DEC_MAX_META = 4096
_DEC_SMALL_UNIT_ELEMENTS = 8192  # small-batch decode units: 4 output stores per thread, many blocks per page
_CHUNK_FIELDS = 20
_DECODE_FIELDS = 16

_lock = threading.Lock()
_ext: Any = None
_reason: str | None = None
_tried = False


# ---- build -----------------------------------------------------------------------------------


def source_dir() -> Path | None:
    """Directory with the CUDA sources, or None."""
    cands = []
    if os.environ.get("KVTQ_KERNEL_SRC"):
        cands.append(Path(os.environ["KVTQ_KERNEL_SRC"]))
    here = Path(__file__).resolve()
    cands.append(here.parents[3] / "sgl-kernel" / "csrc")  # repo checkout
    cands.append(here.parents[1] / "csrc")  # installed package data
    for c in cands:
        if all((c / f).is_file() for f in SOURCES + HEADERS):
            return c
    return None


def _build() -> Any:
    if os.environ.get("KVTQ_DISABLE_NATIVE", "") not in ("", "0"):
        raise RuntimeError("disabled by KVTQ_DISABLE_NATIVE")
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is built without CUDA")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False)")
    src = source_dir()
    if src is None:
        raise RuntimeError("kernel sources (sgl-kernel/csrc/kvtq_kernels.cu) not found; set KVTQ_KERNEL_SRC")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc not found (CUDA_HOME is unset and nvcc is not on PATH)")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update((src / f).read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|sm_{arch}".encode())
    name = f"kvtq_native_{h.hexdigest()[:12]}"
    root = Path(os.environ.get("KVTQ_BUILD_DIR") or Path.home() / ".cache" / "kvtuner_hicache")
    build_dir = root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    cuda_flags = [
        "-O3",
        "-fmad=false",  # the kernels use explicit _rn intrinsics; this guards any plain float expression
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-lineinfo",
    ]
    verbose = os.environ.get("KVTQ_BUILD_VERBOSE", "") not in ("", "0")
    if verbose:
        cuda_flags.append("--ptxas-options=-v")
    return cpp_extension.load(
        name=name,
        sources=[str(src / f) for f in SOURCES],
        build_directory=str(build_dir),
        extra_cflags=["-O3"],
        extra_cuda_cflags=cuda_flags,
        verbose=verbose,
    )


def _load() -> Any:
    global _ext, _reason, _tried
    if _tried:
        return _ext
    with _lock:
        if not _tried:
            try:
                _ext = _build()
                log.info("kvtuner_hicache native codec built (%s)", getattr(_ext, "__name__", "?"))
            except Exception as e:  # never raise at import or availability checks
                _ext = None
                _reason = f"{type(e).__name__}: {e}"
                log.info("kvtuner_hicache native codec unavailable: %s", _reason)
            _tried = True
    return _ext


def available() -> bool:
    """True when the CUDA kernels built (or loaded from the cache) on this machine."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False; None when it is True."""
    _load()
    return _reason


def build_name() -> str | None:
    """Name of the loaded extension (it encodes a hash of the sources, torch and the GPU arch)."""
    ext = _load()
    return None if ext is None else getattr(ext, "__name__", None)


def extension() -> Any:
    """The compiled extension module; raises RuntimeError with the reason when unavailable."""
    ext = _load()
    if ext is None:
        raise RuntimeError(f"kvtuner_hicache native codec unavailable: {_reason}")
    return ext


_load_blocks: int | None = None


def load_blocks() -> int:
    """Blocks of the per-layer load kernel (env KVTQ_LOAD_BLOCKS, read once, else DEFAULT_LOAD_BLOCKS)."""
    global _load_blocks
    if _load_blocks is None:
        try:
            _load_blocks = max(1, int(os.environ.get("KVTQ_LOAD_BLOCKS", DEFAULT_LOAD_BLOCKS)))
        except ValueError:
            _load_blocks = DEFAULT_LOAD_BLOCKS
    return _load_blocks


# ---- per-layout plan (built once, cached) ----------------------------------------------------


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def _decode_unit_tokens(ps: int, width: int, bits: int, axis: int, group: int, max_elements: int | None = None) -> int | None:
    """Largest token count per decode unit within the kernel's per-block budget (and `max_elements`)."""
    best = None
    for tu in range(1, ps + 1):
        if ps % tu:
            continue
        if best is not None and max_elements is not None and tu * width > max_elements:
            break
        code = tu * width * bits // 8
        if code > _DEC_MAX_CODE_BYTES or code % 16:
            continue
        if axis != AXIS_PER_TOKEN and group % tu and tu % group:
            continue
        meta = tu * width // group if axis == AXIS_PER_TOKEN else -(-tu // group) * width
        if meta > _DEC_MAX_META:
            continue
        best = tu
    return best


class _Plan:
    """Kernel tables of one PageLayout: chunk descriptors, unit map, decode descriptors."""

    def __init__(self, layout: PageLayout):
        self.layout = layout
        self.reason = self._check(layout)
        self.page_bytes = layout.page_bytes
        self.nbuf = 1 + max(st.buffer for st in layout.streams)
        self._dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._ptrs: dict[tuple, tuple[torch.Tensor, list[int], list[int], torch.dtype]] = {}
        if self.reason is None:
            self._build_tables()

    @staticmethod
    def _check(layout: PageLayout) -> str | None:
        ps = layout.page_size
        for s, st in enumerate(layout.streams):
            width = st.heads * st.dim
            if st.dim % 8 or st.col_offset % 8:
                return f"stream {st.name}: dim {st.dim} / column offset {st.col_offset} not a multiple of 8"
            if width % 64:
                return f"stream {st.name}: heads*dim {width} not a multiple of 64"
            for layer in range(layout.num_layers):
                c = layout.chunk(s, layer)
                if c.axis == AXIS_PER_TOKEN and c.group > 2048:
                    return f"per-token group {c.group} > 2048"
                if c.axis != AXIS_PER_TOKEN and c.group > 4096:
                    return f"per-channel group {c.group} > 4096"
                if _decode_unit_tokens(ps, width, c.bits, c.axis, c.group) is None:
                    return f"stream {st.name} layer {layer}: no decode unit fits {width} columns"
        return None

    def _build_tables(self) -> None:
        lay = self.layout
        ps = lay.page_size
        rows, unit_chunk = [], []
        smem_codes, smem_meta = 16, 8
        dec_rows: dict[str, dict[int, list[list[int]]]] = {
            kind: {layer: [] for layer in range(lay.num_layers)} for kind in ("big", "small")}
        for s, st in enumerate(lay.streams):
            width = st.heads * st.dim
            w8 = width // 8
            for layer in range(lay.num_layers):
                c = lay.chunk(s, layer)
                if c.axis == AXIS_PER_TOKEN:
                    kc = ncb = 0
                    units = -(-ps * w8 // _ENC_ITEMS_PER_UNIT)
                else:
                    kc = _pow2_floor(min(32, w8, max(1, 4096 // c.group)))
                    ncb = -(-w8 // kc)
                    units = (ps // c.group) * ncb
                rows.append([st.buffer, layer, c.bits, c.axis, c.group, int(c.asym), st.heads, st.dim, width,
                             st.col_offset, c.offset, c.scale_offset, c.min_offset, c.codes_bytes, c.num_groups,
                             c.nbytes, units, len(unit_chunk), kc, ncb])
                unit_chunk += [len(rows) - 1] * units
                min_off = c.min_offset if c.asym else c.scale_offset
                for kind, limit in (("big", None), ("small", _DEC_SMALL_UNIT_ELEMENTS)):
                    tu = _decode_unit_tokens(ps, width, c.bits, c.axis, c.group, limit)
                    assert tu is not None
                    meta = tu * width // c.group if c.axis == AXIS_PER_TOKEN else -(-tu // c.group) * width
                    smem_codes = max(smem_codes, tu * width * c.bits // 8)
                    smem_meta = max(smem_meta, -(-meta // 8) * 8)
                    dec_rows[kind][layer].append([c.offset, c.scale_offset, min_off, st.buffer, c.bits, c.axis, c.group,
                                                  int(c.asym), st.heads, st.dim, width, st.col_offset, tu, ps // tu, 0, 0])
        assert all(len(r) == _CHUNK_FIELDS for r in rows)
        self.chunk_rows = rows
        self.unit_chunk = unit_chunk
        self.units_per_page = len(unit_chunk)
        self.smem_codes = -(-smem_codes // 16) * 16
        self.smem_meta = smem_meta
        # Two unit sizes per layer: "big" units (up to 16 KiB of codes, per-channel metadata read once per
        # tile) for batches that fill the bounded grid, "small" ones (<= 8192 elements) so that a batch of
        # one or a few pages still spreads over many blocks.
        self.dec_desc = [torch.tensor(dec_rows["big"][layer], dtype=torch.int64) for layer in range(lay.num_layers)]
        self.dec_desc_small = [torch.tensor(dec_rows["small"][layer], dtype=torch.int64) for layer in range(lay.num_layers)]
        self.dec_units_big = [sum(r[13] for r in dec_rows["big"][layer]) for layer in range(lay.num_layers)]
        self.header = torch.frombuffer(bytearray(lay.header()), dtype=torch.uint8)

    def device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self._dev.get(device)
        if t is None:
            t = (torch.tensor(self.chunk_rows, dtype=torch.int32).to(device),
                 torch.tensor(self.unit_chunk, dtype=torch.int32).to(device),
                 self.header.to(device))
            self._dev[device] = t
        return t

    def pointers(self, buffers: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, list[int], list[int], torch.dtype]:
        """uint64 pointer table [nbuf * L] on the GPU (cached per set of buffer addresses)."""
        lay = self.layout
        # Cached by the addresses of the first, middle and last layer of each buffer (a full key costs
        # ~10 us of Python per call): the KV pool's per-layer tensors are allocated once and never swapped.
        mid = lay.num_layers // 2
        key = tuple(p for b in range(self.nbuf) for p in (len(buffers[b]), buffers[b][0].data_ptr(),
                                                           buffers[b][mid].data_ptr(), buffers[b][-1].data_ptr()))
        hit = self._ptrs.get(key)
        if hit is not None:
            return hit
        rs, hs = [0, 0], [0, 0]
        dtype = buffers[0][0].dtype
        device = buffers[0][0].device
        for b in range(self.nbuf):
            if len(buffers[b]) != lay.num_layers:
                raise ValueError(f"buffers[{b}] has {len(buffers[b])} layers, the layout {lay.num_layers}")
            t0 = buffers[b][0]
            for t in buffers[b]:
                if t.device != device or t.dtype != dtype or t.dim() != 3 or t.stride() != t0.stride():
                    raise ValueError("device buffers must share device, dtype, rank 3 and strides across layers")
                if t.stride(2) != 1 or t.stride(0) % 8 or t.stride(1) % 8 or t.data_ptr() % 16:
                    raise ValueError("device rows must be contiguous in the last dim and 16-byte aligned")
            for st in lay.streams:
                if st.buffer == b and (t0.size(1) != st.heads or t0.size(2) < st.col_offset + st.dim):
                    raise ValueError(f"buffer {b} shape {tuple(t0.shape)} does not fit stream {st.name}")
            rs[b], hs[b] = t0.stride(0), t0.stride(1)
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"device KV dtype must be bfloat16 or float16, got {dtype}")
        ptrs = torch.tensor([t.data_ptr() for b in range(self.nbuf) for t in buffers[b]], dtype=torch.int64).to(device)
        if len(self._ptrs) >= 8:
            self._ptrs.clear()
        hit = (ptrs, rs, hs, dtype)
        self._ptrs[key] = hit
        return hit


_plans: weakref.WeakKeyDictionary[PageLayout, _Plan] = weakref.WeakKeyDictionary()
_warned: set[str] = set()


def plan_for(layout: PageLayout) -> _Plan:
    p = _plans.get(layout)
    if p is None:
        p = _Plan(layout)
        _plans[layout] = p
        if p.reason is not None and p.reason not in _warned:
            _warned.add(p.reason)
            log.warning("kvtuner_hicache native codec: %s; using the reference codec for this layout", p.reason)
    return p


def supports(layout: PageLayout) -> str | None:
    """None when the kernels handle `layout`, else why not (the functions then fall back to the reference)."""
    return plan_for(layout).reason


# ---- the reference's page-level signatures -----------------------------------------------------


def encode_pages(layout: PageLayout, buffers: Sequence[Sequence[torch.Tensor]], token_index: torch.Tensor, out: torch.Tensor) -> None:
    """Gather, quantize and write whole pages (header included) into `out`: one kernel launch for all layers.

    buffers[b][layer]: device buffer b (0 = K or MLA latent row, 1 = V) of a local layer, [rows, H, D_total].
    token_index: int64 [n_pages * page_size] device rows, whole pages. out: uint8 [n_pages, page_bytes]
    (GPU for the fast path; a CPU `out` is filled through a temporary GPU buffer).
    """
    plan = plan_for(layout)
    ps = layout.page_size
    n_pages = token_index.numel() // ps
    assert token_index.numel() == n_pages * ps, "token_index must cover whole pages"
    assert out.shape == (n_pages, layout.page_bytes) and out.dtype == torch.uint8
    if plan.reason is not None:
        reference.encode_pages(layout, buffers, token_index, out)
        return
    if n_pages == 0:
        return
    ext = extension()
    ptrs, rs, hs, dtype = plan.pointers(buffers)
    dev = ptrs.device
    if not token_index.is_cuda or token_index.dtype is not torch.int64 or not token_index.is_contiguous():
        token_index = token_index.to(device=dev, dtype=torch.int64).contiguous()
    chunks, units, header = plan.device_tables(dev)
    dcode = 0 if dtype == torch.bfloat16 else 1
    direct = out.device == dev and out.stride(1) == 1 and out.data_ptr() % 16 == 0 and out.stride(0) % 16 == 0
    target = out if direct else torch.empty(n_pages, layout.page_bytes, dtype=torch.uint8, device=dev)
    ext.encode(chunks, units, ptrs, token_index, header, target, layout.num_layers, ps, plan.units_per_page, rs, hs, dcode)
    if not direct:
        out.copy_(target)


def decode_layer(layout: PageLayout, layer: int, pages: torch.Tensor, page_ids: torch.Tensor, buffers: Sequence[torch.Tensor],
                 token_index: torch.Tensor, blocks: int | None = None) -> None:
    """Dequantize one local layer of pages `page_ids` of `pages` and scatter into the device pool.

    pages: uint8 [num_pages, page_bytes], pinned CPU memory (read zero-copy by the kernel) or a CUDA tensor;
    page_ids: int64 [n] (GPU preferred); buffers[b]: this layer's device buffer b, [rows, H, D_total];
    token_index: int64 [n * page_size] device rows. One kernel launch on the current stream with a bounded
    grid of `blocks` (default KVTQ_LOAD_BLOCKS); 0 = one block per unit (no bound).
    """
    plan = plan_for(layout)
    if plan.reason is not None:
        reference.decode_layer(layout, layer, pages, page_ids, buffers, token_index)
        return
    dst0 = buffers[0]
    dst1 = buffers[1] if len(buffers) > 1 else dst0
    # fast path: SGLang passes contiguous GPU int64 indices (the C++ side checks device and layout)
    if not page_ids.is_cuda or page_ids.dtype is not torch.int64:
        page_ids = page_ids.to(device=dst0.device, dtype=torch.int64).contiguous()
    if not token_index.is_cuda or token_index.dtype is not torch.int64:
        token_index = token_index.to(device=dst0.device, dtype=torch.int64).contiguous()
    nb = load_blocks() if blocks is None else int(blocks)
    units = page_ids.numel() * plan.dec_units_big[layer]
    big = units >= (2 * nb if nb > 0 else 256)  # enough big units to fill the grid, else small ones
    desc = plan.dec_desc[layer] if big else plan.dec_desc_small[layer]
    (_ext or extension()).decode(desc, pages, page_ids, dst0, dst1, token_index, layout.page_size,
                                 plan.smem_codes, plan.smem_meta, nb)


def backup_to_host(layout: PageLayout, buffers: Sequence[Sequence[torch.Tensor]], token_index: torch.Tensor,
                   host_pages: torch.Tensor, host_page_ids_cpu: torch.Tensor, staging: torch.Tensor) -> None:
    """Quantize pages on the GPU and copy them to pinned host pages, all on the current stream.

    token_index: GPU int64 [n * page_size] device rows; host_pages: pinned uint8 [num_pages, page_bytes];
    host_page_ids_cpu: CPU int64 [n] destination page of each source page; staging: GPU uint8
    [chunk_pages, page_bytes]. Pages are encoded `chunk_pages` at a time into `staging`, then copied with
    one cudaMemcpy2DAsync per run of consecutive host page ids. Only enqueues GPU work (no sync).
    """
    ps = layout.page_size
    n = token_index.numel() // ps
    assert token_index.numel() == n * ps, "token_index must cover whole pages"
    ids = host_page_ids_cpu
    if ids.device.type != "cpu" or ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
    assert ids.numel() == n, f"{ids.numel()} host page ids for {n} pages"
    assert staging.is_cuda and staging.dim() == 2 and staging.shape[1] == layout.page_bytes and staging.shape[0] > 0
    ext = extension()
    plan = plan_for(layout)
    if n == 0:
        return
    if plan.reason is not None:  # reference encode into the staging area, then the same DMA runs
        cap = staging.shape[0]
        for start in range(0, n, cap):
            m = min(cap, n - start)
            reference.encode_pages(layout, buffers, token_index[start * ps:(start + m) * ps], staging[:m])
            ext.copy_pages_d2h(staging, m, host_pages, ids, start)
        return
    ptrs, rs, hs, dtype = plan.pointers(buffers)
    if not token_index.is_cuda or token_index.dtype is not torch.int64 or not token_index.is_contiguous():
        token_index = token_index.to(device=ptrs.device, dtype=torch.int64).contiguous()
    chunks, units, header = plan.device_tables(ptrs.device)
    ext.backup(chunks, units, ptrs, token_index, header, staging, host_pages, ids, layout.num_layers, ps,
               plan.units_per_page, rs, hs, 0 if dtype == torch.bfloat16 else 1)


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


__all__ = ["DEFAULT_LOAD_BLOCKS", "available", "build_name", "backup_to_host", "decode_layer", "encode_pages", "extension",
           "load_blocks", "plan_for", "roundtrip_pages", "supports", "unavailable_reason"]
