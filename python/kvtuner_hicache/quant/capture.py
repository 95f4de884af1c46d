"""Debug capture of the real L1 <-> L2 <-> L3 path, as a codec that wraps the pool's codec.

Off unless `KVTQ_CAPTURE_DIR` is set: then `make_codec` returns `CapturingCodec(inner)` and the pool's
hot methods stay unaware of it. `benchmark/check_capture.py` reads what this writes.

What is saved (bounded: `KVTQ_CAPTURE_PAGES` backup pages, and as many loads per source, per process):
- on backup: for the first page of each call, the device rows that were encoded (all local layers,
  every device buffer) plus the host page id and a CRC32 of the quantized payload that landed in the
  host page (after the caller's stream is synchronized);
- on `pages_written` (an L3 page set into L2): the CRC32 of the page's payload, so that a page coming
  back from storage into another host slot is recognised as a captured one (source "l3");
- on load (last local layer): for every loaded page recognised as captured, the rows written to the
  device for it (gathered on the caller's stream after the whole load), with its source "l2" or "l3".

The payload CRC excludes the header (the L3 proxy writes the CRC field there). Nothing is saved while
`<dir>/PAUSE` exists (warm-up traffic); the check is one `os.path.exists` per call, in capture mode only.
This module imports no sglang.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from collections.abc import Sequence

import torch

from kvtuner_hicache.page_format import HEADER_BYTES
from kvtuner_hicache.quant.codec import PageCodec, WrappingCodec

logger = logging.getLogger(__name__)

ENV_DIR = "KVTQ_CAPTURE_DIR"
ENV_PAGES = "KVTQ_CAPTURE_PAGES"
DEFAULT_PAGES = 24
PAUSE_FILE = "PAUSE"


def payload_crc(page: torch.Tensor) -> int:
    """CRC32 of a host page's payload (bytes after the header), page = uint8 [page_bytes] on the CPU."""
    return zlib.crc32(page[HEADER_BYTES:].numpy().tobytes())


def wrap_if_enabled(codec: PageCodec, meta: dict | None = None) -> PageCodec:
    """`CapturingCodec(codec)` when KVTQ_CAPTURE_DIR is set, else `codec` itself."""
    root = os.environ.get(ENV_DIR, "").strip()
    if not root:
        return codec
    try:
        limit = int(os.environ.get(ENV_PAGES, DEFAULT_PAGES))
    except ValueError:
        limit = DEFAULT_PAGES
    return CapturingCodec(codec, root, limit, meta)


class CapturingCodec(WrappingCodec):
    """Forwards every call to `inner` and records bounded samples of what went through it."""

    def __init__(self, inner: PageCodec, root: str, limit: int, meta: dict | None = None):
        super().__init__(inner)
        self.root = root
        self.limit = max(0, limit)
        meta = dict(meta or {})
        label = str(meta.get("pool_label", "kv"))
        self.dir = os.path.join(root, f"pool_{os.getpid()}_{label}")
        os.makedirs(self.dir, exist_ok=True)
        self._lock = threading.Lock()
        self._page_source: dict[int, tuple[int, str]] = {}  # host page id -> (payload crc, "l2" | "l3")
        self._backup_file: dict[int, str] = {}  # payload crc -> backup file name
        self._loaded: set[tuple[int, str]] = set()  # (crc, source) already saved on load
        self.n_backup = 0
        self.n_loads = {"l2": 0, "l3": 0}  # separate budgets: L2 loads come first and must not starve L3
        self._load_ids: torch.Tensor | None = None
        lay = inner.layout
        meta.update({"page_size": lay.page_size, "start_layer": lay.start_layer, "page_bytes": lay.page_bytes,
                     "tag": lay.tag, "codec": inner.name,
                     "device_dtype": str(inner.device_kv.buffers()[0][0].dtype)})
        meta.setdefault("shape", {f: getattr(lay.shape, f) for f in (
            "num_layers", "heads", "head_dim", "v_head_dim", "is_mla", "kv_lora_rank", "qk_rope_head_dim")})
        with open(os.path.join(self.dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        logger.warning("kvtuner_hicache DEBUG CAPTURE on (%s=%s): up to %d pages -> %s", ENV_DIR, root,
                       self.limit, self.dir)

    # ---- helpers ------------------------------------------------------------------------------

    def _paused(self) -> bool:
        return os.path.exists(os.path.join(self.root, PAUSE_FILE))

    def _rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Device rows of every buffer, all local layers, on the current stream -> CPU [L, ps, H, D] each."""
        return [torch.stack([buf[rows.to(buf.device)] for buf in per]).cpu() for per in self.device_kv.buffers()]

    def _sync(self) -> None:
        if self.device_kv.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    def _save(self, name: str, obj: dict) -> None:
        torch.save(obj, os.path.join(self.dir, name))

    # ---- the interface ------------------------------------------------------------------------

    def backup(self, host_page_ids: torch.Tensor, device_rows: torch.Tensor, planes: torch.Tensor | None = None) -> None:
        self.inner.backup(host_page_ids, device_rows, planes)
        page_ids = [int(p) for p in host_page_ids.tolist()]
        with self._lock:
            for pid in page_ids:  # these host pages now hold other data
                self._page_source.pop(pid, None)
        if self.n_backup >= self.limit or not page_ids or self._paused():
            return
        ps = self.layout.page_size
        rows = self._rows(device_rows[:ps])  # the first page of the call: the start of a new radix node
        self._sync()
        pid = page_ids[0]
        crc = payload_crc(self.host_pages[pid].cpu())
        name = f"backup_{self.n_backup:04d}.pt"
        self._save(name, {"pid": pid, "crc": crc, "rows": rows})
        with self._lock:
            self._page_source[pid] = (crc, "l2")
            self._backup_file[crc] = name
            self.n_backup += 1

    def pages_written(self, host_page_ids: Sequence[int]) -> None:
        self.inner.pages_written(host_page_ids)
        for pid in host_page_ids:
            pid = int(pid)
            with self._lock:
                self._page_source.pop(pid, None)
                if not self._backup_file:
                    continue
            crc = payload_crc(self.host_pages[pid].cpu())
            with self._lock:
                if crc in self._backup_file:
                    self._page_source[pid] = (crc, "l3")

    def load_layer(self, layer: int, page_ids: torch.Tensor, device_rows: torch.Tensor,
                   planes: torch.Tensor | None = None, *, cpu_page_ids: torch.Tensor | None = None) -> None:
        self.inner.load_layer(layer, page_ids, device_rows, planes, cpu_page_ids=cpu_page_ids)
        if layer != self.layout.num_layers - 1 or min(self.n_loads.values()) >= self.limit:
            return
        # a page loaded with a refinement plane is not its page's floor decode: not a capture of the page
        refined = set() if planes is None else set(torch.nonzero((planes >= 0).any(0)).flatten().tolist())
        with self._lock:
            if not self._page_source:
                return
            cand = [(i, p, self._page_source.get(p)) for i, p in enumerate(page_ids.tolist())]
            cand = [(i, p, fs) for i, p, fs in cand
                    if fs is not None and fs not in self._loaded and self.n_loads[fs[1]] < self.limit and i not in refined]
        ps = self.layout.page_size
        for i, pid, (crc, source) in cand:
            if self.n_loads[source] >= self.limit:
                continue
            rows = self._rows(device_rows[i * ps:(i + 1) * ps])  # ordered after the load on this stream
            name = f"load_{source}_{self.n_loads[source]:04d}.pt"
            self._save(name, {"pid": pid, "crc": crc, "source": source, "backup": self._backup_file[crc],
                              "rows": rows})
            with self._lock:
                self._loaded.add((crc, source))
                self.n_loads[source] += 1

    def describe(self) -> str:
        return f"{self.inner.describe()} + DEBUG capture"

    @property
    def n_load(self) -> int:
        return sum(self.n_loads.values())


__all__ = ["DEFAULT_PAGES", "ENV_DIR", "ENV_PAGES", "PAUSE_FILE", "CapturingCodec", "payload_crc", "wrap_if_enabled"]
