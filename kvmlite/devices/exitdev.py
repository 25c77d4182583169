"""The exit device: the guest writes a status byte and the run ends with it."""

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
