"""The host indices of a load, on the CPU as well as on the GPU.

With `--hicache-io-backend kernel` SGLang's controller moves a load's host indices to the GPU
(`HiCacheController.move_indices`, every supported release) before it calls the host pool's
`load_to_device_per_layer` once per layer. The radix tree gave them to the controller on the CPU. A
quantized pool wants both: the GPU copy for its kernels, the CPU one to address host pages without
reading the GPU copy back (a device read waits for everything queued before it, the forward pass too).

Contract (installed by the plugin's tree-cache hook on every controller over a quantized pool):
- `track(controller, pool)` wraps the controller's `move_indices` on the instance; every call still returns
  what SGLang's returns. When the host indices came in on the CPU, the pool's `note_load_indices(moved,
  original)` is told which GPU tensor holds them (O(1): a reference, no copy).
- The pool matches a later `load_to_device_per_layer(host_indices=...)` to that GPU tensor by identity,
  so a load whose indices took another route (another release, another caller) simply has no CPU copy:
  the pool then uses the GPU indices alone, as before this module.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)


def track(controller: Any, pool: Any) -> bool:
    """Tell `pool` the CPU original of every host-index tensor `controller` moves; True when installed."""
    move = getattr(controller, "move_indices", None)
    note = getattr(pool, "note_load_indices", None)
    if move is None or note is None or getattr(move, "kvtq_tracked", False):
        return False

    @functools.wraps(move)
    def move_indices(host_indices: Any, device_indices: Any, *args: Any, **kwargs: Any) -> Any:
        moved = move(host_indices, device_indices, *args, **kwargs)
        on_cpu = getattr(getattr(host_indices, "device", None), "type", None) == "cpu"
        if on_cpu and isinstance(moved, tuple) and moved and moved[0] is not host_indices:
            note(moved[0], host_indices)
        return moved

    move_indices.kvtq_tracked = True  # type: ignore[attr-defined]
    controller.move_indices = move_indices
    return True
