"""userfaultfd(2) on guest RAM: the friendly layer over kvmlite._postcopy's raw bindings.

A range registered in MISSING mode makes every access to a page that is not
mapped wait until a handler places one (UFFDIO_COPY / UFFDIO_ZEROPAGE).  KVM
reads guest RAM through the same host mapping, so a vCPU touching a missing
page blocks inside KVM_RUN the same way; that is what post-copy migration
builds on (docs/postcopy.md).
"""

from __future__ import annotations

import errno
import os

from .._postcopy import ffi, lib
from ..errors import UserfaultError

# The ioctls a MISSING-mode range must offer for post-copy to resolve its faults.
NEEDED_IOCTLS = {"UFFDIO_COPY": lib._UFFDIO_COPY, "UFFDIO_ZEROPAGE": lib._UFFDIO_ZEROPAGE,
                 "UFFDIO_WAKE": lib._UFFDIO_WAKE}


def _fail(what: str, err: int, context: str = "") -> UserfaultError:
    ctx = f" ({context})" if context else ""
    return UserfaultError(f"{what} failed{ctx}: {errno.errorcode.get(err, err)}: {os.strerror(err)}")


class Userfault:
    """One userfaultfd, for faults taken in user mode and inside the kernel (KVM's)."""

    def __init__(self) -> None:
        fd = lib.kvmlite_uffd_open(0)
        if fd < 0:
            err = -fd
            if err in (errno.EPERM, errno.EACCES):
                raise UserfaultError(
                    "userfaultfd for faults KVM takes inside the kernel is not allowed here: "
                    "it needs read-write access to /dev/userfaultfd, or CAP_SYS_PTRACE, or "
                    "sysctl vm.unprivileged_userfaultfd=1 (post-copy needs it on the destination)")
            if err == errno.ENOSYS:
                raise UserfaultError("this kernel has no userfaultfd (CONFIG_USERFAULTFD): "
                                     "post-copy is not available")
            raise _fail("userfaultfd", err)
        self.fd = fd
        api = ffi.new("struct uffdio_api *", {"api": lib.UFFD_API, "features": 0})
        r = lib.kvmlite_uffd_ioctl(fd, lib.UFFDIO_API, api)
        if r < 0:
            os.close(fd)
            raise _fail("UFFDIO_API", -r)
        self.ranges: list[tuple[int, int]] = []

    def register(self, addr: int, length: int) -> None:
        """Register [addr, addr + length) in MISSING mode; check the range offers what post-copy uses."""
        reg = ffi.new("struct uffdio_register *", {"range": {"start": addr, "len": length},
                                                   "mode": lib.UFFDIO_REGISTER_MODE_MISSING})
        r = lib.kvmlite_uffd_ioctl(self.fd, lib.UFFDIO_REGISTER, reg)
        context = f"host range {addr:#x}+{length:#x}"
        if r < 0:
            raise _fail("UFFDIO_REGISTER", -r, context)
        self.ranges.append((addr, length))
        missing = [name for name, bit in NEEDED_IOCTLS.items() if not reg.ioctls >> bit & 1]
        if missing:
            self.unregister(addr, length)
            raise UserfaultError(f"UFFDIO_REGISTER ({context}) does not offer {', '.join(missing)}")

    def unregister(self, addr: int, length: int) -> None:
        """Stop handling faults there; threads still waiting retry as ordinary faults."""
        rng = ffi.new("struct uffdio_range *", {"start": addr, "len": length})
        r = lib.kvmlite_uffd_ioctl(self.fd, lib.UFFDIO_UNREGISTER, rng)
        if r < 0:
            raise _fail("UFFDIO_UNREGISTER", -r, f"host range {addr:#x}+{length:#x}")
        self.ranges.remove((addr, length))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)      # closing also wakes and releases every waiting fault
            self.fd = -1
