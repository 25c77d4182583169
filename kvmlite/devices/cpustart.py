"""The CPU-start device: a guest starts another vCPU in long mode at an entry
point of its choice, as ARM's PSCI CPU_ON does (docs/boot.md, "Starting the
other CPUs").

32-bit ports from the base (boot info `cpustart_port`, 0x540 by default):

    +0x00  ID          read: 0x31504D53 ("SMP1")
    +0x04  CPU         the vCPU to start (its index = its APIC ID)
    +0x08  ENTRY_LO    +0x0C ENTRY_HI    RIP at its first instruction
    +0x10  STACK_LO    +0x14 STACK_HI    RSP
    +0x18  ARG_LO      +0x1C ARG_HI      RDI (PSCI's context id)
    +0x20  write: COMMAND (1 = CPU_ON); read: STATUS of the last command
    +0x24  COUNT       read: the number of vCPUs

STATUS is 0 after a CPU_ON that started the vCPU, else 0x80000000 | reason:
1 no such vCPU (or vCPU 0, which is running), 2 already started, 3 ENTRY or
STACK not in RAM, 4 unknown command.  The registers are one set for the VM:
a guest that starts CPUs from several CPUs at once serialises its own use.

The device keeps which vCPUs are on (vCPU 0 always; it travels with a
migration) and checks the request; `start(cpu, entry, stack, arg)` is the
machine's and runs on the calling vCPU's thread: it has the target vCPU's own
thread set its registers (boot.setup_ap) and run it.
"""

from __future__ import annotations

from .bus import Device

DEFAULT_PORT = 0x540
PORT_COUNT = 0x28
ID = 0x31504D53                 # "SMP1"
CMD_CPU_ON = 1
STATUS_ERROR = 0x80000000
E_NO_CPU, E_ALREADY_ON, E_ADDRESS, E_COMMAND = 1, 2, 3, 4

REG_ID, REG_CPU, REG_COMMAND, REG_COUNT = 0x00, 0x04, 0x20, 0x24
# the 64-bit registers as (low, high) 32-bit halves
WIDE = {0x08: "entry", 0x10: "stack", 0x18: "arg"}


class CpuStart(Device):
    name = "cpustart"

    def __init__(self, count: int, start, contains=lambda gpa: True):
        self.count = count
        self.start = start          # callable(cpu, entry, stack, arg): the machine starts it
        self.contains = contains    # callable(gpa) -> bool: inside RAM
        self.regs = {"cpu": 0, "entry": 0, "stack": 0, "arg": 0}
        self.status = 0
        self.started = {0}

    def cpu_on(self, cpu: int, entry: int, stack: int, arg: int) -> int:
        """0 when vCPU `cpu` was started, else the reason it was not."""
        if not 0 < cpu < self.count:
            return E_NO_CPU
        if cpu in self.started:
            return E_ALREADY_ON
        if not (self.contains(entry) and 0 < stack and self.contains(stack - 1)):
            return E_ADDRESS
        self.started.add(cpu)
        self.start(cpu, entry, stack, arg)
        return 0

    def io_read(self, offset: int, size: int) -> int:
        if size != 4:
            return (1 << (8 * size)) - 1
        if offset == REG_ID:
            return ID
        if offset == REG_CPU:
            return self.regs["cpu"]
        if offset == REG_COMMAND:
            return self.status
        if offset == REG_COUNT:
            return self.count
        for base, name in WIDE.items():
            if offset in (base, base + 4):
                return (self.regs[name] >> (8 * (offset - base))) & 0xFFFFFFFF
        return 0xFFFFFFFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        if offset == REG_CPU:
            self.regs["cpu"] = value
        elif offset == REG_COMMAND:
            reason = self.cpu_on(self.regs["cpu"], self.regs["entry"], self.regs["stack"],
                                 self.regs["arg"]) if value == CMD_CPU_ON else E_COMMAND
            self.status = STATUS_ERROR | reason if reason else 0
        else:
            for base, name in WIDE.items():
                if offset in (base, base + 4):
                    shift = 8 * (offset - base)
                    self.regs[name] = (self.regs[name] & ~(0xFFFFFFFF << shift)) | value << shift

    def save_state(self) -> dict:
        return {"regs": dict(self.regs), "status": self.status, "started": sorted(self.started)}

    def restore_state(self, state: dict) -> None:
        regs = state["regs"]
        if set(regs) != set(self.regs):
            raise ValueError(f"registers {sorted(regs)}, expected {sorted(self.regs)}")
        limits = {"cpu": 1 << 32, "entry": 1 << 64, "stack": 1 << 64, "arg": 1 << 64}
        for name, value in regs.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limits[name]:
                raise ValueError(f"register {name}: {value!r} out of range")
        status = state["status"]
        if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status < 1 << 32:
            raise ValueError(f"status {status!r} out of range")
        started = state["started"]
        if (not isinstance(started, list) or 0 not in started
                or not all(type(c) is int and 0 <= c < self.count for c in started)):
            raise ValueError(f"started vCPUs {started!r}: vCPU 0 and others below {self.count}")
        self.regs, self.status, self.started = dict(regs), status, set(started)
