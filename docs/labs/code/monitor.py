"""A tiny QMP client for kvmlite's monitor (or QEMU's): one command, one JSON reply.

    python docs/labs/code/monitor.py /tmp/vm.sock x-query-free-pages
    python docs/labs/code/monitor.py /tmp/vm.sock migrate '{"uri": "tcp:127.0.0.1:4444"}'

QMP, QEMU's machine protocol (docs/monitor.md): the server greets first
({"QMP": {...}}), the client leaves capabilities negotiation with
{"execute": "qmp_capabilities"}, then each {"execute": ..., "arguments": {...}}
gets one reply, {"return": ...} or {"error": ...}.  Events ({"event": ...})
may come in between; this client skips them.  Messages are JSON objects; the
server ends each with CRLF, which is what this reads by.  The socket appears
once the VM is up, so this waits for it a little.
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
                raise SystemExit(f"monitor.py: nothing answers at {path}") from None
            time.sleep(0.05)


def reply(f) -> dict:
    """The next message that is not an event."""
    while True:
        msg = json.loads(f.readline())
        if "event" not in msg:
            return msg


def main(path: str, command: str, arguments: str = "{}") -> int:
    with connect(path) as s, s.makefile("rwb", buffering=0) as f:
        json.loads(f.readline())                                  # the greeting
        f.write(b'{"execute": "qmp_capabilities"}')
        reply(f)
        f.write(json.dumps({"execute": command, "arguments": json.loads(arguments)}).encode())
        answer = reply(f)
    print(json.dumps(answer))
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
