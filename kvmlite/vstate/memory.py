"""Guest RAM: anonymous host memory that KVM maps at a guest-physical address."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import numpy as np

from ..errors import GuestMemoryError, KvmliteError
from ..kvm import ffi, lib

from ..bitmap import PAGE_SHIFT, PAGE_SIZE  # noqa: F401  (re-exported)


class GuestMemory:
    """One region of guest RAM at `gpa`, `size` bytes, backed by anonymous mmap.

    Nothing is touched at creation, so a 16 GiB guest costs no host memory until
    the guest (or `prefault`) writes to it.  Accessors check every GPA range.
    """

    # Post-copy sets this: a function(offset, length) that brings those bytes'
    # pages in without the GIL, called before Python reads guest memory (a
    # Python thread that faulted on a missing page while it held the GIL would
    # stop every other thread, the recovery's too).
    before_read: Callable[[int, int], None] | None = None

    def __init__(self, size: int, gpa: int = 0, *, prefault: bool = False):
        if size <= 0 or size % PAGE_SIZE:
            raise KvmliteError(f"guest memory size {size} is not a positive multiple of {PAGE_SIZE}")
        self.gpa = gpa
        self.size = size
        self.npages = size >> PAGE_SHIFT
        try:
            self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise KvmliteError(f"cannot reserve {size >> 20} MiB of guest memory: {e.strerror}") from None
        self.view = memoryview(self._map)
        self._cbuf = ffi.from_buffer(self._map)
        self.host_addr = int(ffi.cast("uintptr_t", self._cbuf))
        self._ptr = ffi.cast("char *", self.host_addr)
        self._pagemap: int | None = None
        if prefault:
            self.prefault()

    @property
    def pointer(self):
        """A cffi `char *` to the first byte of guest RAM (for C helpers)."""
        return self._ptr

    def prefault(self) -> None:
        """Populate every page now (as QEMU's -mem-prealloc), so later writes don't fault."""
        r = lib.kvmlite_madvise(self._ptr, self.size, lib.MADV_POPULATE_WRITE)
        if r < 0:
            # Kernels before 5.14 lack MADV_POPULATE_WRITE: touch one byte a page.
            arr = np.frombuffer(self._map, dtype=np.uint8)
            arr[::PAGE_SIZE] = arr[::PAGE_SIZE]

    def contains(self, gpa: int, length: int = 1) -> bool:
        return length >= 0 and self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def _offset(self, gpa: int, length: int) -> int:
        if not self.contains(gpa, length):
            raise GuestMemoryError(gpa, length, self.gpa + self.size)
        return gpa - self.gpa

    def read(self, gpa: int, length: int) -> bytes:
        off = self._offset(gpa, length)
        if self.before_read is not None:
            self.before_read(off, length)
        return self._map[off:off + length]

    def write(self, gpa: int, data: bytes) -> None:
        off = self._offset(gpa, len(data))
        self._map[off:off + len(data)] = data

    def slice(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of guest memory (for sendmsg / recv_into)."""
        off = self._offset(gpa, length)
        if self.before_read is not None:
            self.before_read(off, length)
        return self.view[off:off + length]

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def zero(self, gpa: int, length: int) -> None:
        off = self._offset(gpa, length)
        np.frombuffer(self._map, dtype=np.uint8, count=length, offset=off)[:] = 0

    def zero_pages(self, first_page: int, npages: int) -> np.ndarray:
        """Boolean array: which of `npages` pages from `first_page` hold only zeros."""
        self._offset(self.gpa + (first_page << PAGE_SHIFT), npages << PAGE_SHIFT)
        out = np.empty(npages, dtype=np.uint8)
        lib.kvmlite_zero_pages(self._ptr + (first_page << PAGE_SHIFT), npages, PAGE_SIZE,
                               ffi.from_buffer(out))
        return out.view(bool)

    def zero_page_list(self, pages: np.ndarray) -> np.ndarray:
        """Boolean array: which of the given page numbers hold only zeros."""
        pages = np.ascontiguousarray(pages, dtype=np.int64)
        if len(pages) and (pages.min() < 0 or pages.max() >= self.npages):
            raise GuestMemoryError(self.gpa + (int(pages.max()) << PAGE_SHIFT), PAGE_SIZE,
                                   self.gpa + self.size)
        out = np.empty(len(pages), dtype=np.uint8)
        lib.kvmlite_zero_page_list(self._ptr, ffi.from_buffer("int64_t[]", pages), len(pages), PAGE_SIZE,
                                   ffi.from_buffer(out))
        return out.view(bool)

    def backed_pages(self, first_page: int, npages: int) -> np.ndarray | None:
        """Boolean array: which pages the host has backed (present or swapped out).

        A page of a private anonymous mapping that was never written has no
        backing and reads as zero, so it can be known to be zero without
        touching it (touching would map the zero page, ~1 µs each).  From
        /proc/self/pagemap: bit 63 = present, bit 62 = swapped.  None when
        pagemap cannot be read.
        """
        self._offset(self.gpa + (first_page << PAGE_SHIFT), npages << PAGE_SHIFT)
        if self._pagemap is None:
            try:
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._pagemap = -1
        if self._pagemap < 0:
            return None
        vpn = (self.host_addr >> PAGE_SHIFT) + first_page
        raw = os.pread(self._pagemap, npages * 8, vpn * 8)
        if len(raw) != npages * 8:
            return None
        entries = np.frombuffer(raw, dtype="<u8")
        return (entries >> np.uint64(62)) != 0

    def close(self) -> None:
        """Unmap now if nothing else holds a view of guest memory; else when the last view goes."""
        ffi.release(self._cbuf)
        self.view.release()
        if self._pagemap is not None and self._pagemap >= 0:
            os.close(self._pagemap)
        self._pagemap = None
        try:
            self._map.close()
        except BufferError:
            pass  # e.g. a finished migration's numpy view of the bitmap
