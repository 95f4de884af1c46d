"""`--hicache-storage-backend lmcache`: pages as objects in an LMCache server (legacy `lm://` protocol).

    lmcache_server 127.0.0.1 65432 cpu        # the LMCache side (pip install lmcache)
    --hicache-storage-backend lmcache --hicache-storage-backend-config '{"endpoint": "localhost:65432"}'

Extra config (JSON): `endpoint` ("host:port" or "lm://host:port", required), `connect_timeout_s` (3),
`op_timeout_s` (10), `retry_after_s` (5).

We speak the server's TCP protocol ourselves (a few struct-packed messages, described below), so the
SGLang process needs no `lmcache` install and no second torch. Wire format, little-endian int32:
- request, 186 bytes: command, length, memory format, dtype code, location, shape[4], then the key
  as 150 bytes of text. Commands: PUT 1 (followed by `length` payload bytes, no reply), GET 2,
  EXIST 3, HEALTH 5.
- reply, 36 bytes: code (200 found / 400 not found), length, format, dtype, shape[4], location;
  a GET hit is followed by `length` payload bytes.
The server parses keys as `model@world_size@worker_id@hex_chunk_hash@dtype`; ours is
`kvtuner_hicache@1@0@<sha256 of our full key>@uint8` (the full key is far longer than 150 bytes
allows). Each connection is served in order, so a HEALTH answered after a run of PUTs proves the
server has taken them all. The legacy server keeps objects in its RAM and never evicts.

The protocol has no delete: a key invalidated after a bad read (`invalidate_keys`) is a miss for
this process and is overwritten by its next write (PUT replaces an object); other processes
sharing the server check pages themselves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import threading
from typing import Any

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

from kvtuner_hicache_l3._base import BackendConfigError, ByteObjectStore, as_float, options

logger = logging.getLogger(__name__)

_REQ = struct.Struct("<9i150s")
_REP = struct.Struct("<9i")
PUT, GET, EXIST, HEALTH = 1, 2, 3, 5
OK, NOT_FOUND = 200, 400
FMT_BINARY = 4  # LMCache MemoryFormat.BINARY: an opaque byte blob, shape [length, 0, 0, 0]
DTYPE_UINT8 = 6
KEY_BYTES = 150


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    ep = str(endpoint).strip()
    for scheme in ("lm://", "tcp://"):
        if ep.startswith(scheme):
            ep = ep[len(scheme):]
    host, sep, port = ep.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BackendConfigError(f"lmcache: endpoint must be host:port (e.g. localhost:65432), got {endpoint!r}")
    return host.strip("[]"), int(port)


def wire_key(full_key: str) -> bytes:
    k = f"kvtuner_hicache@1@0@{hashlib.sha256(full_key.encode()).hexdigest()}@uint8".encode()
    return k.ljust(KEY_BYTES)


def request(cmd: int, key: bytes, length: int = 0) -> bytes:
    return _REQ.pack(cmd, length, FMT_BINARY, DTYPE_UINT8, 0, length, 0, 0, 0, key)


class _Conn:
    def __init__(self, host: str, port: int, connect_timeout: float, op_timeout: float):
        self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(op_timeout)

    def recv_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("LMCache server closed the connection")
            got += n

    def reply(self) -> tuple[int, int]:
        buf = bytearray(_REP.size)
        self.recv_exact(memoryview(buf))
        code, length = _REP.unpack(buf)[:2]
        return code, length

    def drain(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            k = min(n, len(scratch))
            self.recv_exact(scratch[:k])
            n -= k

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def check_server(endpoint: str, timeout_s: float = 3.0) -> None:
    """Raise BackendConfigError, with the command that fixes it, unless an LMCache server answers at `endpoint`."""
    host, port = parse_endpoint(endpoint)
    try:
        c = _Conn(host, port, timeout_s, timeout_s)
        try:
            c.sock.sendall(request(HEALTH, wire_key("health")))
            code, _ = c.reply()
        finally:
            c.close()
        if code != OK:
            raise ConnectionError(f"health check answered {code}")
    except (OSError, ConnectionError, struct.error) as e:
        raise BackendConfigError(
            f"lmcache: cannot reach an LMCache server at {endpoint} ({type(e).__name__}: {e}); start one "
            f"with `lmcache_server {host} {port} cpu` or fix \"endpoint\" in "
            "--hicache-storage-backend-config") from None


class LMCacheStore(ByteObjectStore):
    engine = "lmcache"

    def __init__(self, storage_config: HiCacheStorageConfig | None, extra: dict[str, Any] | None = None):
        extra = options(storage_config, extra)
        super().__init__(storage_config, extra)
        self._stale: set[str] = set()  # invalidated full keys: misses until overwritten
        self._slock = threading.Lock()
        endpoint = extra.get("endpoint") or os.environ.get("SGLANG_HICACHE_LMCACHE_ENDPOINT")
        if not endpoint:
            raise BackendConfigError('lmcache: no server; pass --hicache-storage-backend-config '
                                     '\'{"endpoint": "localhost:65432"}\'')
        self.endpoint = str(endpoint)
        self.host, self.port = parse_endpoint(self.endpoint)
        self.connect_timeout_s = as_float(extra, "connect_timeout_s", 3.0)
        self._tls = threading.local()
        self._gen = 0  # bumped on failure: every thread drops its (possibly broken) connection
        self._conns: list[_Conn] = []
        self._clock = threading.Lock()
        check_server(self.endpoint, self.connect_timeout_s)  # fail at start-up, not on the first request
        logger.info("kvtuner_hicache lmcache: server at %s:%d answers", self.host, self.port)

    def describe(self) -> str:
        return f"lmcache:{self.host}:{self.port}"

    # ---- connections (one per worker thread; requests on one connection are pipelined) ---------------

    def _conn(self) -> _Conn:
        c = getattr(self._tls, "conn", None)
        if c is not None and getattr(self._tls, "gen", -1) == self._gen:
            return c
        if c is not None:
            c.close()
        c = _Conn(self.host, self.port, self.connect_timeout_s, self.op_timeout_s)
        self._tls.conn, self._tls.gen = c, self._gen
        with self._clock:
            self._conns.append(c)
        return c

    def _on_failure(self) -> None:
        with self._clock:
            self._gen += 1
            conns, self._conns = self._conns, []
        for c in conns:  # also unblocks a worker stuck in recv on a silent server
            c.close()

    def _close_engine(self) -> None:
        self._on_failure()

    # ---- engine operations -------------------------------------------------------------------------

    def _exists_wire(self, c: _Conn, wkeys: list[bytes]) -> list[bool]:
        c.sock.sendall(b"".join(request(EXIST, k) for k in wkeys))
        return [c.reply()[0] == OK for _ in wkeys]

    def _is_stale(self, keys: list[str]) -> list[bool]:
        if not self._stale:
            return [False] * len(keys)
        with self._slock:
            return [k in self._stale for k in keys]

    def _remove(self, keys: list[str]) -> list[bool]:
        with self._slock:
            self._stale.update(keys)
        return [True] * len(keys)

    def _put(self, keys: list[str], blobs: list[memoryview]) -> list[bool]:
        c = self._conn()
        wkeys = [wire_key(k) for k in keys]
        stale = self._is_stale(keys)
        # content-addressed: skip pages already stored, except invalidated ones (overwritten)
        present = [p and not s for p, s in zip(self._exists_wire(c, wkeys), stale, strict=True)]
        sent: list[int] = []
        for i, (wk, blob) in enumerate(zip(wkeys, blobs, strict=True)):
            if present[i]:
                self._count_skipped()
                continue
            c.sock.sendall(request(PUT, wk, len(blob)))
            c.sock.sendall(blob)
            sent.append(i)
        if sent:
            c.sock.sendall(request(HEALTH, wire_key("health")))  # answered only after every PUT above
            code, _ = c.reply()
            if code != OK:
                raise ConnectionError(f"LMCache server answered {code} after PUT")
            for i in sent:
                self._count_written(len(blobs[i]))
            if any(stale):
                with self._slock:
                    self._stale.difference_update(keys[i] for i in sent)
        return [True] * len(keys)

    def _get(self, keys: list[str], targets: list[memoryview]) -> list[int]:
        c = self._conn()
        c.sock.sendall(b"".join(request(GET, wire_key(k)) for k in keys))
        out = []
        for target, stale in zip(targets, self._is_stale(keys), strict=True):
            code, length = c.reply()
            if stale and code == OK:  # invalidated: drain the old object, report a miss
                c.drain(length)
                out.append(-1)
                continue
            if code != OK:
                out.append(-1)
            elif length != len(target):
                c.drain(length)  # keep the stream in step, then count the object as corrupt
                out.append(-2)
            else:
                c.recv_exact(target)
                out.append(length)
        return out

    def _exists(self, keys: list[str]) -> list[bool]:
        found = self._exists_wire(self._conn(), [wire_key(k) for k in keys])
        return [f and not s for f, s in zip(found, self._is_stale(keys), strict=True)]

    # ---- test / admin helpers --------------------------------------------------------------------------

    def put_raw(self, key: str, payload: bytes) -> None:
        """Store `payload` under our full key for `key` as-is (tests: plant a truncated object)."""
        self._call("write", self._put_raw, self._full(key), payload)

    def _put_raw(self, full_key: str, payload: bytes) -> None:
        c = self._conn()
        c.sock.sendall(request(PUT, wire_key(full_key), len(payload)) + payload + request(HEALTH, wire_key("health")))
        c.reply()
