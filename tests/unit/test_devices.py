"""Port-I/O devices as a guest driver sees them: UART, debug console, exit device, I/O bus.

Everything goes through IoBus.read/write at absolute ports, as the run loop
does on an IN/OUT exit.  No /dev/kvm.
"""

from __future__ import annotations

import pytest

from kvmlite.devices import DebugCon, Device, ExitDevice, GuestExit, IoBus, Uart16550
from kvmlite.errors import ConfigError

COM1 = 0x3F8
THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


class FakeOutput:
    """Collects the bytes a device sends to the VMM's stdout."""

    def __init__(self):
        self.data = bytearray()

    def write_byte(self, b: int) -> None:
        self.data.append(b)


@pytest.fixture
def out():
    return FakeOutput()


@pytest.fixture
def bus(out):
    b = IoBus()
    b.register(COM1, 8, Uart16550(out))
    b.register(0xE9, 1, DebugCon(out))
    b.register(0x501, 1, ExitDevice())
    return b


def inb(bus, port):
    return bus.read(port, 1)[0]


def outb(bus, port, value):
    bus.write(port, 1, value)


# ---- UART 16550 -------------------------------------------------------------------------

def test_uart_polling_putc_reaches_output(bus, out):
    """A polling putc (wait for LSR.THRE, write THR) sends every byte to the output, in order."""
    for ch in b"Hello, serial!\n":
        for _ in range(3):
            if inb(bus, COM1 + LSR) & 0x20:
                break
        else:
            pytest.fail("LSR never reported THR empty")
        outb(bus, COM1 + THR, ch)
    assert bytes(out.data) == b"Hello, serial!\n"


def test_uart_lsr_reports_transmitter_empty_and_no_data(bus):
    """LSR reads THRE|TEMT (0x60) with DR clear when nothing was received."""
    assert inb(bus, COM1 + LSR) == 0x60


def test_uart_linux_style_init_sequence(bus, out):
    """The 8250 init (IER=0, DLAB, divisor 3, 8N1, FIFO, MCR=DTR|RTS|OUT2) reads back and leaves THR working."""
    outb(bus, COM1 + IER, 0x00)
    outb(bus, COM1 + LCR, 0x80)                 # DLAB on
    outb(bus, COM1 + DLL, 0x03)                 # 38400 baud
    outb(bus, COM1 + DLM, 0x00)
    outb(bus, COM1 + LCR, 0x03)                 # 8N1, DLAB off
    outb(bus, COM1 + FCR, 0xC7)
    outb(bus, COM1 + MCR, 0x0B)
    assert inb(bus, COM1 + LCR) == 0x03
    assert inb(bus, COM1 + MCR) == 0x0B
    assert inb(bus, COM1 + IER) == 0x00
    assert inb(bus, COM1 + IIR) == 0xC1, "no interrupt pending, FIFOs enabled"
    outb(bus, COM1 + THR, ord("A"))
    assert out.data == b"A"


def test_uart_dlab_switches_offsets_0_and_1_to_divisor_latch(bus, out):
    """With LCR.DLAB set offsets 0/1 are DLL/DLM (nothing transmitted); cleared, they are THR/IER again."""
    outb(bus, COM1 + IER, 0x05)
    outb(bus, COM1 + LCR, 0x83)
    outb(bus, COM1 + DLL, 0x0C)
    outb(bus, COM1 + DLM, 0x01)
    assert (inb(bus, COM1 + DLL), inb(bus, COM1 + DLM)) == (0x0C, 0x01)
    assert out.data == b"", "a divisor write is not a transmitted byte"
    outb(bus, COM1 + LCR, 0x03)
    assert inb(bus, COM1 + IER) == 0x05, "IER kept its value behind the latch"
    outb(bus, COM1 + THR, 0x41)
    assert out.data == b"A"
    outb(bus, COM1 + LCR, 0x83)
    assert (inb(bus, COM1 + DLL), inb(bus, COM1 + DLM)) == (0x0C, 0x01), "divisor kept"


def test_uart_scratch_register_reads_back(bus):
    """SCR returns each value written (how drivers probe for a UART)."""
    for v in (0x00, 0x55, 0xAA, 0xFF):
        outb(bus, COM1 + SCR, v)
        assert inb(bus, COM1 + SCR) == v


def test_uart_iir_reports_no_interrupt(bus):
    """IIR bit 0 is set (no interrupt pending), also after IER enables interrupts."""
    assert inb(bus, COM1 + IIR) & 0x01
    outb(bus, COM1 + IER, 0x0F)
    assert inb(bus, COM1 + IIR) == 0x01


def test_uart_loopback_returns_written_bytes(bus, out):
    """In loopback (MCR bit 4) THR bytes come back on RBR in order, LSR.DR tracks them, nothing is printed."""
    outb(bus, COM1 + MCR, 0x10)
    for b in b"\x5a\xa5\x00":
        outb(bus, COM1 + THR, b)
    assert inb(bus, COM1 + LSR) & 0x01, "data ready"
    assert [inb(bus, COM1 + RBR) for _ in range(3)] == [0x5A, 0xA5, 0x00]
    assert not inb(bus, COM1 + LSR) & 0x01, "receive buffer drained"
    assert out.data == b""
    outb(bus, COM1 + MCR, 0x00)
    outb(bus, COM1 + THR, ord("z"))
    assert out.data == b"z", "loopback off: THR prints again"


def test_uart_loopback_msr_mirrors_modem_control(bus):
    """In loopback MSR shows RTS as CTS, DTR as DSR and OUT2 as DCD (Linux's UART autodetect check)."""
    outb(bus, COM1 + MCR, 0x10)
    assert inb(bus, COM1 + MSR) & 0xB0 == 0
    outb(bus, COM1 + MCR, 0x10 | 0x0B)          # DTR | RTS | OUT2
    assert inb(bus, COM1 + MSR) & 0xB0 == 0xB0
    outb(bus, COM1 + MCR, 0x00)
    assert inb(bus, COM1 + MSR) & 0xB0 == 0xB0, "outside loopback: CTS, DSR, DCD asserted"


def test_uart_loopback_buffer_is_bounded(out):
    """A guest writing in loopback without reading cannot grow the VMM's buffer without limit."""
    uart = Uart16550(out)
    uart.io_write(MCR, 1, 0x10)
    for i in range(10_000):
        uart.io_write(THR, 1, i & 0xFF)
    assert len(uart.rx) == 16, "a 16550's receive FIFO holds 16 bytes"
    Uart16550(out).restore_state(uart.save_state())     # what migrates is what restore_state accepts
    assert uart.io_read(RBR, 1) == 0, "the oldest bytes are kept"


def test_uart_rbr_reads_zero_when_empty(bus):
    """Reading RBR with nothing received returns 0 and leaves LSR.DR clear."""
    assert inb(bus, COM1 + RBR) == 0
    assert not inb(bus, COM1 + LSR) & 0x01


def test_uart_save_restore_round_trip(out):
    """save_state() of a configured UART restores into a fresh one that reads back the same registers."""
    a = Uart16550(out)
    a.io_write(LCR, 1, 0x80)
    a.io_write(DLL, 1, 0x0C)
    a.io_write(DLM, 1, 0x02)
    a.io_write(LCR, 1, 0x1B)
    a.io_write(IER, 1, 0x03)
    a.io_write(FCR, 1, 0x01)
    a.io_write(SCR, 1, 0x77)
    a.io_write(MCR, 1, 0x10)
    a.io_write(THR, 1, 0x42)                    # one byte pending in loopback
    state = a.save_state()
    b = Uart16550(FakeOutput())
    b.restore_state(state)
    assert b.save_state() == state
    regs = (IER, IIR, LCR, MCR, LSR, MSR, SCR)
    assert [b.io_read(r, 1) for r in regs] == [a.io_read(r, 1) for r in regs]
    assert b.io_read(RBR, 1) == 0x42
    b.io_write(LCR, 1, 0x80)
    assert (b.io_read(DLL, 1), b.io_read(DLM, 1)) == (0x0C, 0x02)


GOOD_UART = {"ier": 0, "fcr": 0, "lcr": 3, "mcr": 0, "scr": 0, "dll": 1, "dlm": 0, "rx": b""}


@pytest.mark.parametrize("change", [{"ier": 0x1FF}, {"fcr": -1}, {"scr": 1 << 40}, {"lcr": "3"},
                                    {"rx": b"\x01" * 17}, {"rx": b"\x01" * (8 << 20)}, {"rx": "text"}])
def test_uart_restore_refuses_what_no_16550_holds(out, change):
    """A register past 8 bits or a receive FIFO past 16 bytes is refused, not clipped; nothing changes."""
    u = Uart16550(out)
    before = u.save_state()
    with pytest.raises(ValueError):
        u.restore_state({**GOOD_UART, **change})
    assert u.save_state() == before


# ---- debug console and exit device ---------------------------------------------------------

def test_debugcon_prints_and_identifies(bus, out):
    """A byte written to port 0xE9 is printed; a read returns 0xE9 (the Bochs/QEMU detection)."""
    for b in b"ok\n":
        outb(bus, 0xE9, b)
    assert out.data == b"ok\n"
    assert inb(bus, 0xE9) == 0xE9


def test_exit_device_raises_guest_exit_with_the_byte(bus):
    """A write to port 0x501 raises GuestExit carrying the byte (only the low 8 bits)."""
    with pytest.raises(GuestExit) as e:
        outb(bus, 0x501, 42)
    assert e.value.status == 42
    with pytest.raises(GuestExit) as e:
        bus.write(0x501, 2, 0x1203)
    assert e.value.status == 0x03


# ---- the I/O bus ------------------------------------------------------------------------------

class Named(Device):
    def __init__(self, name):
        self.name = name
        self.writes = []

    def io_write(self, offset, size, value):
        self.writes.append((offset, size, value))

    def io_read(self, offset, size):
        return 0x40 + offset


def test_bus_refuses_overlap_naming_both_devices():
    """Registering a range that overlaps another device raises ConfigError naming both and their ports."""
    b = IoBus()
    b.register(0x3F8, 8, Named("uart-a"))
    with pytest.raises(ConfigError) as e:
        b.register(0x3FF, 2, Named("probe-b"))
    msg = str(e.value)
    assert "probe-b" in msg and "uart-a" in msg and "0x3ff" in msg and "0x3f8" in msg
    b.register(0x400, 1, Named("adjacent"))     # touching is not overlapping
    b.register(0x3F7, 1, Named("below"))


@pytest.mark.parametrize("base,length", [(0x3F0, 9), (0x3FF, 1), (0x3F8, 1), (0x3F0, 0x20)])
def test_bus_refuses_single_shared_port(base, length):
    """Sharing even one port (first, last or all) with a registered device is an overlap."""
    b = IoBus()
    b.register(0x3F8, 8, Named("uart"))
    with pytest.raises(ConfigError, match="overlaps uart"):
        b.register(base, length, Named("other"))


@pytest.mark.parametrize("base,length", [(-1, 2), (0xFFFF, 2), (0x10000, 1), (0, 0), (0, 0x10001)])
def test_bus_refuses_ports_outside_port_space(base, length):
    """Port ranges outside 0..0xFFFF (or empty) are refused with a ConfigError naming the device."""
    with pytest.raises(ConfigError, match="dev-x"):
        IoBus().register(base, length, Named("dev-x"))


def test_bus_accepts_last_port():
    """Port 0xFFFF itself can be claimed."""
    b = IoBus()
    b.register(0xFFFF, 1, Named("top"))
    assert b.read(0xFFFF, 1) == b"\x40"


def test_bus_unclaimed_reads_all_ones_and_counts():
    """IN from an unclaimed port returns all ones for every byte and count; each access is counted and traced."""
    b = IoBus()
    traced = []
    b.trace = traced.append
    assert b.read(0x80, 1) == b"\xff"
    assert b.read(0x80, 4, count=3) == b"\xff" * 12
    b.write(0x80, 1, 0x12)
    assert b.unclaimed == 3
    assert len(traced) == 3 and "0x80" in traced[0] and "0x12" in traced[2]


def test_bus_devices_see_offsets_from_their_base():
    """A device receives port - base, and IN with a count repeats the read."""
    b = IoBus()
    d = Named("d")
    b.register(0x520, 0x20, d)
    b.write(0x52C, 4, 0xDEAD)
    assert d.writes == [(0x0C, 4, 0xDEAD)]
    assert b.read(0x524, 2, count=2) == (0x44).to_bytes(2, "little") * 2


def test_bus_write_string_splits_into_values():
    """REP OUTS data is split into size-byte little-endian values, a trailing partial value dropped."""
    b = IoBus()
    d = Named("d")
    b.register(0x10, 1, d)
    b.write_string(0x10, 2, b"\x01\x02\x03\x04\x05")
    assert d.writes == [(0, 2, 0x0201), (0, 2, 0x0403)]
    d.writes.clear()
    b.write_string(0x10, 1, b"hi")
    assert d.writes == [(0, 1, ord("h")), (0, 1, ord("i"))]


def test_bus_devices_sorted_by_port():
    """devices() lists (base, length, device) sorted by base."""
    b = IoBus()
    b.register(0x501, 1, Named("exit"))
    b.register(0xE9, 1, Named("dbg"))
    assert [(base, n, d.name) for base, n, d in b.devices()] == [(0xE9, 1, "dbg"), (0x501, 1, "exit")]
