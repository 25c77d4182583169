"""Lab 7: move a guest that sleeps on its LAPIC timer into a new VM, by hand.

    python docs/labs/code/lab7_move.py                       # everything travels
    python docs/labs/code/lab7_move.py --drop tsc_deadline   # ... but the timer's deadline
    python docs/labs/code/lab7_move.py --drop lapic          # ... but the LAPIC
    python docs/labs/code/lab7_move.py --drop mp_state       # ... but "halted"
    python docs/labs/code/lab7_move.py --deadline-first      # the deadline MSR before the LAPIC

A 2-vCPU guest sleeps 3 x 300 ms on each CPU (workload=sleep).  In the middle
of its first sleep the script parks both vCPUs, prints what each one's
interrupt state is, saves the VM's state the way a migration does
(kvmlite/migration/state.py), copies RAM into a second VM in this process,
restores the state there, with one piece left out if asked, and lets the
second VM run.  Then it prints what the guest said about its sleeps, or
that it never woke.
"""

import argparse
import sys
import threading
import time

from kvmlite import BootConfig, Machine, MachineConfig
from kvmlite.kvm import lib
from kvmlite.migration.state import collect_state, restore_state
from kvmlite.msr import IA32_TSC_DEADLINE

IA32_TSC = 0x10
LVTT = 0x320                   # the LAPIC timer's register in the xAPIC page image
MP_STATES = {getattr(lib, n): n[len("KVM_MP_STATE_"):] for n in dir(lib) if n.startswith("KVM_MP_STATE_")}
TIMER_MODES = {0: "one-shot", 1: "periodic", 2: "TSC-deadline"}
WAIT = 3.0                     # seconds the moved guest has to finish: 3 sleeps of 300 ms need 0.9


def describe(vcpu, khz: int) -> str:
    """One vCPU's interrupt state, on its own thread (the VM is paused)."""
    irq = vcpu.save_interrupt_state()
    now = vcpu.get_msrs([IA32_TSC])[IA32_TSC]
    lvtt = int.from_bytes(irq["lapic"][LVTT:LVTT + 4], "little")
    deadline = irq["tsc_deadline"]
    due = f"due in {(deadline - now) / khz:.0f} ms" if deadline > now else "not armed"
    return (f"vCPU {vcpu.index}: MP state {MP_STATES[irq['mp_state']]}, LAPIC timer "
            f"{TIMER_MODES[(lvtt >> 17) & 3]} vector {lvtt & 0xff:#x}{' masked' if lvtt >> 16 & 1 else ''}, "
            f"TSC deadline {due}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drop", choices=("tsc_deadline", "lapic", "mp_state"),
                    help="restore everything but this")
    ap.add_argument("--deadline-first", action="store_true",
                    help="write the TSC deadline MSR before KVM_SET_LAPIC instead of after")
    args = ap.parse_args()

    config = MachineConfig(memory=64 << 20, vcpus=2)
    asleep = threading.Event()
    src = Machine(config, output=lambda line: line.startswith(b"smp: ") and asleep.set())
    src.boot(BootConfig("guest/guest.bin", "workload=sleep ms=300 count=3"))
    threading.Thread(target=src.run, daemon=True).start()
    asleep.wait(10)
    time.sleep(0.1)                       # both CPUs are in their first sleep
    src.pause_all()
    khz = src.call(0, lambda v: v.tsc_khz())
    print("paused the source:")
    for i in range(src.nvcpus):
        print("  " + src.call(i, lambda v: describe(v, khz)))
    state = collect_state(src)
    irqs = state["interrupts"]
    for irq in irqs:
        if args.drop == "tsc_deadline":
            irq["tsc_deadline"] = 0
        elif args.drop == "mp_state":
            irq["mp_state"] = lib.KVM_MP_STATE_RUNNABLE

    lines = []
    dst = Machine(config, output=lines.append)
    dst.memory.view[:] = src.memory.view     # what the pages of a migration carry
    src.close()
    if args.drop == "lapic" or args.deadline_first:
        state["interrupts"] = None            # restored below, the way asked
    restore_state(dst, state)
    if state["interrupts"] is None:
        def restore_irq(vcpu):
            irq = irqs[vcpu.index]
            if args.deadline_first:
                vcpu.set_msrs({IA32_TSC_DEADLINE: irq["tsc_deadline"]})
            if args.drop != "lapic":
                vcpu.set_lapic(irq["lapic"])
            if not args.deadline_first:
                vcpu.set_msrs({IA32_TSC_DEADLINE: irq["tsc_deadline"]})
            vcpu.set_mp_state(irq["mp_state"])
        dst.call_all(restore_irq)
    what = f"everything but {args.drop}" if args.drop else "everything"
    print(f"restored {what} into a new VM" + (", the deadline before the LAPIC" if args.deadline_first else ""))

    result = {}
    runner = threading.Thread(target=lambda: result.update(r=dst.run()), daemon=True)
    runner.start()
    runner.join(WAIT)
    if runner.is_alive():
        dst.pause_all()
        print(f"the guest did not finish within {WAIT:g} s:")
        for i in range(dst.nvcpus):
            print("  " + dst.call(i, lambda v: describe(v, khz)))
        dst.close()
        return 0
    for line in sorted(line for line in lines if line.startswith(b"sleep")):   # CPU 0's first
        print("guest: " + line.decode().rstrip())
    print(f"guest exit status {result['r'].status}")
    dst.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
