"""KVM state behind a friendly API: the system, a VM, its memory and vCPUs.

Everything here calls the raw bindings in ``kvmlite.kvm`` and turns each
``OSError`` into a :class:`~kvmlite.errors.KvmError` carrying the ioctl's name
and what it was for.  That translation happens once, in :func:`kvm_call`.
"""

from .system import Kvm, kvm_call
from .memory import GuestMemory
from .vm import Vm
from .vcpu import Vcpu

__all__ = ["Kvm", "kvm_call", "GuestMemory", "Vm", "Vcpu"]
