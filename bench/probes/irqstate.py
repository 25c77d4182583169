"""Interrupt-controller state: what the get/set ioctls cost, and whether a
guest sleeping on its LAPIC timer wakes on time after its state is moved to
a fresh VM (what a migration does).

The guest (t_sleep, one iteration) arms its timer for SLEEP_MS and halts.
After PARK_MS the VMM kicks the vCPU out of KVM_RUN (it is in
KVM_MP_STATE_HALTED), saves registers, MSRs (the TSC and TSC_DEADLINE among
them), the LAPIC, the MP state and the three irqchip chips, builds a new VM,
restores them in one of two orders and runs it.  The guest measures the
sleep itself in its own TSC: on time means lateness close to the ~50 us a
sleep costs without the move.

    .venv/bin/python -m bench.probes.irqstate
"""

from __future__ import annotations

import statistics
import threading
import time

from kvmlite import kvm
from kvmlite.kvm import ffi, lib

from .probevm import ProbeVm, cycles_to_us

SLEEP_MS = 300
MOVE_RAM = 8 << 20           # the probe guest lives in the first 3 MiB
PARK_MS = 100
IA32_TSC, IA32_TSC_DEADLINE = 0x10, 0x6E0
CHIPS = ("KVM_IRQCHIP_PIC_MASTER", "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC")


def _timed(fn, n=200):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def ioctl_costs() -> dict:
    vm = ProbeVm(2)
    fd, vfd = vm.vm.fd, vm.vcpus[0].fd
    lapic = ffi.new("struct kvm_lapic_state *")
    mp = ffi.new("struct kvm_mp_state *")
    chip = ffi.new("struct kvm_irqchip *", {"chip_id": lib.KVM_IRQCHIP_IOAPIC})
    kvm.KVM_GET_LAPIC(vfd, lapic)
    kvm.KVM_GET_IRQCHIP(fd, chip)
    out = {
        "KVM_GET_LAPIC_us": _timed(lambda: kvm.KVM_GET_LAPIC(vfd, lapic)),
        "KVM_SET_LAPIC_us": _timed(lambda: kvm.KVM_SET_LAPIC(vfd, lapic)),
        "KVM_GET_MP_STATE_us": _timed(lambda: kvm.KVM_GET_MP_STATE(vfd, mp)),
        "KVM_SET_MP_STATE_us": _timed(lambda: kvm.KVM_SET_MP_STATE(vfd, mp)),
        "KVM_GET_IRQCHIP_us": _timed(lambda: kvm.KVM_GET_IRQCHIP(fd, chip)),
        "KVM_SET_IRQCHIP_us": _timed(lambda: kvm.KVM_SET_IRQCHIP(fd, chip)),
        "sizes": {"kvm_lapic_state": ffi.sizeof("struct kvm_lapic_state"),
                  "kvm_irqchip": ffi.sizeof("struct kvm_irqchip")},
    }
    vm.close()
    return out


def _save(vm: ProbeVm) -> dict:
    v = vm.vcpus[0]
    msrs = vm.kvm.migratable_msrs()
    state = v.save_state(msrs)
    state["tsc_deadline"] = v.get_msrs([IA32_TSC_DEADLINE])[IA32_TSC_DEADLINE]
    lapic = ffi.new("struct kvm_lapic_state *")
    kvm.KVM_GET_LAPIC(v.fd, lapic)
    state["lapic"] = bytes(ffi.buffer(lapic))
    state["mp_state"] = vm.mp_state(0)
    chips = []
    for name in CHIPS:
        c = ffi.new("struct kvm_irqchip *", {"chip_id": getattr(lib, name)})
        kvm.KVM_GET_IRQCHIP(vm.vm.fd, c)
        chips.append(bytes(ffi.buffer(c)))
    state["chips"] = chips
    return state


def _restore(vm: ProbeVm, state: dict, order: str) -> None:
    v = vm.vcpus[0]
    for raw in state["chips"]:
        c = ffi.new("struct kvm_irqchip *")
        ffi.buffer(c)[:] = raw
        kvm.KVM_SET_IRQCHIP(vm.vm.fd, c)
    lapic = ffi.new("struct kvm_lapic_state *")
    ffi.buffer(lapic)[:] = state["lapic"]
    if order == "lapic_then_deadline":
        v.restore_state(state)                     # sregs (APIC base), regs, FPU, MSRs with the TSC
        kvm.KVM_SET_LAPIC(v.fd, lapic)             # timer mode (LVTT) first ...
        v.set_msrs({IA32_TSC_DEADLINE: state["tsc_deadline"]})   # ... then the deadline
    else:                                          # the deadline before the LAPIC
        v.restore_state(state)
        v.set_msrs({IA32_TSC_DEADLINE: state["tsc_deadline"]})
        kvm.KVM_SET_LAPIC(v.fd, lapic)
    vm.set_mp_state(0, state["mp_state"])


def move_sleeper(oneshot: bool, order: str, restore_mp_state: bool = True) -> dict:
    src = ProbeVm(1, MOVE_RAM)
    dst = ProbeVm(1, MOVE_RAM)   # built first: the move is save, copy, restore
    k = src.tsc_khz
    delta = SLEEP_MS * 1_000_000 if oneshot else SLEEP_MS * k
    src.params(0, 2, delta, 1, int(oneshot))
    src.enter(0, "t_sleep")
    th = threading.Thread(target=lambda: src.results.__setitem__(0, src.run_cpu(0)), daemon=True)
    th.start()
    time.sleep(PARK_MS / 1000)
    src.stop = True
    src.vcpus[0].kick()
    th.join(5)
    assert src.results[0] == ("stopped",), src.results
    t_save = time.perf_counter()
    state = _save(src)
    save_us = (time.perf_counter() - t_save) * 1e6
    dst.mem.write(0, src.mem.read(0, src.mem.size))
    t_restore = time.perf_counter()
    if not restore_mp_state:
        state = dict(state, mp_state=lib.KVM_MP_STATE_RUNNABLE)
    _restore(dst, state, order)
    restore_us = (time.perf_counter() - t_restore) * 1e6
    move_ms = (time.perf_counter() - t_save) * 1000
    try:
        dst.run_all([0], timeout=2 * SLEEP_MS / 1000)
    except TimeoutError:
        src.close()
        dst.close()
        return {"result": "never woke", "late_us": float("inf"), "slept_ms": float("inf"),
                "move_ms": move_ms, "save_us": save_us, "restore_us": 0.0}
    s = dst.samples(0, 2)
    slept_ms = cycles_to_us(s[1] - s[0], k) / 1000
    out = {"result": dst.results[0][0], "mp_state_saved": state["mp_state"] if restore_mp_state else "not restored",
           "slept_ms": slept_ms, "late_us": (slept_ms - SLEEP_MS) * 1000,
           "move_ms": move_ms, "save_us": save_us, "restore_us": restore_us}
    src.close()
    dst.close()
    return out


def tsc_write() -> dict:
    """Does KVM_SET_MSRS of IA32_TSC move the guest's TSC here?"""
    vm = ProbeVm(1)
    v = vm.vcpus[0]
    before = v.get_msrs([IA32_TSC])[IA32_TSC]
    v.set_msrs({IA32_TSC: before - 10**10})
    after = v.get_msrs([IA32_TSC])[IA32_TSC]
    vm.close()
    return {"wrote_minus_1e10_read_back_minus_before": after - before,
            "ignored": after >= before}


def main() -> dict:
    res = {"ioctls": ioctl_costs(), "tsc_write": tsc_write()}
    for oneshot in (False, True):
        for order in ("lapic_then_deadline", "deadline_then_lapic"):
            if oneshot and order == "deadline_then_lapic":
                continue
            runs = [move_sleeper(oneshot, order) for _ in range(3)]
            res[f"{'oneshot' if oneshot else 'deadline'}_{order}"] = {
                "late_us": [round(r["late_us"], 1) for r in runs], "result": runs[0]["result"],
                "slept_ms": [round(r["slept_ms"], 3) for r in runs],
                "move_ms": [round(r["move_ms"], 1) for r in runs],
                "save_us": statistics.median(r["save_us"] for r in runs),
                "restore_us": statistics.median(r["restore_us"] for r in runs)}
    r = move_sleeper(False, "lapic_then_deadline", restore_mp_state=False)
    res["deadline_without_mp_state"] = {"late_us": round(r["late_us"], 1), "slept_ms": round(r["slept_ms"], 3)}
    return res


def report(res: dict) -> None:
    print("ioctl costs (us, Python through cffi):")
    for key, v in res["ioctls"].items():
        print(f"  {key}: {v if isinstance(v, dict) else round(v, 2)}")
    print(f"A guest sleeping {SLEEP_MS} ms on its LAPIC timer, moved to a fresh VM after {PARK_MS} ms:")
    for key, v in res.items():
        if key not in ("ioctls",):
            print(f"  {key}: {v}")


if __name__ == "__main__":
    report(main())
