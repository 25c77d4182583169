"""A tiny client for kvmlite's monitor: one command, one JSON reply.

    python docs/labs/code/monitor.py /tmp/vm.sock query-free-pages
    python docs/labs/code/monitor.py /tmp/vm.sock migrate '{"uri": "tcp:127.0.0.1:4444"}'

The monitor speaks JSON lines (kvmlite/monitor.py): it greets first, then
answers each {"execute": ..., "arguments": {...}} line with one line.  The
socket appears once the VM is up, so this waits for it a little.
"""

import json
import socket
import sys
import time

WAIT_FOR_SOCKET = 10.0   # seconds


def connect(path: str) -> socket.socket:
    deadline = time.monotonic() + WAIT_FOR_SOCKET
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"monitor.py: nothing answers at {path}")
            time.sleep(0.05)


def main(path: str, command: str, arguments: str = "{}") -> int:
    with connect(path) as s, s.makefile("rwb", buffering=0) as f:
        json.loads(f.readline())                                  # the greeting
        request = {"execute": command, "arguments": json.loads(arguments)}
        f.write(json.dumps(request).encode() + b"\n")
        reply = json.loads(f.readline())
    print(json.dumps(reply))
    return 1 if "error" in reply else 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
