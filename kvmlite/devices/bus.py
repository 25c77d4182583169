"""The port-I/O bus: maps port ranges to devices, refusing overlaps."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError

PORT_SPACE = 0x10000


class Device:
    """A device on the I/O bus.  Subclasses override what they implement."""

    name = "device"

    def io_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def io_write(self, offset: int, size: int, value: int) -> None:
        pass

    def save_state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        pass


class IoBus:
    """Port → (device, base).  Unclaimed reads return all ones, writes are dropped,
    as on a PC where nothing drives the bus."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, Device]] = []
        self._ports: dict[int, tuple[Device, int]] = {}
        self.unclaimed = 0
        self.trace: Callable[[str], None] | None = None   # when --trace is on

    def register(self, base: int, length: int, device: Device) -> None:
        if length <= 0 or base < 0 or base + length > PORT_SPACE:
            raise ConfigError(f"{device.name}: ports {base:#x}+{length} are outside the port space")
        for b, n, d in self._ranges:
            if base < b + n and b < base + length:
                raise ConfigError(f"{device.name} at ports {base:#x}-{base + length - 1:#x} "
                                  f"overlaps {d.name} at {b:#x}-{b + n - 1:#x}")
        self._ranges.append((base, length, device))
        for port in range(base, base + length):
            self._ports[port] = (device, base)

    def devices(self) -> list[tuple[int, int, Device]]:
        return sorted(self._ranges, key=lambda r: r[0])

    def write(self, port: int, size: int, value: int) -> None:
        """An OUT of one `size`-byte value."""
        hit = self._ports.get(port)
        if hit is None:
            self._unclaimed(f"OUT port {port:#x} value {value:#x}")
            return
        device, base = hit
        device.io_write(port - base, size, value)

    def write_string(self, port: int, size: int, data: bytes) -> None:
        """A REP OUTS: len(data) // size values, each written in turn."""
        for i in range(0, len(data) - size + 1, size):
            self.write(port, size, int.from_bytes(data[i:i + size], "little"))

    def _unclaimed(self, what: str) -> None:
        self.unclaimed += 1
        if self.trace:
            self.trace(f"unclaimed {what}")

    def read(self, port: int, size: int, count: int = 1) -> bytes:
        hit = self._ports.get(port)
        if hit is None:
            self._unclaimed(f"IN port {port:#x}")
            return b"\xff" * (size * count)
        device, base = hit
        return b"".join(device.io_read(port - base, size).to_bytes(size, "little")
                        for _ in range(count))
