"""What kind of KVM this host has: the kernel module behind /dev/kvm.

A guest sees the same architecture on every kind, and the exits a VMM gets for
it are the same (string I/O, for one, goes through KVM's instruction emulator
on all of them).  What differs is where guest code runs, so how fast it runs,
and a few quirks (docs/boot.md, "Why the guest runs in ring 3").  This module
is the one place that answers "which kind is this?": `kvmlite info` prints it
and the labs' checker reports it beside a failure.

It reads /sys/module only: no /dev/kvm, no ioctl, so it also answers on a
machine where KVM cannot be opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SYS_MODULE = "/sys/module"


@dataclass(frozen=True)
class KvmKind:
    module: str          # the vendor module, e.g. "kvm_intel"
    name: str            # what the labs call it
    where_code_runs: str


# The vendor modules of x86 KVM.  kvm_pvm is PVM ("Pagetable-based Virtual
# Machine"), a KVM vendor module that runs guests without VMX or SVM by
# switching page tables, so it works inside a cloud VM; it is a patch series,
# not part of mainline Linux.
KINDS = {
    "kvm_intel": KvmKind("kvm_intel", "hardware KVM (Intel VMX)",
                         "guest code at every privilege level runs natively"),
    "kvm_amd": KvmKind("kvm_amd", "hardware KVM (AMD SVM)",
                       "guest code at every privilege level runs natively"),
    "kvm_pvm": KvmKind("kvm_pvm", "paravirtual KVM (PVM, no VMX/SVM)",
                       "guest code at CPL 3 runs natively, at CPL 0 in KVM's instruction emulator"),
}


def kvm_modules(sys_module: str = SYS_MODULE) -> list[str]:
    """Every loaded module whose name starts with kvm, sorted."""
    try:
        return sorted(m for m in os.listdir(sys_module) if m.startswith("kvm"))
    except OSError:
        return []


def kvm_kinds(sys_module: str = SYS_MODULE) -> list[KvmKind]:
    """The kinds whose vendor module is loaded (usually one; none without KVM)."""
    loaded = set(kvm_modules(sys_module))
    return [kind for module, kind in KINDS.items() if module in loaded]


def describe(sys_module: str = SYS_MODULE) -> str:
    """One line: `kvm_pvm: paravirtual KVM (PVM): guest code at CPL 3 runs ...`."""
    kinds = kvm_kinds(sys_module)
    if not kinds:
        return "unknown (no kvm_intel, kvm_amd or kvm_pvm module loaded)"
    return "; ".join(f"{k.module}: {k.name}: {k.where_code_runs}" for k in kinds)
