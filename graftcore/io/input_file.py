"""Reading byte ranges of one input file the cheapest way: from the page cache when they are there, with
O_DIRECT from the disk when they are not.

On the 2-core development machine a buffered read of a cold file costs as much CPU as the merge itself
(three concurrent `cat`s of a 6.6 GB trio: 5-8 s of system time, the page cache allocating pages and copying
them out), while O_DIRECT reads of 4 MiB reach the same wall time with 0.25 s of system time: the disk
writes straight into our buffer, and nothing is left in the page cache to evict later. A range already in
the page cache (a warm rerun) is copied from it instead. Which one is decided per read run by asking the
kernel which pages are resident (PageMap: mincore on a mapping that is never touched).

O_DIRECT wants the buffer address, file offset and length aligned to the device's block: every run is read
as the BLOCK-aligned range around it into a BLOCK-aligned place of the buffer (stream/readers.py lays runs out so).
Where the filesystem refuses O_DIRECT (tmpfs, some network filesystems), plain buffered reads are used.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from graftcore.errors import CheckpointError
from graftcore.shapes import cdiv

BLOCK = 4096  # O_DIRECT alignment of addresses, offsets and lengths (the largest logical block in common use)
PAGE = mmap.PAGESIZE


def _libc():
    """(libc for mmap/munmap, which releases the GIL: a mapping of a file on NFS may wait on the server; libc for
    mincore, which keeps it: mincore answers in microseconds, and releasing the GIL around it cost every probe
    a wait to take it back behind the compute threads, seconds per GB on 2 cores), or None."""
    try:
        maps, probe = ctypes.CDLL(None, use_errno=True), ctypes.PyDLL(None, use_errno=True)
        maps.mmap.restype = ctypes.c_void_p
        maps.mmap.argtypes = (
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int64,
        )
        maps.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        probe.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        return maps, probe
    except (OSError, AttributeError):  # not Linux/glibc: no residency probe, buffered reads only
        return None


_LIBC = _libc()  # (maps, probe) or None
_MAP_FAILED = ctypes.c_void_p(-1).value
_ODD = bytes(range(1, 256, 2))  # mincore's "resident" bit is the lowest one


class PageMap:
    """Which pages of an open file are in the page cache, asked through one mapping of the whole file made when
    it is opened (never touched: no page is faulted in, and a file truncated later cannot raise SIGBUS). One
    mapping per file, not one per probe: mapping and unmapping 4 MiB per read run took the kernel's mmap lock
    and shot down TLBs thousands of times per GB.

        >>> pages = PageMap(fd, os.fstat(fd).st_size)      # doctest: +SKIP
        >>> pages.resident(0, 4 << 20)                     # doctest: +SKIP
        True
    """

    def __init__(self, fd: int, size: int):
        self.size = size
        self.addr = None
        if _LIBC is not None and size > 0:
            addr = _LIBC[0].mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            self.addr = None if addr in (None, _MAP_FAILED) else addr

    def resident(self, start: int, length: int) -> bool:
        """Whether every page of [start, start+length) is in the page cache (False if unknown)."""
        if self.addr is None or length <= 0 or start + length > self.size:
            return self.addr is not None and length <= 0
        lo = start - start % PAGE
        n = start + length - lo
        vec = ctypes.create_string_buffer((n + PAGE - 1) // PAGE)
        if _LIBC[1].mincore(self.addr + lo, n, vec) != 0:
            return False
        return not vec.raw.translate(None, _ODD)  # no even byte left: every page resident

    def close(self) -> None:
        addr, self.addr = self.addr, None
        if addr is not None:
            _LIBC[0].munmap(addr, self.size)


def read_exactly(fd: int, into: memoryview, offset: int, need: int, where: str, tensor: str) -> None:
    """preadv into `into` until `need` bytes are in (short reads are continued); an EOF first is a CheckpointError
    naming the file (`where`) and the tensor."""
    done = 0
    while done < need:
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise CheckpointError(
                f"{where}: file ended at byte {offset + done} while reading tensor {tensor!r} (it needs "
                f"bytes up to {offset + need}); the file was truncated or replaced during the merge"
            )
        done += n


class InputFile:
    """One open input file: a buffered descriptor, and an O_DIRECT one where the filesystem allows it."""

    def __init__(self, path, where: str):
        self.where = where  # for messages: the path, or org/name@rev/file
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{where}: cannot open ({e.strerror or e})") from None
        try:
            self.direct_fd: int | None = (
                os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) if hasattr(os, "O_DIRECT") else None
            )
        except OSError:
            self.direct_fd = None
        self.direct_ok = self.direct_fd is not None
        self.pages = PageMap(self.fd, os.fstat(self.fd).st_size) if self.direct_ok else None

    def read_run(self, view: memoryview, at: int, start: int, end: int, tensor: str, drop_behind: bool) -> bool:
        """File bytes [start, end) into view[at : at + end - start]; True if read with O_DIRECT, False if copied
        from the page cache. `at` is congruent to `start` modulo BLOCK and the view has room for the
        BLOCK-aligned range around the run: its bytes outside the run may be overwritten (stream/readers.py gives
        every run blocks of its own)."""
        direct_fd = self.direct_fd if self.direct_ok else None  # two I/O workers may read one file at once
        if direct_fd is not None and not self.pages.resident(start, end - start):
            lo = start - start % BLOCK
            hi = cdiv(end, BLOCK) * BLOCK
            try:
                read_exactly(
                    direct_fd, view[at - (start - lo) : at - (start - lo) + hi - lo], lo, end - lo, self.where, tensor
                )
                return True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct_ok = False  # the filesystem refuses O_DIRECT after all: read buffered (closed in close())
        read_exactly(self.fd, view[at : at + end - start], start, end - start, self.where, tensor)
        if drop_behind:  # out of core: what was cached before is not worth keeping either
            os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
        return False

    def will_need(self, start: int, length: int) -> None:
        """Ask the kernel to read ahead, only where the reads are buffered (with O_DIRECT it would read twice)."""
        if not self.direct_ok:
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> os.stat_result:
        """Close both descriptors; returns the file's stat taken just before."""
        try:
            return os.fstat(self.fd)
        finally:
            if self.pages is not None:
                self.pages.close()
            os.close(self.fd)
            if self.direct_fd is not None:
                os.close(self.direct_fd)
