"""The LAPIC timer and HLT on this host, with the in-kernel irqchip.

1. Ways from CPL 3 into CPL 0 and their round-trip cost (t_null): the guest
   works at CPL 3 and must trap to ring 0 to halt or to touch the LAPIC by MSR.
2. The LAPIC timer firing into a guest running at CPL 3 (t_timer): one-shot
   (re-armed by the ISR) and TSC-deadline; the gap CPL 3 sees per interrupt
   is the delivery + the emulated ISR + IRETQ.
3. Sleep (t_sleep): CPL 3 arms the timer (WRMSR, trapped) and halts (HLT,
   trapped; the #GP handler halts with interrupts on); how late it wakes.

    .venv/bin/python -m bench.probes.timer
"""

from __future__ import annotations

import statistics

from kvmlite import exits as ex

from .probevm import ProbeVm, cycles_to_us

WAYS = {0: "INT 0x81 (DPL-3 gate)", 1: "SYSCALL", 2: "INT3 (#BP, DPL-3 gate)",
        3: "WRMSR at CPL 3 (#GP, emulated by the handler)", 4: "UD2 (#UD, stepped over)"}


def ring_transitions(n: int = 2000) -> dict:
    out = {}
    for mode, name in WAYS.items():
        vm = ProbeVm(1)
        k = vm.tsc_khz
        iters = 1 if mode == 1 else n
        vm.params(0, iters, mode)
        vm.enter(0, "t_null")
        seen = []

        def on_exit(cpu, e, seen=seen):
            if isinstance(e, ex.IoOut) and e.port == 0xF6:
                seen.append(e.value)

        vm.run_all([0], on_exit=on_exit, timeout=60)
        r = vm.results[0]
        entry = {"result": r[0] if r[0] == "done" else f"{r[0]} vector {r[1]} ({r[2]})"}
        if r[0] == "done" and mode != 1:
            entry["round_trip_us"] = cycles_to_us(vm.result(0, 0x108) - vm.result(0, 0x100), k) / iters
        if mode == 1:
            entry["handler_sees"] = {"cs": hex(seen[0]), "ss": hex(seen[1]), "rflags": hex(seen[2])} \
                if len(seen) == 3 else seen
        out[name] = entry
        vm.close()
    return out


def periodic(mode: int, period_us: int, n: int) -> dict:
    """mode 0: one-shot re-armed in the ISR; 1: TSC deadline."""
    vm = ProbeVm(1)
    k = vm.tsc_khz
    period = period_us * 1000 if mode == 0 else period_us * k // 1000
    vm.params(0, mode, period, n, k // 1000)      # a gap is > 1 us without the loop advancing
    vm.enter(0, "t_timer")
    vm.run_all([0], timeout=60)
    assert vm.results[0] == ("done", 0), vm.results
    count, gaps = vm.result(0, 0x100), vm.result(0, 0x120)
    g = sorted(vm.samples(0, min(gaps, 4096)))
    out = {"interrupts": count, "exits_to_vmm": sum(vm.counts[0].values()) - 1,
           "gap_median_us": cycles_to_us(statistics.median(g), k),
           "gap_p10_us": cycles_to_us(g[len(g) // 10], k),
           "elapsed_ms": cycles_to_us(vm.result(0, 0x138) - vm.result(0, 0x130), k) / 1000,
           "ideal_ms": n * period_us / 1000}
    if mode == 1:
        late = sorted(cycles_to_us(c, k) for c in vm.samples(0, min(count, 4096), 0x8000))
        out["late_median_us"] = statistics.median(late)
        out["late_p10_us"] = late[len(late) // 10]
        out["late_p90_us"] = late[len(late) * 9 // 10]
    vm.close()
    return out


def sleep(oneshot: bool, us: int, n: int) -> dict:
    vm = ProbeVm(1)
    k = vm.tsc_khz
    delta = us * 1000 if oneshot else us * k // 1000
    vm.params(0, 2, delta, n, int(oneshot))
    vm.enter(0, "t_sleep")
    vm.run_all([0], timeout=120)
    assert vm.results[0] == ("done", 0), vm.results
    s = vm.samples(0, 2 * n)
    late = sorted(cycles_to_us(s[2 * i + 1] - s[2 * i], k) - us for i in range(n))
    out = {"sleeps": n, "interrupts": vm.result(0, 0x100),
           "exits_to_vmm": sum(vm.counts[0].values()) - 1,
           "late_median_us": statistics.median(late), "late_min_us": late[0],
           "late_p90_us": late[int(n * 0.9)], "late_max_us": late[-1]}
    vm.close()
    return out


def main() -> dict:
    return {
        "ring_transitions": ring_transitions(),
        "timer_oneshot_1ms": periodic(0, 1000, 300),
        "timer_deadline_1ms": periodic(1, 1000, 300),
        "timer_deadline_100us": periodic(1, 100, 1000),
        "sleep_deadline_100us": sleep(False, 100, 300),
        "sleep_deadline_1ms": sleep(False, 1000, 200),
        "sleep_deadline_10ms": sleep(False, 10000, 50),
        "sleep_oneshot_1ms": sleep(True, 1000, 200),
    }


def report(res: dict) -> None:
    print("Ways into ring 0 from CPL 3 (round trip):")
    for name, e in res["ring_transitions"].items():
        extra = f"{e['round_trip_us']:.1f} us" if "round_trip_us" in e else e.get("handler_sees", "")
        print(f"  {name:48s} {e['result']:30s} {extra}")
    for key, v in res.items():
        if key != "ring_transitions":
            print(f"{key}: " + ", ".join(f"{a}={b:.1f}" if isinstance(b, float) else f"{a}={b}"
                                         for a, b in v.items()))


if __name__ == "__main__":
    report(main())
