"""Where serial and debug-console bytes go: the VMM's stdout, line-buffered."""

from __future__ import annotations

import os
import sys


class SerialOutput:
    """Collects guest output bytes; writes a line at a time (and on flush())."""

    def __init__(self, fd: int | None = None):
        self.fd = sys.stdout.fileno() if fd is None else fd
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
                while data:
                    n = os.write(self.fd, data)
                    data = data[n:]
            except OSError:
                pass  # a closed stdout must not kill the guest
