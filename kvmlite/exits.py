"""VM exits decoded into typed values (rust-vmm's ``VcpuExit`` in Python).

``Vcpu.run()`` returns one of these; the run loop ``match``es on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .kvm import lib

# The two port-I/O exits are NamedTuples: they happen thousands of times a
# second and a tuple is the cheapest object Python builds.  The rest are rare.


class IoOut(NamedTuple):
    """The guest wrote `value` (`size` bytes) to `port`."""
    port: int
    size: int
    value: int


class IoOutString(NamedTuple):
    """A string OUT (REP OUTS): `data` holds count × size bytes for `port`."""
    port: int
    size: int
    data: bytes


class IoIn(NamedTuple):
    """The guest reads `count` × `size` bytes from `port`; answer with Vcpu.complete_io_in."""
    port: int
    size: int
    count: int


@dataclass(slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(slots=True)
class MmioRead:
    addr: int
    length: int


@dataclass(slots=True)
class Hlt:
    """HLT with nothing to wake the vCPU (no in-kernel interrupt controller)."""


@dataclass(slots=True)
class Shutdown:
    """The vCPU shut down: a triple fault, or an exception KVM could not deliver."""


@dataclass(slots=True)
class FailEntry:
    """VM entry failed: the vCPU's state is invalid for the hardware."""
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(slots=True)
class InternalError:
    """KVM could not handle something itself, typically an instruction it cannot emulate."""
    suberror: int
    data: tuple[int, ...]

    @property
    def suberror_name(self) -> str:
        return INTERNAL_ERROR_NAMES.get(self.suberror, str(self.suberror))


@dataclass(slots=True)
class SystemEvent:
    type: int


@dataclass(slots=True)
class Debug:
    """KVM_EXIT_DEBUG: a single-step or breakpoint armed with KVM_SET_GUEST_DEBUG.

    `exception` is the vector (1 = #DB, 3 = #BP), `pc` the guest RIP; `dr6`
    says which condition fired (bit 14, BS: single-step), `dr7` what was armed."""
    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(slots=True)
class Interrupted:
    """KVM_RUN returned EINTR: a signal kicked the vCPU out (pause, migration, quit)."""


@dataclass(slots=True)
class DirtyRingFull:
    """KVM_EXIT_DIRTY_RING_FULL: the vCPU's dirty ring is (nearly) full; it runs
    again once its entries are harvested and reset (vstate/dirtylog.py)."""


@dataclass(slots=True)
class Unhandled:
    """An exit kvmlite has no arm for; `reason` is the KVM_EXIT_* number."""
    reason: int
    hardware_exit_reason: int = 0

    @property
    def name(self) -> str:
        return exit_name(self.reason)


INTERRUPTED = Interrupted()
HLT = Hlt()
SHUTDOWN = Shutdown()
DIRTY_RING_FULL = DirtyRingFull()

EXIT_NAMES = {getattr(lib, n): n for n in dir(lib)
              if n.startswith("KVM_EXIT_") and not n.startswith("KVM_EXIT_IO_")}
INTERNAL_ERROR_NAMES = {getattr(lib, n): n for n in dir(lib) if n.startswith("KVM_INTERNAL_ERROR_")}


def exit_name(reason: int) -> str:
    return EXIT_NAMES.get(reason, f"exit reason {reason}")


Exit = (IoOut | IoOutString | IoIn | MmioWrite | MmioRead | Hlt | Shutdown | FailEntry | InternalError
        | SystemEvent | Debug | Interrupted | DirtyRingFull | Unhandled)
