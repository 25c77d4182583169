"""Lab 7: a guest that sleeps, with and without an interrupt controller.

    python docs/labs/code/lab7_sleep.py --smp 1     # no irqchip: the idle device
    python docs/labs/code/lab7_sleep.py --smp 2     # in-kernel irqchip: LAPIC timer, HLT

Boots the guest with workload=sleep in this process (kvmlite's Machine, as
lab 1 does), lets it run to its end, and prints what it said about its
sleeps, how many times it asked the idle device (port 0x504) to wait, each
a VM exit, and how many HLT exits the VMM saw.
"""

import argparse
import sys

from kvmlite import BootConfig, Machine, MachineConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smp", type=int, default=1, help="vCPUs; 2 or more give the VM the in-kernel irqchip")
    ap.add_argument("--ms", type=int, default=20, help="milliseconds per sleep")
    ap.add_argument("--count", type=int, default=10, help="sleeps per CPU")
    args = ap.parse_args()
    lines = []
    with Machine(MachineConfig(memory=64 << 20, vcpus=args.smp), output=lines.append) as vm:
        waits = []
        wait = vm.idle.wait                  # the idle device calls this with the seconds asked for
        vm.idle.wait = lambda seconds: (waits.append(seconds), wait(seconds))
        vm.boot(BootConfig("guest/guest.bin", f"workload=sleep ms={args.ms} count={args.count}"))
        result = vm.run()
        print(f"in-kernel irqchip: {'yes' if vm.irqchip else 'no'}")
        for line in sorted(line for line in lines if line.startswith(b"sleep")):   # CPU 0's first
            print("guest: " + line.decode().rstrip())
        print(f"idle-device waits (a VM exit each): {len(waits)}")
        print(f"HLT exits: {vm.exits_by_kind().get('Hlt', 0)}")
    print(f"guest exit status {result.status}")
    return result.status


if __name__ == "__main__":
    sys.exit(main())
