"""/dev/kvm: opening it, its API version, capabilities and supported CPUID."""

from __future__ import annotations

import errno
import os
from typing import Any

from .. import kvm
from ..errors import KvmError, KvmUnavailable
from ..kvm import ffi, lib

KVM_PATH = "/dev/kvm"

# Capabilities kvmlite relies on (required) or uses when present (optional).
REQUIRED_CAPS = ("KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID",
                 "KVM_CAP_IMMEDIATE_EXIT")
OPTIONAL_CAPS = ("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "KVM_CAP_DIRTY_LOG_RING",
                 "KVM_CAP_VCPU_EVENTS", "KVM_CAP_XSAVE", "KVM_CAP_XCRS",
                 "KVM_CAP_GET_TSC_KHZ", "KVM_CAP_NR_MEMSLOTS", "KVM_CAP_MAX_VCPUS",
                 "KVM_CAP_SYNC_MMU",
                 # SMP: --smp N needs the first two; the rest say what a guest gets
                 "KVM_CAP_IRQCHIP", "KVM_CAP_MP_STATE", "KVM_CAP_NR_VCPUS",
                 "KVM_CAP_TSC_DEADLINE_TIMER", "KVM_CAP_X2APIC_API", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL")


def kvm_call(name: str, fn, *args, context: str = ""):
    """Call raw binding `fn`; an OSError becomes a KvmError naming ioctl `name`."""
    try:
        return fn(*args)
    except OSError as e:
        raise KvmError(name, e.errno, context) from None


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path: str = KVM_PATH):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: this kernel has no KVM module loaded "
                "(load kvm_intel, kvm_amd or kvm_pvm, or run on a host that offers KVM)") from None
        except PermissionError:
            raise KvmUnavailable(
                f"no permission to open {path}: run as root or add yourself to the "
                f"group that owns it (usually 'kvm': sudo usermod -aG kvm $USER)") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        self.api_version = kvm_call("KVM_GET_API_VERSION", kvm.KVM_GET_API_VERSION, self.fd)
        if self.api_version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(
                f"{path} speaks KVM API {self.api_version}, kvmlite needs {lib.KVM_API_VERSION}")
        missing = [c for c in REQUIRED_CAPS if not self.check(c)]
        if missing:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} lacks {', '.join(missing)}")
        self._cpuid = None
        self._msrs = None

    def check(self, cap: str | int) -> int:
        """KVM_CHECK_EXTENSION by name or number."""
        number = getattr(lib, cap) if isinstance(cap, str) else cap
        return kvm_call("KVM_CHECK_EXTENSION", kvm.KVM_CHECK_EXTENSION, self.fd, number,
                        context=str(cap))

    def capabilities(self) -> dict[str, int]:
        return {c: self.check(c) for c in REQUIRED_CAPS + OPTIONAL_CAPS}

    @property
    def vcpu_mmap_size(self) -> int:
        return kvm_call("KVM_GET_VCPU_MMAP_SIZE", kvm.KVM_GET_VCPU_MMAP_SIZE, self.fd)

    def supported_cpuid(self) -> Any:
        """`struct kvm_cpuid2 *` with every CPUID leaf KVM can give a guest."""
        if self._cpuid is None:
            n = 64
            while True:
                cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
                try:
                    kvm.KVM_GET_SUPPORTED_CPUID(self.fd, cpuid)
                    break
                except OSError as e:
                    # E2BIG: the buffer was too small; the kernel wants more entries.
                    if e.errno != errno.E2BIG or n >= 4096:
                        raise KvmError("KVM_GET_SUPPORTED_CPUID", e.errno) from None
                    n *= 2
            self._cpuid = cpuid
        return self._cpuid

    def msr_index_list(self) -> list[int]:
        n = 512
        msrs = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        kvm_call("KVM_GET_MSR_INDEX_LIST", kvm.KVM_GET_MSR_INDEX_LIST, self.fd, msrs)
        return [msrs.indices[i] for i in range(msrs.nmsrs)]

    def migratable_msrs(self) -> list[int]:
        """The MSRs kvmlite migrates (kvmlite.msr.MIGRATED) that this KVM can save."""
        if self._msrs is None:
            from ..msr import MIGRATED
            available = set(self.msr_index_list())
            self._msrs = [m for m in MIGRATED if m in available]
        return self._msrs

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
