"""Debug capture of the real L1 <-> L2 <-> L3 path, for bit-exact checks on live traffic.

Off unless `KVTQ_CAPTURE_DIR` is set: then `for_pool()` returns a `Capture` and the quantized host
pool calls it at three clearly marked points (`host_pool.py`); otherwise it returns None and the pool
pays one `is not None` test per call. `benchmark/check_capture.py` reads what this writes.

What is saved (bounded: `KVTQ_CAPTURE_PAGES` backup pages, and as many loads per source, per process):
- on backup (`backup_from_device_all_layer`): for one page of each call, the device bf16 rows that
  were encoded (all local layers, every device buffer) plus the host page id and a CRC32 of the
  quantized payload that landed in the host page (after the write stream is synchronized);
- on L3 -> L2 (`set_from_flat_data_page`): the CRC32 of the page's payload, so that a page coming
  back from storage into another host slot is recognised as a captured one (source "l3");
- on load (`load_to_device_per_layer`, last layer): for every loaded page recognised as captured, the
  rows written to the device for it (gathered on the load stream after the whole load, so nothing is
  read early), with its source: "l2" (host page written by a backup) or "l3" (set from storage).

The payload CRC excludes the header (the L3 proxy writes the CRC field there). Nothing is saved while
`<dir>/PAUSE` exists (warm-up traffic); the check is one `os.path.exists` per call, in capture mode only.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from typing import Any

import torch

from kvtuner_hicache.page_format import HEADER_BYTES

logger = logging.getLogger(__name__)

ENV_DIR = "KVTQ_CAPTURE_DIR"
ENV_PAGES = "KVTQ_CAPTURE_PAGES"
DEFAULT_PAGES = 24
PAUSE_FILE = "PAUSE"


def for_pool(pool: Any) -> Capture | None:
    """A Capture for this host pool when KVTQ_CAPTURE_DIR is set, else None."""
    root = os.environ.get(ENV_DIR, "").strip()
    if not root:
        return None
    try:
        limit = int(os.environ.get(ENV_PAGES, DEFAULT_PAGES))
    except ValueError:
        limit = DEFAULT_PAGES
    return Capture(pool, root, limit)


def payload_crc(page: torch.Tensor) -> int:
    """CRC32 of a host page's payload (bytes after the header), page = uint8 [page_bytes] on the CPU."""
    return zlib.crc32(page[HEADER_BYTES:].numpy().tobytes())


class Capture:
    """Per-process capture state of one quantized host pool."""

    def __init__(self, pool: Any, root: str, limit: int):
        from kvtuner_hicache.sglang_ext.args import config_to_json

        self.pool = pool
        self.root = root
        self.limit = max(0, limit)
        self.dir = os.path.join(root, f"pool_{os.getpid()}_{pool.pool_label}")
        os.makedirs(self.dir, exist_ok=True)
        self._lock = threading.Lock()
        self._pid_fp: dict[int, tuple[int, str]] = {}  # host page id -> (payload crc, "l2" | "l3")
        self._fps: dict[int, str] = {}  # payload crc -> backup file name
        self._loaded: set[tuple[int, str]] = set()  # (crc, source) already saved on load
        self.n_backup = 0
        self.n_loads = {"l2": 0, "l3": 0}  # separate budgets: L2 loads come first and must not starve L3
        pl = pool.page_layout
        meta = {
            "config": json.loads(config_to_json(pool.quant_config)),
            "shape": {f: getattr(pl.shape, f) for f in ("num_layers", "heads", "head_dim", "v_head_dim",
                                                          "is_mla", "kv_lora_rank", "qk_rope_head_dim")},
            "page_size": pool.page_size,
            "start_layer": pl.start_layer,
            "page_bytes": pl.page_bytes,
            "tag": pl.tag,
            "codec": str(getattr(pool.codec, "name", getattr(pool.codec, "__name__", "?"))),
            "device_dtype": str(pool.device_pool.store_dtype),
        }
        with open(os.path.join(self.dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        logger.warning("kvtuner_hicache DEBUG CAPTURE on (%s=%s): up to %d pages -> %s", ENV_DIR, root,
                       self.limit, self.dir)

    # ---- helpers -------------------------------------------------------------------------------

    def _paused(self) -> bool:
        return os.path.exists(os.path.join(self.root, PAUSE_FILE))

    def _rows(self, device_pool: Any, rows: torch.Tensor) -> list[torch.Tensor]:
        """Device rows of every buffer, all local layers, on the current stream -> CPU [L, ps, H, D] each."""
        out = []
        for per_layer in self.pool._device_buffers(device_pool):
            out.append(torch.stack([buf[rows.to(buf.device)] for buf in per_layer]).cpu())
        return out

    def _sync(self) -> None:
        if torch.cuda.is_available() and str(self.pool.device_pool.device).startswith("cuda"):
            torch.cuda.current_stream().synchronize()

    def _save(self, name: str, obj: dict) -> None:
        torch.save(obj, os.path.join(self.dir, name))

    # ---- hooks (called by the host pool) -------------------------------------------------------

    def on_backup(self, device_pool: Any, page_ids: list[int], device_indices: torch.Tensor) -> None:
        """After a backup's encode + DMA were enqueued on the current (write) stream."""
        with self._lock:
            for pid in page_ids:  # these host pages now hold other data
                self._pid_fp.pop(pid, None)
        if self.n_backup >= self.limit or not page_ids or self._paused():
            return
        ps = self.pool.page_size
        i = 0  # the first page of the call: the start of a new radix node
        rows = self._rows(device_pool, device_indices[i * ps : (i + 1) * ps])
        self._sync()
        pid = page_ids[i]
        crc = payload_crc(self.pool.pages[pid])
        name = f"backup_{self.n_backup:04d}.pt"
        self._save(name, {"pid": pid, "crc": crc, "rows": rows})
        with self._lock:
            self._pid_fp[pid] = (crc, "l2")
            self._fps[crc] = name
            self.n_backup += 1

    def on_set_page(self, pid: int) -> None:
        """After an L3 page was copied into host page `pid` (prefetch thread)."""
        with self._lock:
            self._pid_fp.pop(pid, None)
            if not self._fps:
                return
        crc = payload_crc(self.pool.pages[pid])
        with self._lock:
            if crc in self._fps:
                self._pid_fp[pid] = (crc, "l3")

    def on_load_layer(self, device_pool: Any, page_ids: torch.Tensor, device_indices: torch.Tensor, layer_id: int) -> None:
        """After load_to_device_per_layer enqueued layer `layer_id` on the current (load) stream."""
        if layer_id != self.pool.layer_num - 1 or min(self.n_loads.values()) >= self.limit:
            return
        with self._lock:
            if not self._pid_fp:
                return
            cand = [(i, p, self._pid_fp.get(p)) for i, p in enumerate(page_ids.tolist())]
            cand = [(i, p, fs) for i, p, fs in cand
                    if fs is not None and fs not in self._loaded and self.n_loads[fs[1]] < self.limit]
        ps = self.pool.page_size
        for i, pid, (crc, source) in cand:
            if self.n_loads[source] >= self.limit:
                continue
            rows = self._rows(device_pool, device_indices[i * ps : (i + 1) * ps])  # ordered after the load
            name = f"load_{source}_{self.n_loads[source]:04d}.pt"
            self._save(name, {"pid": pid, "crc": crc, "source": source, "backup": self._fps[crc], "rows": rows})
            with self._lock:
                self._loaded.add((crc, source))
                self.n_loads[source] += 1

    @property
    def n_load(self) -> int:
        return sum(self.n_loads.values())
