"""Lab 3: watch the guest's free-page bitmap change while it allocates and frees.

    python docs/labs/code/lab3_watch.py

Runs guest/guest.bin (workload=churn) in a kvmlite Machine on a thread of
its own: the vCPU thread.  Every few milliseconds the main thread pauses the
vCPU, reads the bitmap straight out of guest memory, where the
free-page-hint device says it is, and draws it: one character per 64 pages
(one bitmap word), '.' all 64 free, '#' all 64 active, '+' some of each.

KVM wants a vCPU's ioctls issued from the thread that created it
(Documentation/virt/kvm/api.rst, section 1), so the vCPU thread builds the
Machine (KVM_CREATE_VCPU, KVM_SET_CPUID2), boots it (KVM_SET_SREGS,
KVM_SET_REGS) and runs it (KVM_RUN).  The main thread issues no vCPU ioctl:
it asks the vCPU to park (a signal and kvm_run.immediate_exit), reads guest
memory, which is plain memory of this process, and lets it go.
"""

import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from kvmlite.devices.output import SerialOutput
from kvmlite.machine import Machine

ROOT = Path(__file__).resolve().parents[3]
RAM = 16 << 20                       # 4096 pages: 64 bitmap words, one line
CMDLINE = "workload=churn pages=1500 rounds=300 free=50"
SNAPSHOTS = 6
INTERVAL = 0.01                      # seconds between snapshots
ALL_FREE = np.uint64(0xFFFFFFFFFFFFFFFF)


def picture(words: np.ndarray) -> str:
    return "".join("." if w == ALL_FREE else "#" if w == 0 else "+" for w in words)


def vcpu_thread(built: queue.Queue, go: threading.Event, result: dict, output: SerialOutput) -> None:
    """Create, boot and run the VM, all on this thread; hand the Machine over
    once booted, and run it when told to go."""
    try:
        machine = Machine(RAM, output=output)
    except BaseException as e:
        built.put(e)
        return
    try:
        machine.boot(str(ROOT / "guest" / "guest.bin"), CMDLINE)
    except BaseException as e:
        machine.close()
        built.put(e)
        return
    built.put(machine)
    go.wait()
    result["r"] = machine.run()


def main() -> int:
    quiet = os.open(os.devnull, os.O_WRONLY)          # the guest's serial output
    built, go, result = queue.Queue(), threading.Event(), {}
    vcpu = threading.Thread(target=vcpu_thread, args=(built, go, result, SerialOutput(quiet)))
    vcpu.start()
    machine = built.get()
    if isinstance(machine, BaseException):
        vcpu.join()
        raise machine
    try:
        print(f"before the guest runs: registered = {machine.fph.registration is not None}")
        go.set()
        while machine.fph.registration is None and vcpu.is_alive():
            time.sleep(0.001)
        reg = machine.fph.registration
        print(f"registered: header at {reg.region_gpa:#x}, bitmap at {reg.bitmap_gpa:#x}, "
              f"{reg.npages} pages from GPA {reg.base_gpa:#x}")
        seen = set()
        for _ in range(SNAPSHOTS):
            machine.pause()                           # the bitmap cannot change under us now
            words = machine.fph.bitmap_words().copy()
            free = machine.fph.count_free()
            machine.resume()
            seen.add(free)
            print(f"{picture(words)}  free {free:4d}  active {reg.npages - free:4d}")
            time.sleep(INTERVAL)
        vcpu.join()
        r = result["r"]
        print(f"distinct free counts in {SNAPSHOTS} snapshots: {len(seen)}")
        print(f"guest ended: {r.reason}, status {r.status}; free at the end {machine.fph.count_free()}")
        return r.status
    finally:
        go.set()
        vcpu.join()
        machine.close()
        os.close(quiet)


if __name__ == "__main__":
    sys.exit(main())
