"""`kvmlite info`: what /dev/kvm offers here, like kvm-ok."""

from __future__ import annotations

from .. import hostkind
from ..kvm import lib
from ..vstate import Kvm


def info_command() -> int:
    with Kvm() as k:
        print(f"/dev/kvm: KVM API version {k.api_version} (kvmlite needs {lib.KVM_API_VERSION})")
        print(f"vCPU run area: {k.vcpu_mmap_size} bytes")
        for cap, value in k.capabilities().items():
            print(f"  {cap:<36} {'yes' if value else 'no ':<4} {value if value > 1 else ''}")
        cpuid = k.supported_cpuid()
        print(f"supported CPUID leaves: {cpuid.nent}")
        msrs = k.msr_index_list()
        print(f"saveable MSRs: {len(msrs)}")
        modules = hostkind.kvm_modules()
        if modules:
            print(f"kernel modules: {', '.join(modules)}")
        print(f"KVM kind: {hostkind.describe()}")
    print("kvmlite can run guests here.")
    return 0
