"""How an application processor (AP) starts on this host, and what it costs.

1. INIT-SIPI-SIPI from the BSP's LAPIC (x2APIC by WRMSR, and xAPIC by MMIO),
   as a PC firmware or OS does: the AP waits in KVM_RUN (KVM_MP_STATE_UNINITIALIZED),
   KVM returns -EAGAIN to its thread once the SIPI arrived, and the next
   KVM_RUN starts it in real mode at vector * 4 KiB.  The probe's trampoline
   (guest.S, ap_rm) goes real mode -> protected mode -> long mode.
2. A paravirtual start: the BSP writes the CPU's number to a port; the VMM
   kicks the AP's thread, which sets the AP's registers for long mode (as at
   boot) and makes it runnable.

    .venv/bin/python -m bench.probes.apstart
"""

from __future__ import annotations

import statistics
import threading
import time

from kvmlite import exits as ex

from .probevm import ProbeVm, cycles_to_us

REPS = 10


def init_sipi(x2apic: bool) -> dict:
    vm = ProbeVm(2)
    k = vm.tsc_khz
    before = vm.mp_state(1)
    vm.params(0, int(x2apic), 1)      # target APIC ID 1
    vm.enter(0, "t_bsp_sipi")
    vm.run_all([0, 1], timeout=20)
    t_init, t_sipi, t_end = (vm.result(0, o) for o in (0x100, 0x108, 0x110))
    t_rm, t_lm = vm.mem.read_u64(0x9000), vm.mem.read_u64(0x9008)
    out = {
        "ok": vm.results == [("done", 0), ("done", 0)] and vm.counts[1].get("ap_apic_id") == 1,
        "mp_state_before": before,
        "ap_exits": dict(vm.counts[1]),
        "init_write_us": cycles_to_us(t_sipi - t_init, k),
        "sipi_to_real_mode_us": cycles_to_us(t_rm - t_sipi, k),
        "real_to_long_mode_us": cycles_to_us(t_lm - t_rm, k),
    }
    vm.close()
    return out


def pv_start() -> dict:
    """The BSP asks on port 0xF7; the AP's own thread sets its registers and runs it."""
    vm = ProbeVm(2)
    k = vm.tsc_khz
    vm.enter(0, "t_pv_bsp")
    start = threading.Event()
    got = {}

    def on_exit(cpu, e):
        if cpu == 0 and isinstance(e, ex.IoOut) and e.port == 0xF7:
            got["request"] = time.perf_counter()
            start.set()
            vm.vcpus[1].kick()      # the AP's thread is blocked in KVM_RUN (not yet started)
        if cpu == 1 and isinstance(e, ex.Interrupted) and start.is_set() and "entered" not in got:
            t = time.perf_counter()
            vm.enter(1, "t_pv_ap")  # KVM_SET_SREGS, KVM_SET_REGS, KVM_SET_MP_STATE on its own thread
            got["entered"] = time.perf_counter()
            got["set_us"] = (got["entered"] - t) * 1e6
        return None

    vm.run_all([0, 1], on_exit=on_exit, timeout=20)
    t_req, t_ap = vm.result(0, 0x100), vm.result(1, 0x100)
    out = {"ok": vm.results == [("done", 0), ("done", 0)],
           "request_to_ap_us": cycles_to_us(t_ap - t_req, k),
           "vmm_set_registers_us": got.get("set_us", 0.0)}
    vm.close()
    return out


def main() -> dict:
    res = {}
    for name, fn in (("init_sipi_x2apic", lambda: init_sipi(True)),
                     ("init_sipi_xapic", lambda: init_sipi(False)),
                     ("pv_start", pv_start)):
        runs = [fn() for _ in range(REPS)]
        summary = {"ok": all(r["ok"] for r in runs), "runs": len(runs)}
        for key in runs[0]:
            if isinstance(runs[0][key], float):
                vals = [r[key] for r in runs]
                summary[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
            elif key != "ok":
                summary[key] = runs[0][key]
        res[name] = summary
    return res


def report(res: dict) -> None:
    print(f"AP start ({REPS} runs each; median [min-max] in microseconds)")
    for name, s in res.items():
        print(f"  {name}: ok={s['ok']}")
        for key, v in s.items():
            if isinstance(v, dict) and "median" in v:
                print(f"    {key:24s} {v['median']:9.1f}  [{v['min']:.1f}-{v['max']:.1f}]")
            elif key not in ("ok", "runs"):
                print(f"    {key:24s} {v}")


if __name__ == "__main__":
    report(main())
