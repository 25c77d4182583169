"""Several vCPUs in one VM, each on its own Python thread.

1. Page writes at CPL 3 (native on kvm_pvm), N vCPUs at once, each in its own
   16 MiB: aggregate pages per second for N = 1, 2, 4 (this host has 2 CPUs,
   so 4 is overcommitted).
2. Port-I/O exits from CPL 3, N vCPUs at once, each handled by its thread's
   Python run loop: aggregate exits per second (the threads share the GIL
   while they decode exits; KVM_RUN itself runs without it).
Both with and without the in-kernel irqchip (with it, the APs are made
runnable with KVM_SET_MP_STATE).

    .venv/bin/python -m bench.probes.smp
"""

from __future__ import annotations

import statistics

from .probevm import ProbeVm, cycles_to_us, host_cpus

PAGES = 60000           # per vCPU
EXITS = 20000           # per vCPU
REPS = 3


def page_writes(n: int, irqchip: bool) -> dict:
    vm = ProbeVm(n, (n + 2) * (16 << 20), irqchip=irqchip)
    k = vm.tsc_khz
    for i in range(n):
        vm.params(i, PAGES, 4096)
        vm.enter(i, "t_pagewrite")
    wall = vm.run_all(range(n), timeout=120)
    assert all(r == ("done", 0) for r in vm.results), vm.results
    per_cpu = [PAGES / (cycles_to_us(vm.result(i, 0x108) - vm.result(i, 0x100), k) / 1e6)
               for i in range(n)]
    vm.close()
    return {"wall_s": wall, "total_pages_per_s": n * PAGES / wall, "per_cpu_pages_per_s": per_cpu}


def exit_loop(n: int, irqchip: bool) -> dict:
    vm = ProbeVm(n, irqchip=irqchip)
    for i in range(n):
        vm.params(i, EXITS)
        vm.enter(i, "t_outloop")
    wall = vm.run_all(range(n), timeout=120)
    assert all(r == ("done", 0) for r in vm.results), vm.results
    vm.close()
    return {"wall_s": wall, "total_exits_per_s": n * EXITS / wall}


def ident() -> dict:
    """What each vCPU reads at CPL 3 through GS (base set per CPU at CPL 0) and
    CPUID, against CPUID at CPL 0.  The VMM sets CPUID.1:EBX[31:24] = vCPU index."""
    vm = ProbeVm(2)
    for c in (0, 1):
        vm.params(c, 0, 0, 0, 0, 0xC0FFEE00 + c)
        vm.enter(c, "t_ident")
    vm.run_all([0, 1])
    out = {f"cpu{c}": {"gs_read_at_cpl3": hex(vm.result(c, 0x100)),
                       "cpuid1_ebx_apic_id_cpl3": vm.result(c, 0x110) >> 24,
                       "cpuid1_ebx_apic_id_cpl0": vm.result(c, 0x120) >> 24,
                       "cpuid_40000000_ebx_cpl3": vm.result(c, 0x118).to_bytes(4, "little").decode(errors="replace")}
           for c in (0, 1)}
    vm.close()
    return out


def main() -> dict:
    res = {"host_cpus": host_cpus(), "ident": ident(), "page_writes": {}, "exits": {}}
    for irqchip in (False, True):
        for n in (1, 2, 4):
            key = f"{n} vCPU{'s' if n > 1 else ''}, {'irqchip' if irqchip else 'no irqchip'}"
            pw = [page_writes(n, irqchip) for _ in range(REPS)]
            res["page_writes"][key] = statistics.median(r["total_pages_per_s"] for r in pw)
            res.setdefault("per_cpu_pages_per_s", {})[key] = statistics.median(
                x for r in pw for x in r["per_cpu_pages_per_s"])
            el = [exit_loop(n, irqchip) for _ in range(REPS)]
            res["exits"][key] = statistics.median(r["total_exits_per_s"] for r in el)
    return res


def report(res: dict) -> None:
    print("who am I:", res["ident"])
    print(f"host CPUs: {res['host_cpus']}; medians of {REPS} runs")
    base_pw = res["page_writes"]["1 vCPU, no irqchip"]
    base_ex = res["exits"]["1 vCPU, no irqchip"]
    print(f"{'':28s} {'pages/s (all vCPUs)':>20} {'ratio':>6} {'per vCPU, own TSC':>18} "
          f"{'exits/s (all vCPUs)':>20} {'ratio':>6}")
    for key in res["page_writes"]:
        pw, e, pc = res["page_writes"][key], res["exits"][key], res["per_cpu_pages_per_s"][key]
        print(f"{key:28s} {pw:20,.0f} {pw / base_pw:6.2f} {pc:18,.0f} {e:20,.0f} {e / base_ex:6.2f}")


if __name__ == "__main__":
    report(main())

