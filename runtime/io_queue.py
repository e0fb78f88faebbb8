"""The I/O queue: background threads that read expert planes into slots.

A request reads one expert plane (gate, up, down stored back to back in a
shard) straight into its three slot views with one ``preadv`` (the gaps
between the parts land in a scratch buffer); the GIL is released while the
kernel copies. Requests are served by priority: demand loads in HEBF order
first, prefetches after. Backends differ in how they keep reads cold:

- ``pread``  buffered read, then ``posix_fadvise(DONTNEED)`` on the span, so
  expert bytes never pile up in the page cache (which on unified-memory
  devices competes with the budget);
- ``direct`` ``O_DIRECT`` straight into page-aligned slots (through an
  aligned bounce buffer where a slot is not);
- ``auto``   ``direct`` where the model's file system serves ``O_DIRECT``
  reads (a probe read of its first shard), else ``pread``.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.checkpoint.base import aligned_empty
from edgemoe.errors import ConfigError, ModelFileError
from edgemoe.format.crc import crc32
from edgemoe.runtime.options import io_kind_error

DEMAND, PREFETCH = 0, 1
PAGE = 4096
"""Alignment of read destinations that O_DIRECT reads land in in place."""


def drop_cached(path) -> None:
    """Evict ``path`` from the page cache, so that its next reads are cold
    (where the platform has ``posix_fadvise``)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclass(order=True)
class ReadRequest:
    """One expert plane to read; ``done`` is set when it is in (or failed)."""

    priority: tuple
    seq: int
    key: tuple = field(compare=False)  # (layer, expert, plane)
    path: Path = field(compare=False)
    offset: int = field(compare=False)
    length: int = field(compare=False)
    parts: tuple = field(compare=False)  # ((offset in span, bytes), ...)
    dest: list = field(compare=False)  # uint8 views, one per part
    crc32: int | None = field(compare=False, default=None)
    done: threading.Event = field(compare=False, default_factory=threading.Event)
    error: Exception | None = field(compare=False, default=None)
    cancelled: bool = field(compare=False, default=False)
    started: float = field(compare=False, default=0.0)
    finished: float = field(compare=False, default=0.0)


class IOQueue(ABC):
    """A priority queue of plane reads served by worker threads."""

    def __init__(self, threads: int = 2, on_done=None, throttle=None):
        """``throttle``: (bytes/s, latency s) of an emulated slower storage;
        reads then finish no sooner than such a device, one at a time, would
        serve them (``--emulate``)."""
        self._throttle = throttle
        self._disk_free = 0.0
        self._heap: list[ReadRequest] = []
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._seq = itertools.count()
        self._threads = [
            threading.Thread(target=self._worker, name=f"edgemoe-io-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        self._on_done = on_done
        self.bytes_read = 0
        self.busy_s = 0.0
        self._started = False

    def start(self) -> None:
        if not self._started:
            for t in self._threads:
                t.start()
            self._started = True

    def submit(self, req: ReadRequest) -> ReadRequest:
        req.seq = next(self._seq)
        with self._cv:
            heapq.heappush(self._heap, req)
            self._cv.notify()
        return req

    def new_seq(self) -> int:
        return next(self._seq)

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._stop.is_set():
                    self._cv.wait()
                if self._stop.is_set() and not self._heap:
                    return
                req = heapq.heappop(self._heap)
            if req.cancelled:
                req.done.set()
                continue
            req.started = time.perf_counter()
            try:
                self.read(req)
                if req.crc32 is not None:
                    crc = 0
                    for d in req.dest:
                        crc = crc32(d, crc)
                    if crc != req.crc32:
                        raise ModelFileError(
                            req.path,
                            f"checksum mismatch in layer {req.key[0]} expert "
                            f"{req.key[1]} plane {req.key[2]}: the shard is corrupt",
                        )
            except ModelFileError as e:
                req.error = e
            except OSError as e:
                req.error = ModelFileError(
                    req.path,
                    f"read failed for layer {req.key[0]} expert "
                    f"{req.key[1]} plane {req.key[2]}: {e.strerror or e}",
                )
            except Exception as e:  # noqa: BLE001 - a dead I/O thread hangs the step
                req.error = ModelFileError(
                    req.path,
                    f"read failed for layer {req.key[0]} expert "
                    f"{req.key[1]} plane {req.key[2]}: {type(e).__name__}: {e}",
                )
            if self._throttle is not None:
                self._emulate(req)
            req.finished = time.perf_counter()
            with self._cv:
                self.busy_s += req.finished - req.started
                if req.error is None:
                    self.bytes_read += req.length
            req.done.set()
            if self._on_done is not None:
                self._on_done(req)

    def _emulate(self, req: ReadRequest) -> None:
        """Hold a finished read until the emulated device would have served it."""
        rate, latency = self._throttle
        with self._cv:
            start = max(req.started, self._disk_free)
            self._disk_free = start + latency + req.length / rate
            until = self._disk_free
        delay = until - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def fd(self, path: Path, flags: int = os.O_RDONLY) -> int:
        with self._fd_lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, flags)
            return fd

    @abstractmethod
    def read(self, req: ReadRequest) -> None:
        """Fill ``req.dest`` from the file; raise OSError on failure."""

    def close(self) -> None:
        self._stop.set()
        with self._cv:
            for r in self._heap:
                r.cancelled = True
                r.done.set()
            self._heap.clear()
            self._cv.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=5)
        with self._fd_lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()


class PreadQueue(IOQueue):
    """Buffered ``preadv`` into the slot views, then drop the pages."""

    kind = "pread"

    def read(self, req: ReadRequest) -> None:
        fd = self.fd(req.path)
        bufs, pos = [], 0
        for (off, n), dest in zip(req.parts, req.dest):
            if off > pos:
                bufs.append(bytearray(off - pos))  # the alignment gap
            bufs.append(memoryview(dest).cast("B"))
            pos = off + n
        got = os.preadv(fd, bufs, req.offset)
        if got != pos:
            raise ModelFileError(
                req.path, f"truncated: wanted {pos} bytes at {req.offset}, got {got}"
            )
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, req.offset, req.length, os.POSIX_FADV_DONTNEED)


class DirectQueue(IOQueue):
    """``O_DIRECT`` reads (no page cache): straight into the slot views where
    every piece is page-aligned (slots of a page multiple, as the usual
    expert shapes give), else through a page-aligned bounce buffer."""

    kind = "direct"

    def __init__(self, threads: int = 2, on_done=None, throttle=None):
        super().__init__(threads, on_done, throttle)
        self._bounce = threading.local()
        self.copied_bytes = 0
        """Bytes that went through the bounce buffer (misaligned reads)."""

    def read(self, req: ReadRequest) -> None:
        fd = self.fd(req.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        bufs = self._in_place(req)
        if bufs is not None:
            got = os.preadv(fd, bufs, req.offset)
            want = sum(len(b) for b in bufs)
            if got != want:
                raise ModelFileError(
                    req.path,
                    f"truncated: wanted {want} bytes at {req.offset}, got {got}",
                )
            return
        start = req.offset - req.offset % PAGE
        end = req.offset + req.length
        size = -(-(end - start) // PAGE) * PAGE
        buf = self._scratch(size)
        got = os.preadv(fd, [memoryview(buf[:size])], start)
        if got < end - start:
            raise ModelFileError(
                req.path, f"truncated: wanted bytes {req.offset}..{end}, got {got}"
            )
        base = req.offset - start
        for (off, n), dest in zip(req.parts, req.dest):
            dest[...] = buf[base + off : base + off + n].reshape(dest.shape)
        with self._cv:
            self.copied_bytes += req.length

    def _in_place(self, req: ReadRequest) -> list | None:
        """The iovecs of a read straight into ``req.dest`` (the gaps between
        parts into scratch), or None where O_DIRECT's alignment rules (file
        offset, address and length of every piece) do not hold."""
        if req.offset % PAGE:
            return None
        bufs, pos = [], 0
        for (off, n), dest in zip(req.parts, req.dest):
            if off % PAGE or n % PAGE or dest.ctypes.data % PAGE:
                return None
            if not dest.flags.c_contiguous or dest.nbytes != n:
                return None
            if off > pos:
                bufs.append(memoryview(self._scratch(off - pos)[: off - pos]))
            bufs.append(memoryview(dest).cast("B"))
            pos = off + n
        return bufs

    def _scratch(self, size: int) -> np.ndarray:
        buf = getattr(self._bounce, "buf", None)
        if buf is None or buf.nbytes < size:
            buf = self._bounce.buf = aligned_empty((size,), np.uint8, PAGE)
        return buf


def direct_reads_work(path: Path) -> bool:
    """Whether ``path``'s file system serves ``O_DIRECT`` reads: tmpfs before
    Linux 6.6 and some FUSE and network file systems refuse the flag at open
    or at the read."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buf = aligned_empty((PAGE,), np.uint8, PAGE)
        os.preadv(fd, [memoryview(buf)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def get_io_backend(
    kind: str = "pread",
    threads: int = 2,
    on_done=None,
    throttle=None,
    probe: Path | None = None,
) -> IOQueue:
    """The I/O queue for ``kind``: "pread", "direct" (O_DIRECT) or "auto"
    (direct where a read of ``probe`` with O_DIRECT works); ``throttle``
    (bytes/s, latency s) emulates slower storage."""
    if kind == "auto":
        kind = "direct" if probe is not None and direct_reads_work(probe) else "pread"
    if kind == "pread":
        return PreadQueue(threads, on_done, throttle)
    if kind == "direct":
        if not hasattr(os, "O_DIRECT"):
            raise ConfigError("O_DIRECT is not available on this platform")
        return DirectQueue(threads, on_done, throttle)
    raise ConfigError(io_kind_error(kind))
