"""The 0xE9 debug console of Bochs and QEMU: a byte written is printed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .bus import Device

if TYPE_CHECKING:
    from .output import SerialOutput

DEBUGCON_ID = 0xE9  # reads return the port number, so a guest can detect it


class DebugCon(Device):
    name = "debugcon"

    def __init__(self, output: SerialOutput) -> None:
        self.output = output

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.output.write_byte(value & 0xFF)

    def io_read(self, offset: int, size: int) -> int:
        return DEBUGCON_ID
