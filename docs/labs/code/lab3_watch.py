"""Lab 3: watch the guest's free-page bitmap change while it allocates and frees.

    python docs/labs/code/lab3_watch.py

Runs guest/guest.bin (workload=churn) in a kvmlite Machine, whose vCPU has a
thread of its own (every vCPU ioctl is issued there; this script only asks).
Every few milliseconds it pauses the vCPU, reads the bitmap
straight out of guest memory, where the free-page-hint device says it is,
and draws it: one character per 64 pages (one bitmap word),
'.' all 64 free, '#' all 64 active, '+' some of each.
"""

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from kvmlite.config import BootConfig, MachineConfig
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


def main() -> int:
    quiet = os.open(os.devnull, os.O_WRONLY)          # the guest's serial output
    machine = Machine(MachineConfig(memory=RAM), output=SerialOutput(quiet))
    try:
        machine.boot(BootConfig(str(ROOT / "guest" / "guest.bin"), CMDLINE))
        print(f"before the guest runs: registered = {machine.fph.registration is not None}")
        result = {}
        # machine.run() lets the vCPU thread go and waits for the end: on a thread here,
        # so this one can watch meanwhile.
        vcpu = threading.Thread(target=lambda: result.update(r=machine.run()))
        vcpu.start()
        while machine.fph.registration is None and vcpu.is_alive():
            time.sleep(0.001)
        reg = machine.fph.registration
        print(f"registered: header at {reg.region_gpa:#x}, bitmap at {reg.bitmap_gpa:#x}, "
              f"{reg.npages} pages from GPA {reg.base_gpa:#x}")
        seen = set()
        for _ in range(SNAPSHOTS):
            machine.pause_all()                       # the bitmap cannot change under us now
            words = machine.fph.bitmap_words().copy()
            free = machine.fph.count_free()
            machine.resume_all()
            seen.add(free)
            print(f"{picture(words)}  free {free:4d}  active {reg.npages - free:4d}")
            time.sleep(INTERVAL)
        vcpu.join()
        r = result["r"]
        print(f"distinct free counts in {SNAPSHOTS} snapshots: {len(seen)}")
        print(f"guest ended: {r.reason}, status {r.status}; free at the end {machine.fph.count_free()}")
        return r.status
    finally:
        machine.close()
        os.close(quiet)


if __name__ == "__main__":
    sys.exit(main())
