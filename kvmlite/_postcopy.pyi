"""Types of kvmlite._postcopy: the cffi module kvmlite/_postcopy_build.py compiles
at install time against this machine's <linux/userfaultfd.h>: post-copy's fault
and receive threads on the destination, the page server on the source, and thin
userfaultfd helpers, each returning its result or -errno (docs/postcopy.md).
The values come from the headers and the build at install time, so the stub
gives only their types.  tests/unit/test_typing.py checks that it names exactly
what the compiled module has.
"""

from _cffi_backend import FFI, _CDataBase

ffi: FFI

_Ptr = _CDataBase            # a pointer: ffi.new(...), ffi.from_buffer(...), ffi.cast(...), an engine
_In = _CDataBase | bytes     # a const pointer the caller may pass as bytes


class _Lib:
    # <linux/userfaultfd.h>: ioctl numbers, their _IOC numbers, flags; MADV_DONTNEED
    UFFD_API: int
    UFFDIO: int
    UFFDIO_API: int
    UFFDIO_REGISTER: int
    UFFDIO_UNREGISTER: int
    UFFDIO_WAKE: int
    UFFDIO_COPY: int
    UFFDIO_ZEROPAGE: int
    USERFAULTFD_IOC_NEW: int
    _UFFDIO_API: int
    _UFFDIO_REGISTER: int
    _UFFDIO_UNREGISTER: int
    _UFFDIO_WAKE: int
    _UFFDIO_COPY: int
    _UFFDIO_ZEROPAGE: int
    UFFD_EVENT_PAGEFAULT: int
    UFFD_PAGEFAULT_FLAG_WRITE: int
    UFFDIO_REGISTER_MODE_MISSING: int
    UFFDIO_COPY_MODE_DONTWAKE: int
    UFFDIO_ZEROPAGE_MODE_DONTWAKE: int
    UFFD_USER_MODE_ONLY: int
    MADV_DONTNEED: int

    # the destination's page states and link states (kvmlite's own)
    KVMLITE_PC_OTHER: int
    KVMLITE_PC_PENDING: int
    KVMLITE_PC_REQUESTED: int
    KVMLITE_PC_PUSHED: int
    KVMLITE_PC_FAULTED: int
    KVMLITE_PC_FREE: int
    KVMLITE_PC_ZERO_FREE: int
    KVMLITE_PC_ZERO_OTHER: int
    KVMLITE_PC_LINK_NONE: int
    KVMLITE_PC_LINK_UP: int
    KVMLITE_PC_LINK_BROKEN: int
    KVMLITE_PC_LINK_DONE: int
    # the source's page flags
    KVMLITE_PCS_PENDING: int
    KVMLITE_PCS_FREE: int
    KVMLITE_PCS_TO_SEND: int
    KVMLITE_PCS_SENT: int

    # thin helpers
    def kvmlite_uffd_open(self, user_mode_only: int, /) -> int: ...
    def kvmlite_uffd_ioctl(self, fd: int, request: int, arg: _Ptr, /) -> int: ...
    def kvmlite_uffd_discard(self, ram: _Ptr, starts: _Ptr, lengths: _Ptr, n: int,
                             page_size: int, /) -> int: ...
    def kvmlite_touch(self, addr: _Ptr, len: int, page_size: int, /) -> int: ...

    # the destination's engine
    def kvmlite_pc_new(self, uffd: int, ram: _Ptr, ram_gpa: int, npages: int, state: _Ptr,
                       wire: _Ptr, /) -> _Ptr: ...
    def kvmlite_pc_start_faults(self, pc: _Ptr, /) -> int: ...
    def kvmlite_pc_attach(self, pc: _Ptr, sock: int, timeout_ms: int, key: _In, seq0: int, /) -> int: ...
    def kvmlite_pc_wait(self, pc: _Ptr, timeout_ms: int, /) -> int: ...
    def kvmlite_pc_break(self, pc: _Ptr, why: bytes, /) -> None: ...
    def kvmlite_pc_send(self, pc: _Ptr, buf: _In, len: int, /) -> int: ...
    def kvmlite_pc_stats(self, pc: _Ptr, out: _Ptr, /) -> None: ...
    def kvmlite_pc_latencies(self, pc: _Ptr, out: _Ptr, cap: int, /) -> int: ...
    def kvmlite_pc_error(self, pc: _Ptr, out: _Ptr, cap: int, /) -> int: ...
    def kvmlite_pc_requested(self, pc: _Ptr, out: _Ptr, cap: int, /) -> int: ...
    def kvmlite_pc_stop(self, pc: _Ptr, /) -> None: ...
    def kvmlite_pc_free(self, pc: _Ptr, /) -> None: ...
    def kvmlite_pc_now_ns(self, /) -> int: ...

    # the source's page server
    def kvmlite_pcs_new(self, ram: _Ptr, ram_gpa: int, npages: int, flags: _Ptr, wire: _Ptr,
                        /) -> _Ptr: ...
    def kvmlite_pcs_flags(self, flags: _Ptr, pending: _Ptr, free_: _Ptr, npages: int, /) -> None: ...
    def kvmlite_pcs_run(self, s: _Ptr, sock: int, push_batch: int, max_inflight: int, push: int,
                        timeout_ms: int, key: _In, seq0: int, bandwidth: int, /) -> int: ...
    def kvmlite_pcs_cancel(self, s: _Ptr, /) -> None: ...
    def kvmlite_pcs_leftover(self, s: _Ptr, out: _Ptr, cap: int, /) -> int: ...
    def kvmlite_pcs_stats(self, s: _Ptr, out: _Ptr, /) -> None: ...
    def kvmlite_pcs_error(self, s: _Ptr, out: _Ptr, cap: int, /) -> int: ...
    def kvmlite_pcs_free(self, s: _Ptr, /) -> None: ...


lib: _Lib
