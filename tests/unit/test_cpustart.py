"""The CPU-start device as a guest driver sees it, through the I/O bus at its
documented ports (docs/boot.md, "Starting the other CPUs").  No /dev/kvm."""

from __future__ import annotations

import pytest

from kvmlite.devices import IoBus
from kvmlite.devices.cpustart import DEFAULT_PORT, PORT_COUNT, CpuStart

BASE = 0x540
RAM = 64 << 20


class FakeMachine:
    """The machine's side: the vCPUs it was asked to start, in order."""

    def __init__(self):
        self.calls = []

    def start(self, cpu, entry, stack, arg):
        self.calls.append((cpu, entry, stack, arg))

    @property
    def started(self):
        return {0} | {c[0] for c in self.calls}


def in_ram(gpa):
    return 0 <= gpa < RAM


@pytest.fixture
def dev():
    m = FakeMachine()
    bus = IoBus()
    bus.register(BASE, PORT_COUNT, CpuStart(4, m.start, in_ram))
    return bus, m


def r32(bus, off):
    return int.from_bytes(bus.read(BASE + off, 4), "little")


def w32(bus, off, value):
    bus.write(BASE + off, 4, value)


def cpu_on(bus, cpu, entry, stack, arg):
    w32(bus, 0x04, cpu)
    for off, v in ((0x08, entry), (0x10, stack), (0x18, arg)):
        w32(bus, off, v & 0xFFFFFFFF)
        w32(bus, off + 4, v >> 32)
    w32(bus, 0x20, 1)
    return r32(bus, 0x20)


def test_documented_port_and_identity(dev):
    """Base 0x540, ID reads "SMP1", COUNT the number of vCPUs."""
    bus, _ = dev
    assert DEFAULT_PORT == BASE
    assert bus.read(BASE, 4) == b"SMP1"
    assert r32(bus, 0x24) == 4


def test_cpu_on_passes_64_bit_values_and_reports_status(dev):
    """CPU_ON hands the machine the 64-bit ENTRY, STACK and ARG written as halves; STATUS 0 = started."""
    bus, m = dev
    assert cpu_on(bus, 2, 0x0020_0000, 0x3F0000, 0xDEAD_BEEF_0000_0002) == 0
    assert m.calls[-1] == (2, 0x0020_0000, 0x3F0000, 0xDEAD_BEEF_0000_0002)
    assert (r32(bus, 0x18), r32(bus, 0x1C)) == (0x0000_0002, 0xDEAD_BEEF)   # read back as written


@pytest.mark.parametrize("cpu,entry,stack,status", [
    (4, 0x100000, 0x200000, 0x80000001),      # no such vCPU
    (0, 0x100000, 0x200000, 0x80000001),      # the boot vCPU runs already
    (1, RAM, 0x200000, 0x80000003),           # entry outside RAM
    (1, 0x100000, 0, 0x80000003),             # no stack
])
def test_cpu_on_refusals(dev, cpu, entry, stack, status):
    """A bad CPU, entry or stack: STATUS = 0x80000000 | reason, and nothing starts."""
    bus, m = dev
    assert cpu_on(bus, cpu, entry, stack, 0) == status
    assert m.started == {0}


def test_second_cpu_on_is_already_on_and_unknown_command(dev):
    """Starting a started vCPU answers reason 2; a command other than 1 answers reason 4."""
    bus, m = dev
    assert cpu_on(bus, 3, 0x100000, 0x200000, 0) == 0
    assert cpu_on(bus, 3, 0x100000, 0x200000, 0) == 0x80000002
    w32(bus, 0x20, 7)
    assert r32(bus, 0x20) == 0x80000004
    assert len(m.calls) == 1, "a refused CPU_ON never reaches the machine"


def test_other_widths_are_ignored_and_state_round_trips(dev):
    """Non-4-byte accesses are ignored (reads all ones); save_state/restore_state keep the registers, refuse nonsense."""
    bus, m = dev
    bus.write(BASE + 0x04, 2, 3)
    assert r32(bus, 0x04) == 0 and bus.read(BASE, 2) == b"\xff\xff"
    d = CpuStart(4, m.start, in_ram)
    d.io_write(0x10, 4, 0x1234)
    d.cpu_on(2, 0x100000, 0x200000, 0)
    e = CpuStart(4, m.start, in_ram)
    e.restore_state(d.save_state())
    assert e.io_read(0x10, 4) == 0x1234
    assert e.cpu_on(2, 0x100000, 0x200000, 0) == 2, "which vCPUs are on travels with the state"
    good = d.save_state()
    for bad in ({"regs": {"cpu": -1, "entry": 0, "stack": 0, "arg": 0}, "status": 0, "started": [0]},
                {"regs": {"cpu": 0}, "status": 0, "started": [0]},
                {**good, "started": [1]}, {**good, "started": [0, 4]}, {**good, "started": "all"}):
        with pytest.raises(ValueError):
            e.restore_state(bad)
