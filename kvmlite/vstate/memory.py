"""Guest RAM: host memory that KVM maps at a guest-physical address.

Two backings: private anonymous memory (the default), or a memfd mapped
shared (`backend="memfd"`, QEMU's memory-backend-memfd), whose descriptor can
be handed to another process: a local migration moves the VM without copying
a page (kvmlite/migration/local.py).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Callable
import stat

import numpy as np

from ..errors import GuestMemoryError, KvmliteError
from ..kvm import ffi, lib

from ..bitmap import PAGE_SHIFT, PAGE_SIZE  # noqa: F401  (re-exported)

BACKENDS = ("anon", "memfd")
# A memfd's size is sealed: a process that shrank it would turn the other's
# accesses to the lost pages into SIGBUS.
MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
MEMFD_NAME = "kvmlite-ram"        # /proc/PID/fd shows it as /memfd:kvmlite-ram


class GuestMemory:
    """One region of guest RAM at `gpa`, `size` bytes.

    `backend="anon"`: private anonymous memory.  `backend="memfd"`: a sealed
    memfd mapped shared; `fd` is its descriptor (None for anon), and
    `GuestMemory.from_fd` adopts one received from another process.
    Nothing is touched at creation, so a 16 GiB guest costs no host memory until
    the guest (or `prefault`) writes to it.  Accessors check every GPA range.
    """

    # Post-copy sets this: a function(offset, length) that brings those bytes'
    # pages in without the GIL, called before Python reads guest memory (a
    # Python thread that faulted on a missing page while it held the GIL would
    # stop every other thread, the recovery's too).
    before_read: Callable[[int, int], None] | None = None

    def __init__(self, size: int, gpa: int = 0, *, prefault: bool = False, backend: str = "anon",
                 fd: int | None = None):
        if size <= 0 or size % PAGE_SIZE:
            raise KvmliteError(f"guest memory size {size} is not a positive multiple of {PAGE_SIZE}")
        if backend not in BACKENDS:
            raise KvmliteError(f"unknown memory backend {backend!r} (one of {', '.join(BACKENDS)})")
        self.gpa = gpa
        self.size = size
        self.npages = size >> PAGE_SHIFT
        self.backend = backend
        self.fd: int | None = None
        try:
            if backend == "anon":
                self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
            else:
                if fd is None:
                    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                    try:
                        os.ftruncate(fd, size)
                        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
                    except OSError:
                        os.close(fd)
                        raise
                self.fd = fd
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            raise KvmliteError(f"cannot reserve {size >> 20} MiB of guest memory ({backend}): "
                               f"{e.strerror}") from None
        self.view = memoryview(self._map)
        self._cbuf = ffi.from_buffer(self._map)
        self.host_addr = int(ffi.cast("uintptr_t", self._cbuf))
        self._ptr = ffi.cast("char *", self.host_addr)
        self._pagemap: int | None = None
        self.preallocated = False      # every page populated at once (query-memdev's prealloc)
        if prefault:
            self.prefault()

    @classmethod
    def from_fd(cls, fd: int, size: int, gpa: int = 0) -> "GuestMemory":
        """Adopt a memfd another process made (a local migration's RAM): it must be a
        memfd of exactly `size` bytes whose size is sealed, or KvmliteError.  The
        GuestMemory owns `fd` from here on, also when it refuses it."""
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)   # EINVAL: not a memfd (nor shmem)
        except OSError as e:
            os.close(fd)
            raise KvmliteError(f"the RAM descriptor is not a memfd ({e.strerror})") from None
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "not a regular file"
        elif st.st_size != size:
            why = f"{st.st_size} bytes, not the {size} of the stream's RAM"
        elif seals & MEMFD_SEALS != MEMFD_SEALS:
            why = "its size is not sealed (F_SEAL_SHRINK and F_SEAL_GROW)"
        if why:
            os.close(fd)
            raise KvmliteError(f"the RAM descriptor is refused: {why}")
        return cls(size, gpa, backend="memfd", fd=fd)

    @property
    def pointer(self):
        """A cffi `char *` to the first byte of guest RAM (for C helpers)."""
        return self._ptr

    def prefault(self) -> None:
        """Populate every page now (as QEMU's -mem-prealloc), so later writes don't fault."""
        if not self.populate(self.gpa, self.size):
            # Kernels before 5.14 lack MADV_POPULATE_WRITE: touch one byte a page.
            arr = np.frombuffer(self._map, dtype=np.uint8)
            arr[::PAGE_SIZE] = arr[::PAGE_SIZE]
        self.preallocated = True

    def populate(self, gpa: int, length: int) -> bool:
        """Back a page-aligned range with memory in one call (MADV_POPULATE_WRITE);
        False if the kernel cannot (before 5.14).  Cheaper than the page faults a
        write into it takes one page at a time (1.4 against 2.3 us a page here)."""
        off = self._offset(gpa, length)
        return lib.kvmlite_madvise(self._ptr + off, length, lib.MADV_POPULATE_WRITE) >= 0

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
        if self.fd is not None:
            return self._file_data_pages(first_page, npages)
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

    def _file_data_pages(self, first_page: int, npages: int) -> np.ndarray:
        """For a memfd: which pages lie in its data extents.

        Not pagemap: a page of a shared file may be in the file (even swapped
        out) without being mapped in this process, e.g. one written by the
        process this RAM came from.  A hole reads as zero, data may not."""
        out = np.zeros(npages, dtype=bool)
        for first, n in self.data_extents(first_page, npages):
            out[first - first_page:first - first_page + n] = True
        return out

    def data_extents(self, first_page: int = 0, npages: int | None = None) -> list[tuple[int, int]]:
        """A memfd's data extents within [first_page, first_page + npages), as
        (first page, pages): the pages the host holds memory for (SEEK_DATA and
        SEEK_HOLE, lseek(2)); the rest are holes, which read as zero."""
        if self.fd is None:
            raise KvmliteError("data extents are a memfd's; this guest memory is anonymous")
        if npages is None:
            npages = self.npages - first_page
        out = []
        pos, end = first_page << PAGE_SHIFT, (first_page + npages) << PAGE_SHIFT
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:             # ENXIO: no data at or after pos
                break
            if data >= end:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            first = data >> PAGE_SHIFT
            out.append((first, ((hole + PAGE_SIZE - 1) >> PAGE_SHIFT) - first))
            pos = hole
        return out

    def punch_pages(self, first: int, npages: int) -> None:
        """Give the host back the memory of pages [first, first + npages): they read
        as zero afterwards, in every process (and VM) that maps this memfd."""
        if self.fd is None:
            raise KvmliteError("punching holes needs memfd-backed guest memory")
        self._offset(self.gpa + (first << PAGE_SHIFT), npages << PAGE_SHIFT)
        mode = lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE   # PUNCH_HOLE requires KEEP_SIZE
        r = lib.kvmlite_fallocate(self.fd, mode, first << PAGE_SHIFT, npages << PAGE_SHIFT)
        if r < 0:
            raise KvmliteError(f"fallocate(PUNCH_HOLE) of pages {first}+{npages}: {os.strerror(-r)}")

    def allocated_bytes(self) -> int | None:
        """Host memory the memfd holds (its allocated blocks), or None for anonymous memory."""
        if self.fd is None:
            return None
        return os.fstat(self.fd).st_blocks * 512     # st_blocks counts 512-byte units (stat(2))

    def close(self) -> None:
        """Unmap now if nothing else holds a view of guest memory; else when the last view goes."""
        ffi.release(self._cbuf)
        self.view.release()
        if self._pagemap is not None and self._pagemap >= 0:
            os.close(self._pagemap)
        self._pagemap = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            self._map.close()
        except BufferError:
            pass  # e.g. a finished migration's numpy view of the bitmap
