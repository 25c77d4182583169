"""Inter-processor interrupts between two vCPUs, with the in-kernel irqchip.

The receiver (vCPU 1) halts at CPL 0 with interrupts on; the sender (vCPU 0)
works at CPL 3 and sends a fixed IPI either through the xAPIC page mapped
user-accessible (two MMIO stores, handled by KVM's LAPIC) or through the
x2APIC ICR MSR (WRMSR at CPL 3 traps with #GP; the guest's handler does it).
Latency = the receiver's ISR TSC - the sender's TSC before the send (KVM
keeps the vCPUs' TSCs in step).

    .venv/bin/python -m bench.probes.ipi
"""

from __future__ import annotations

import statistics

from .probevm import PB, ProbeVm, cycles_to_us

N = 300


def ipi(sender_x2apic: bool, receiver_x2apic: bool, n: int = N) -> dict:
    vm = ProbeVm(2)
    k = vm.tsc_khz
    vm.params(1, int(receiver_x2apic), n)
    vm.params(0, int(sender_x2apic), n, k // 2, 1, PB + 0x10000)   # one IPI every 0.5 ms
    vm.enter(1, "t_ipi_recv")
    vm.enter(0, "t_ipi_send")
    vm.run_all([1, 0], timeout=120)
    assert vm.results == [("done", 0), ("done", 0)], vm.results
    send, recv = vm.samples(0, n), vm.samples(1, vm.result(1, 0x100))
    lat = sorted(cycles_to_us(r - s, k) for s, r in zip(send, recv))
    cost = sorted(cycles_to_us(c, k) for c in vm.samples(0, n, 0x8000))
    out = {"received": len(recv), "exits_to_vmm": [sum(c.values()) - 1 for c in vm.counts],
           "latency_median_us": statistics.median(lat), "latency_min_us": lat[0],
           "latency_p90_us": lat[int(n * 0.9)],
           "send_cost_median_us": statistics.median(cost), "send_cost_min_us": cost[0]}
    vm.close()
    return out


def main() -> dict:
    return {
        "xapic_mmio_cpl3_to_xapic": ipi(False, False),
        "x2apic_wrmsr_trapped_to_x2apic": ipi(True, True),
        "xapic_mmio_cpl3_to_x2apic": ipi(False, True),
    }


def report(res: dict) -> None:
    print(f"IPIs, {N} each (microseconds):")
    for key, v in res.items():
        print(f"  {key}: " + ", ".join(f"{a}={b:.1f}" if isinstance(b, float) else f"{a}={b}"
                                       for a, b in v.items()))


if __name__ == "__main__":
    report(main())
