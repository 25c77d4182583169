"""Where serial and debug-console bytes go: the VMM's stdout by default, a line at a time."""

from __future__ import annotations

import os
import sys


class SerialOutput:
    """Collects guest output bytes; hands them on a line at a time (and on flush()).

    `to` is where lines go: a file descriptor (default: stdout's), a binary
    file object (its `write`), or a callable taking the line's bytes.
    """

    def __init__(self, to: object = None) -> None:
        if to is None:
            to = sys.stdout.fileno()
        if isinstance(to, int):
            self._write = lambda data, fd=to: _write_fd(fd, data)
        elif hasattr(to, "write"):
            self._write = to.write
        elif callable(to):
            self._write = to
        else:
            raise TypeError("guest output goes to a file descriptor, a file object or a callable")
        self.buf = bytearray()

    def write_byte(self, b: int) -> None:
        self.buf.append(b)
        if b == 0x0A or len(self.buf) >= 4096:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            try:
                self._write(data)
            except (OSError, ValueError):
                pass  # a closed stdout or file must not kill the guest


def _write_fd(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]
