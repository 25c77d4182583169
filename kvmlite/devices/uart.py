"""A 16550A UART: enough of it that a polling driver (Linux's early console,
a hobby kernel's serial_putc) works.  Transmit goes to the VMM's output."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .bus import Device

if TYPE_CHECKING:
    from .output import SerialOutput

# Register offsets (PC16550D datasheet, Table 2)
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
MCR_LOOP = 0x10
LSR_DR = 0x01       # receive data ready
LSR_THRE = 0x20     # transmit holding register empty
LSR_TEMT = 0x40     # transmitter empty
IIR_NO_INT = 0x01
IIR_FIFO_ENABLED = 0xC0
FCR_FIFO_ENABLE = 0x01
MSR_CTS, MSR_DSR, MSR_DCD = 0x10, 0x20, 0x80

PORT_COUNT = 8
RX_MAX = 16         # a 16550's receive FIFO: loopback bytes past it are dropped (an overrun)


class Uart16550(Device):
    name = "uart16550"

    def __init__(self, output: SerialOutput) -> None:
        self.output = output          # a SerialOutput
        self.ier = 0
        self.fcr = 0
        self.lcr = 0x03               # 8N1, the power-on value firmware leaves
        self.mcr = 0
        self.scr = 0
        self.dll = 0x01               # 115200 baud
        self.dlm = 0
        self.rx = bytearray()

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                if len(self.rx) < RX_MAX:
                    self.rx.append(value)
            else:
                self.output.write_byte(value)
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif offset == IIR_FCR:
            self.fcr = value
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    def io_read(self, offset: int, size: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == LSR:
            # The VMM takes each byte at once, so the transmitter is always empty.
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            return self.rx.pop(0) if self.rx else 0
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            return IIR_NO_INT | (IIR_FIFO_ENABLED if self.fcr & FCR_FIFO_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # Loopback wires RTS→CTS, DTR→DSR, OUT2→DCD (datasheet 8.6).
                m = self.mcr
                return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x08) << 4)
            return MSR_CTS | MSR_DSR | MSR_DCD
        if offset == SCR:
            return self.scr
        return 0xFF

    def save_state(self) -> dict:
        return {"ier": self.ier, "fcr": self.fcr, "lcr": self.lcr, "mcr": self.mcr,
                "scr": self.scr, "dll": self.dll, "dlm": self.dlm, "rx": bytes(self.rx)}

    def restore_state(self, state: dict) -> None:
        """Refuses (ValueError) what no 16550 could hold: a register past 8 bits,
        a receive FIFO past 16 bytes.  Nothing is clipped into shape."""
        regs = {}
        for reg in ("ier", "fcr", "lcr", "mcr", "scr", "dll", "dlm"):
            value = state[reg]
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise ValueError(f"{reg} is {value!r}, not a byte")
            regs[reg] = value
        rx = state["rx"]
        if not isinstance(rx, bytes) or len(rx) > RX_MAX:
            raise ValueError(f"the receive FIFO holds {RX_MAX} bytes, not "
                             f"{len(rx) if isinstance(rx, bytes) else repr(rx)}")
        for reg, value in regs.items():
            setattr(self, reg, value)
        self.rx = bytearray(rx)
