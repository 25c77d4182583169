"""Which KVM a host has, read from the loaded modules (kvmlite/hostkind.py)."""

from __future__ import annotations

from kvmlite import hostkind


def fake_sys_module(tmp_path, *modules):
    for m in modules:
        (tmp_path / m).mkdir()
    return str(tmp_path)


def test_each_vendor_module_names_its_kind(tmp_path):
    """kvm_intel, kvm_amd and kvm_pvm each give their own kind; kvm alone gives none."""
    for module, word in (("kvm_intel", "VMX"), ("kvm_amd", "SVM"), ("kvm_pvm", "PVM")):
        d = tmp_path / module
        d.mkdir()
        sysmod = fake_sys_module(d, "kvm", module, "ext4")
        assert [k.module for k in hostkind.kvm_kinds(sysmod)] == [module]
        assert word in hostkind.describe(sysmod)
        assert hostkind.kvm_modules(sysmod) == ["kvm", module]


def test_no_vendor_module_is_said_plainly(tmp_path):
    """Without a vendor module (or without /sys/module at all) the kind is unknown."""
    assert hostkind.kvm_kinds(fake_sys_module(tmp_path, "kvm")) == []
    assert hostkind.describe(str(tmp_path)).startswith("unknown")
    assert hostkind.describe(str(tmp_path / "absent")).startswith("unknown")

