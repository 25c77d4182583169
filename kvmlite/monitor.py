"""The monitor: a JSON-lines control socket, in the spirit of QEMU's QMP.

    $ socat - UNIX-CONNECT:/tmp/vm1.sock
    {"kvmlite": {"version": "0.1.0"}}
    {"execute": "query-status"}
    {"return": {"status": "running"}}

One JSON object per line each way.  A bad request gets an error object back;
the connection stays open.
"""

from __future__ import annotations

import json
import os
import socket
import threading

from . import __version__
from .errors import KvmliteError
from .units import parse_size

MAX_LINE = 64 * 1024


class CommandError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls = cls


class Monitor:
    def __init__(self, machine, address: str):
        self.machine = machine
        self.path = address[5:] if address.startswith("unix:") else address
        self.migration = None
        self.final_seen = threading.Event()   # a client has read a finished migration's stats
        self._stop = threading.Event()
        self._srv: socket.socket | None = None
        if os.path.exists(self.path):
            os.unlink(self.path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            srv.bind(self.path)
        except OSError as e:
            raise KvmliteError(f"cannot create monitor socket {self.path}: {e.strerror}") from None
        srv.listen(4)
        self._srv = srv
        self.commands = {
            "query-status": self.query_status,
            "stop": self.stop_vm,
            "cont": self.cont,
            "migrate": self.migrate,
            "query-migrate": self.query_migrate,
            "migrate-cancel": self.migrate_cancel,
            "query-free-pages": self.query_free_pages,
            "guest-finish": self.guest_finish,
            "quit": self.quit,
            "query-commands": lambda: {"commands": sorted(self.commands)},
        }

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="monitor", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._srv is not None:
            try:
                self._srv.close()
            finally:
                self._srv = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb", buffering=0) as f:
            try:
                self._send(f, {"kvmlite": {"version": __version__}})
                while True:
                    line = f.readline(MAX_LINE + 1)
                    if not line:
                        return
                    if not line.strip():
                        continue
                    self._send(f, self.handle_line(line))
            except OSError:
                return

    @staticmethod
    def _send(f, obj) -> None:
        f.write(json.dumps(obj).encode() + b"\n")

    def handle_line(self, line: bytes) -> dict:
        """One request line → one response object (never raises)."""
        req_id = None
        try:
            if len(line) > MAX_LINE:
                raise CommandError(f"request longer than {MAX_LINE} bytes")
            try:
                req = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise CommandError(f"not JSON: {e}") from None
            if not isinstance(req, dict) or not isinstance(req.get("execute"), str):
                raise CommandError('expected {"execute": "<command>", "arguments": {...}}')
            req_id = req.get("id")
            name = req["execute"]
            fn = self.commands.get(name)
            if fn is None:
                raise CommandError(f"unknown command {name!r}", "CommandNotFound")
            args = req.get("arguments", {})
            if not isinstance(args, dict):
                raise CommandError("arguments must be an object")
            try:
                result = fn(**args)
            except (TypeError, ValueError, OverflowError) as e:
                raise CommandError(f"bad arguments for {name}: {e}") from None
            resp = {"return": result if result is not None else {}}
        except CommandError as e:
            resp = {"error": {"class": e.cls, "desc": str(e)}}
        except KvmliteError as e:
            resp = {"error": {"class": "GenericError", "desc": str(e)}}
        if req_id is not None:
            resp["id"] = req_id
        return resp

    # ---- commands ------------------------------------------------------------

    def query_status(self) -> dict:
        m = self.machine
        mig = self.migration
        if mig is not None and mig.stats.status == "completed":
            status = "postmigrate"
        elif not m.running:
            status = "shutdown"
        elif m.paused:
            status = "paused"
        else:
            status = "running"
        return {"status": status, "running": status == "running", "exits": m.exits}

    def stop_vm(self) -> dict:
        self._require_running()
        self.machine.pause()
        return {}

    def cont(self) -> dict:
        if self.migration is not None and self.migration.stats.status in ("setup", "active", "completing"):
            raise CommandError("a migration is in progress")
        self.machine.resume()
        return {}

    def migrate(self, uri: str, hint: bool = True, live: bool = True, downtime_ms: float = 5.0,
                bandwidth="0", max_rounds: int = 30, **kw) -> dict:
        from .migration.source import Migration
        self._require_running()
        if self.migration is not None and not self.migration.done.is_set():
            raise CommandError("a migration is already in progress")
        for k in kw:
            if k not in ("downtime-ms", "max-rounds"):
                raise CommandError(f"unknown argument {k!r}")
        downtime_ms = float(kw.get("downtime-ms", downtime_ms))
        max_rounds = int(kw.get("max-rounds", max_rounds))
        bw = parse_size(str(bandwidth), "bandwidth")
        mig = Migration(self.machine, uri, hint=bool(hint), live=bool(live),
                        downtime_ms=downtime_ms, bandwidth=bw, max_rounds=max_rounds)
        self.final_seen.clear()
        self.migration = mig
        mig.start()
        return {}

    def query_migrate(self) -> dict:
        mig = self.migration
        if mig is None:
            return {"status": "none"}
        d = mig.stats.as_dict()
        if mig.done.is_set():
            self.final_seen.set()
        return d

    def migrate_cancel(self) -> dict:
        if self.migration is not None:
            self.migration.cancel()
        return {}

    def query_free_pages(self) -> dict:
        m = self.machine
        total = m.memory.npages
        if m.fph.registration is None:
            return {"pages_total": total, "registered": False}
        free = m.fph.count_free()
        return {"pages_total": total, "registered": True, "free": free, "active": total - free}

    def guest_finish(self) -> dict:
        self.machine.fph.request_stop()
        return {}

    def quit(self) -> dict:
        from .machine import RunResult
        self.machine.quit(RunResult("quit", 0, exits=self.machine.exits))
        return {}

    def _require_running(self) -> None:
        if not self.machine.running:
            raise CommandError("the guest is not running")
