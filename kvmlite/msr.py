"""Model-specific registers a VMM saves and restores.

Numbers are architectural (Intel SDM Vol. 4, "Model-Specific Registers");
<linux/kvm.h> does not carry them.
"""

IA32_TSC = 0x10
IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
IA32_SYSENTER_EIP = 0x176
IA32_MISC_ENABLE = 0x1A0
IA32_PAT = 0x277
IA32_STAR = 0xC0000081
IA32_LSTAR = 0xC0000082
IA32_CSTAR = 0xC0000083
IA32_FMASK = 0xC0000084
IA32_KERNEL_GS_BASE = 0xC0000102
IA32_TSC_AUX = 0xC0000103
# Not in MIGRATED: it must be restored after KVM_SET_LAPIC, which drops a
# deadline set before it (Vcpu.save/restore_interrupt_state carry it).
IA32_TSC_DEADLINE = 0x6E0

# Saved on migration, when KVM_GET_MSR_INDEX_LIST offers them.  EFER, FS and GS
# bases travel in kvm_sregs.  The TSC goes last so it is restored last.
MIGRATED = (IA32_SYSENTER_CS, IA32_SYSENTER_ESP, IA32_SYSENTER_EIP, IA32_MISC_ENABLE,
            IA32_PAT, IA32_STAR, IA32_LSTAR, IA32_CSTAR, IA32_FMASK, IA32_KERNEL_GS_BASE,
            IA32_TSC_AUX, IA32_TSC)
