"""The exit device: the guest writes a status byte and the run ends with it."""

from __future__ import annotations

from collections.abc import Callable

from .bus import Device


class GuestExit(Exception):
    """Raised out of the run loop when the guest asks to exit."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class ExitDevice(Device):
    name = "exit"

    def io_write(self, offset: int, size: int, value: int) -> None:
        raise GuestExit(value & 0xFF)

    def io_read(self, offset: int, size: int) -> int:
        return 0


class IdleDevice(Device):
    """The guest writes a number of microseconds; its vCPU gives the host CPU
    back for that long, or until the VMM needs it (pause, quit).  A guest
    without timer interrupts has no HLT-until-deadline; this is one."""

    name = "idle"
    MAX_US = 100_000     # a guest cannot park its vCPU for longer than 0.1 s at a time

    def __init__(self, wait: Callable[[float], None]) -> None:
        self.wait = wait   # callable(seconds)

    def io_write(self, offset: int, size: int, value: int) -> None:
        if size == 4 and value:
            self.wait(min(value, self.MAX_US) / 1e6)

    def io_read(self, offset: int, size: int) -> int:
        return 0
