"""Lab 2: a new port-I/O device, written, registered and driven by a guest.

    python docs/labs/code/lab2_device.py

The device is a 32-bit counter at port 0x510: a 4-byte OUT sets it, a 4-byte
IN returns it and counts up.  The script builds a kvmlite Machine (the same
VM `kvmlite run` builds), puts the counter on its I/O bus, boots the tiny
guest in lab2_guest.S and runs it with kvmlite's own run loop.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from kvmlite.boot import DEFAULT_LOAD_ADDR
from kvmlite.devices import Device
from kvmlite.errors import KvmliteError
from kvmlite.config import BootConfig, MachineConfig
from kvmlite.machine import Machine

HERE = Path(__file__).resolve().parent
COUNTER_PORT = 0x510       # free: see the device table in docs/boot.md
COUNTER_PORTS = 4          # one 32-bit register; the bus routes all four byte ports to it


class Counter(Device):
    """A 32-bit counter.  Offset 0, 4 bytes wide: OUT sets, IN reads and increments."""

    name = "counter"

    def __init__(self):
        self.value = 0
        self.accesses = []   # what the guest did, for the report below

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(f"OUT {size}@+{offset} {value}")
        if offset == 0 and size == 4:
            self.value = value

    def io_read(self, offset: int, size: int) -> int:
        self.accesses.append(f"IN  {size}@+{offset}")
        if offset != 0 or size != 4:
            return super().io_read(offset, size)     # all ones, as for an unclaimed port
        value = self.value
        self.value = (value + 1) & 0xFFFFFFFF
        return value

    # A device's state travels with a migrated VM (Machine.devices() names them).
    def save_state(self) -> dict:
        return {"value": self.value}

    def restore_state(self, state: dict) -> None:
        self.value = int(state["value"]) & 0xFFFFFFFF


def assemble(source: Path, out: Path) -> Path:
    obj = out.with_suffix(".o")
    subprocess.run(["gcc", "-c", "-o", obj, source], check=True)
    subprocess.run(["ld", "--oformat", "binary", f"-Ttext={DEFAULT_LOAD_ADDR:#x}", "-o", out, obj],
                   check=True)
    return out


def main() -> int:
    counter = Counter()
    machine = Machine(MachineConfig(memory=16 << 20))
    try:
        machine.bus.register(COUNTER_PORT, COUNTER_PORTS, counter)
        try:
            machine.bus.register(0x3FA, 2, Counter())        # inside the UART's eight ports
        except KvmliteError as e:
            print(f"refused as it should be: {e}")
        print("the I/O bus:")
        for base, length, device in machine.bus.devices():
            print(f"  {base:#06x}-{base + length - 1:#06x}  {device.name}")
        with tempfile.TemporaryDirectory() as tmp:
            image = assemble(HERE / "lab2_guest.S", Path(tmp) / "lab2_guest.bin")
            machine.boot(BootConfig(str(image)))
        sys.stdout.flush()                 # the guest's bytes go straight to fd 1
        result = machine.run()
        print(f"run ended: {result.reason}, status {result.status}, {result.exits} exits")
        print(f"the counter saw: {', '.join(counter.accesses)}")
        print(f"unclaimed accesses on the bus: {machine.bus.unclaimed}")
        return result.status
    finally:
        machine.close()


if __name__ == "__main__":
    sys.exit(main())
