"""A client for kvmlite's monitor socket (kvmlite/monitor.py)."""

from __future__ import annotations

import json
import socket
import time

from ..errors import KvmliteError


class MonitorClient:
    """A JSON-lines client for kvmlite's monitor socket.  Anything that goes
    wrong with the VMM at the other end (it exits, is killed, hangs, answers
    garbage) is a KvmliteError that says so, never a bare OSError."""

    def __init__(self, path: str, timeout: float = 10.0):
        path = path[5:] if path.startswith("unix:") else path
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:
                # EAGAIN: the VMM's backlog of connections not yet accepted is
                # full (it is busy, or was stopped while clients kept knocking).
                # A unix socket says so at once instead of waiting: wait here.
                if time.monotonic() >= deadline:
                    self.sock.close()
                    raise KvmliteError(f"the VMM at {path} accepts no connection within "
                                       f"{timeout:g} s (is it stopped or hung?)") from None
                time.sleep(0.01)
            except OSError as e:
                self.sock.close()
                raise KvmliteError(f"cannot connect to monitor {path}: {e.strerror} "
                                   "(is the VM running with --monitor unix:PATH?)") from None
        self.f = self.sock.makefile("rwb", buffering=0)
        self.greeting = self._read()

    def _read(self) -> dict:
        try:
            line = self.f.readline()
        except TimeoutError:
            raise KvmliteError(f"the VMM at {self.path} did not answer within {self.timeout:g} s "
                               "(is it stopped or hung?)") from None
        except OSError as e:
            raise self._gone(e) from None
        if not line:
            raise self._gone(None)
        try:
            resp = json.loads(line)
        except ValueError:
            resp = None
        if not isinstance(resp, dict):
            raise KvmliteError(f"the monitor at {self.path} answered something that is not a "
                               f"JSON object: {line[:80]!r}")
        return resp

    def _gone(self, e: OSError | None) -> KvmliteError:
        why = f" ({e.strerror or e})" if e is not None else ""
        return KvmliteError(f"the monitor at {self.path} closed the connection{why}: "
                            "the VMM exited or was killed")

    def execute(self, command: str, **arguments):
        req = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            self.f.write(json.dumps(req).encode() + b"\n")
        except TimeoutError:
            raise KvmliteError(f"the VMM at {self.path} did not take a request within "
                               f"{self.timeout:g} s (is it stopped or hung?)") from None
        except OSError as e:
            raise self._gone(e) from None
        resp = self._read()
        if "error" in resp:
            err = resp["error"]
            raise KvmliteError(f"{command}: {err.get('desc') if isinstance(err, dict) else err}")
        return resp.get("return")

    def close(self) -> None:
        self.f.close()
        self.sock.close()

