"""A client for kvmlite's monitor socket (kvmlite/monitor.py)."""

from __future__ import annotations

import json
import socket

from ..errors import KvmliteError


class MonitorClient:
    """A JSON-lines client for kvmlite's monitor socket."""

    def __init__(self, path: str, timeout: float = 10.0):
        path = path[5:] if path.startswith("unix:") else path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            raise KvmliteError(f"cannot connect to monitor {path}: {e.strerror} "
                               "(is the VM running with --monitor unix:PATH?)") from None
        self.f = self.sock.makefile("rwb", buffering=0)
        self.greeting = self._read()

    def _read(self) -> dict:
        line = self.f.readline()
        if not line:
            raise KvmliteError("the monitor closed the connection")
        return json.loads(line)

    def execute(self, command: str, **arguments):
        req = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self.f.write(json.dumps(req).encode() + b"\n")
        resp = self._read()
        if "error" in resp:
            raise KvmliteError(f"{command}: {resp['error'].get('desc')}")
        return resp.get("return")

    def close(self) -> None:
        self.f.close()
        self.sock.close()

