"""`--hicache-storage-backend juicefs`: pages as files in a directory on a mounted JuiceFS volume.

    --hicache-storage-backend juicefs --hicache-storage-backend-config '{"mount_point": "/mnt/jfs"}'

Extra config (JSON): `mount_point` (required), `subdir` ("hicache"), `max_bytes` (int or "64GiB";
total for this server, split evenly over its writing ranks), `eviction_ratio` (0.1: evict down to
90 % of the budget), `require_fuse` (true), `fsync` (false), `op_timeout_s`, `retry_after_s`.

- Start-up: the mount point must exist, be a mount point and be a FUSE mount (fuse.juicefs, or
  any fuse* with a warning); a dead FUSE mount (ENOTCONN) or a plain directory is a start-up error.
- Writes go to a hidden temp file in the same directory and are renamed over the final name
  (os.replace is atomic on JuiceFS), so a reader never sees half a page.
- Each rank keeps an in-memory LRU of its own files (seeded from modification times at start-up)
  and deletes the least recently used ones when its share of `max_bytes` would be exceeded.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from typing import Any

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

from kvtuner_hicache_l3._base import BackendConfigError, ByteObjectStore, as_float, options

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
_TMP_STALE_S = 600.0


def parse_bytes(v: Any) -> int:
    """64 GiB as 68719476736, "64GiB", "64G" (binary) or "64GB" (decimal)."""
    if isinstance(v, bool):
        raise BackendConfigError(f"max_bytes must be a size, got {v!r}")
    if isinstance(v, int | float):
        n = int(v)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(v))
        if not m or m.group(2).lower() not in _UNITS:
            raise BackendConfigError(f"max_bytes: cannot parse size {v!r} (e.g. 68719476736, \"64GiB\")")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise BackendConfigError(f"max_bytes must be positive, got {v!r}")
    return n


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mount_fstype(path: str) -> str | None:
    """Filesystem type of the mount whose mount point is exactly `path` (the last one wins)."""
    real = os.path.realpath(path)
    fstype = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == real:
                    fstype = right.split()[0] if right.split() else None
    except OSError:  # no /proc: fall back to ismount without a type
        return "unknown" if os.path.ismount(real) else None
    return fstype


def check_mount(mount_point: str, require_fuse: bool = True) -> str:
    """Raise BackendConfigError unless `mount_point` is a live (JuiceFS) FUSE mount; return its type."""
    hint = (f"mount the volume first, e.g. `juicefs mount sqlite3:///var/jfs/meta.db {mount_point} -d`, or set "
            "\"mount_point\" in --hicache-storage-backend-config")
    try:
        st = os.stat(mount_point)
    except FileNotFoundError:
        raise BackendConfigError(f"juicefs: mount point {mount_point} does not exist; {hint}") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise BackendConfigError(f"juicefs: {mount_point} is a dead FUSE mount (the JuiceFS client is gone: "
                                     f"{e.strerror}); unmount it (`juicefs umount {mount_point}` or "
                                     f"`fusermount -u {mount_point}`) and mount again") from None
        raise BackendConfigError(f"juicefs: cannot access mount point {mount_point}: {e}") from None
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise BackendConfigError(f"juicefs: mount point {mount_point} is not a directory")
    fstype = mount_fstype(mount_point)
    if fstype is None or not os.path.ismount(mount_point):
        if require_fuse:
            raise BackendConfigError(f"juicefs: {mount_point} is a plain directory, not a mount point; {hint}")
        logger.warning("juicefs: %s is not a mount point; using it anyway (require_fuse=false)", mount_point)
        return fstype or "none"
    if fstype == "fuse.juicefs":
        return fstype
    if fstype.startswith("fuse"):
        logger.warning("juicefs: %s is a %s mount, not fuse.juicefs; using it as a POSIX directory", mount_point, fstype)
        return fstype
    if require_fuse:
        raise BackendConfigError(f"juicefs: {mount_point} is a {fstype} mount, not a JuiceFS (FUSE) mount; {hint} "
                                 "(or pass \"require_fuse\": false to use any directory)")
    logger.warning("juicefs: %s is a %s mount, not FUSE; using it anyway (require_fuse=false)", mount_point, fstype)
    return fstype


class JuiceFSStore(ByteObjectStore):
    engine = "juicefs"

    def __init__(self, storage_config: HiCacheStorageConfig | None, extra: dict[str, Any] | None = None):
        extra = options(storage_config, extra)
        super().__init__(storage_config, extra)
        mp = extra.get("mount_point") or os.environ.get("SGLANG_HICACHE_JUICEFS_MOUNT_POINT")
        if not mp:
            raise BackendConfigError('juicefs: no mount point; pass --hicache-storage-backend-config '
                                     '\'{"mount_point": "/mnt/jfs"}\'')
        self.mount_point = str(mp)
        self.fstype = check_mount(self.mount_point, bool(extra.get("require_fuse", True)))
        subdir = str(extra.get("subdir", "hicache")).strip("/")
        self.dir = os.path.join(self.mount_point, subdir) if subdir else self.mount_point
        self.fsync = bool(extra.get("fsync", False))
        self.eviction_ratio = min(max(as_float(extra, "eviction_ratio", 0.1), 0.0), 0.9)
        cfg = storage_config
        # ranks that write their own files: every TP rank (MHA) or only TP rank 0 (MLA), per PP stage
        writers = (1 if cfg is None or cfg.is_mla_model else cfg.tp_size) * (1 if cfg is None else cfg.pp_size)
        self.max_bytes = parse_bytes(extra.get("max_bytes", DEFAULT_MAX_BYTES))
        self.budget = max(self.max_bytes // writers, 1)
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> size, least recently used first
        self._used = 0
        self._ilock = threading.Lock()
        try:
            os.makedirs(self.dir, exist_ok=True)
            self._scan()
        except OSError as e:
            raise BackendConfigError(f"juicefs: cannot use {self.dir}: {e}") from None
        logger.info("kvtuner_hicache juicefs: %s (%s), %d page file(s) of this rank (%.1f MiB), budget %.1f GiB "
                    "of %.1f GiB over %d writer rank(s)", self.dir, self.fstype, len(self._index),
                    self._used / 2**20, self.budget / 2**30, self.max_bytes / 2**30, writers)

    def describe(self) -> str:
        return f"juicefs:{self.dir}"

    # ---- files --------------------------------------------------------------------------------------

    @staticmethod
    def _name(key: str) -> str:
        return key.replace("/", "-") + ".bin"

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _scan(self) -> None:
        """Seed the LRU with this rank's files (oldest first) and drop stale temp files."""
        ours = f"{self.suffix}.bin"
        found: list[tuple[float, str, int]] = []
        now = time.time()
        with os.scandir(self.dir) as it:
            for e in it:
                try:
                    if e.name.startswith("."):
                        if ours in e.name and ".tmp." in e.name and now - e.stat().st_mtime > _TMP_STALE_S:
                            os.unlink(e.path)  # left by a crashed writer of this rank
                        continue
                    if e.name.endswith(ours) and e.is_file():
                        st = e.stat()
                        found.append((max(st.st_mtime, st.st_atime), e.name, st.st_size))
                except OSError:
                    continue
        for _, name, size in sorted(found):
            self._index[name] = size
            self._used += size

    def _touch(self, name: str, size: int) -> None:
        with self._ilock:
            if name in self._index:
                self._index.move_to_end(name)
            else:
                self._index[name] = size
                self._used += size

    def _make_room(self, size: int) -> bool:
        """Evict this rank's least recently used files until `size` more bytes fit the budget."""
        if size > self.budget:
            return False
        victims: list[tuple[str, int]] = []
        with self._ilock:
            if self._used + size <= self.budget:
                return True
            target = max(int(self.budget * (1.0 - self.eviction_ratio)) - size, 0)
            while self._index and self._used > target:
                name, sz = self._index.popitem(last=False)
                self._used -= sz
                victims.append((name, sz))
        for name, _sz in victims:
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                pass
        with self._lock:
            self.counters.evicted_pages += len(victims)
            self.counters.evicted_bytes += sum(sz for _, sz in victims)
        return True

    # ---- engine operations (run under the deadline; may raise) --------------------------------------

    def _put(self, keys: list[str], blobs: list[memoryview]) -> list[bool]:
        if not os.path.isdir(self.dir):  # a volume mounted again (or formatted anew) after an outage
            os.makedirs(self.dir, exist_ok=True)
        out = []
        for key, blob in zip(keys, blobs, strict=True):
            name = self._name(key)
            path = self._path(name)
            if os.path.exists(path):  # content-addressed: same key, same bytes (maybe from another node)
                self._touch(name, len(blob))
                self._count_skipped()
                out.append(True)
                continue
            if not self._make_room(len(blob)):
                out.append(False)
                continue
            tmp = os.path.join(self.dir, f".{name}.tmp.{os.getpid()}.{threading.get_ident()}")
            try:
                with open(tmp, "wb", buffering=0) as f:
                    n = f.write(blob)
                    if n != len(blob):
                        raise OSError(errno.EIO, f"short write {n}/{len(blob)}")
                    if self.fsync:
                        os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            self._touch(name, len(blob))
            self._count_written(len(blob))
            out.append(True)
        return out

    def _get(self, keys: list[str], targets: list[memoryview]) -> list[int]:
        out = []
        for key, target in zip(keys, targets, strict=True):
            name = self._name(key)
            try:
                with open(self._path(name), "rb", buffering=0) as f:
                    size = os.fstat(f.fileno()).st_size
                    if size != len(target):
                        out.append(-2)
                        continue
                    n = f.readinto(target)
            except FileNotFoundError:
                out.append(-1)
                continue
            if n != len(target):
                out.append(-2)
                continue
            self._touch(name, size)
            out.append(n)
        return out

    def _exists(self, keys: list[str]) -> list[bool]:
        out = []
        for key in keys:
            ok = os.path.exists(self._path(self._name(key)))
            out.append(ok)
            if not ok:
                out.extend([False] * (len(keys) - len(out)))  # prefix semantics: stop at the first miss
                break
        return out

    def _remove(self, keys: list[str]) -> list[bool]:
        out = []
        for key in keys:
            name = self._name(key)
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                pass
            with self._ilock:
                size = self._index.pop(name, None)
                if size is not None:
                    self._used -= size
            out.append(True)
        return out

    def clear(self) -> None:
        """Delete this rank's page files (admin /clear_hicache_storage_backend)."""
        with self._ilock:
            names = list(self._index)
            self._index.clear()
            self._used = 0
        for name in names:
            try:
                os.unlink(self._path(name))
            except OSError:
                pass

    def used_bytes(self) -> int:
        with self._ilock:
            return self._used
