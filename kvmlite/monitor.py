"""The monitor: a JSON-lines control socket, in the spirit of QEMU's QMP.

    $ socat - UNIX-CONNECT:/tmp/vm1.sock
    {"kvmlite": {"version": "0.1.0"}}
    {"execute": "query-status"}
    {"return": {"status": "running"}}

One JSON object per line each way.  A bad request gets an error object back;
the connection stays open.

Migration: `migrate` takes `uri` (`tcp:HOST:PORT`, `tcp:PORT`, `unix:PATH`,
`file:PATH`) and optionally `hint`, `live`, `bandwidth` ("100M"), `downtime-ms`,
`max-rounds`, `timeout` (seconds without progress), `auth-key` (a key file
the VMM reads, instead of its own `--auth-key`), with `file:`,
`keep-running`, with `tcp:`, `channels` (connections to spread the pages
over, 1 to 8), and with `unix:`, `local` (hand the RAM's memfd over, copy no
page); every argument has its type checked.  It returns at once;
`query-migrate` follows it and `migrate-cancel` stops it (the VM keeps
running here) until the handover has begun.  One migration at a time.
`x-migrate-resolve` with `owner` "source" or "destination" settles a
migration left `unresolved` (docs/wire-format.md, "Handover").

Inspection (`kvmlite inspect`, `kvmlite pagemap`):

* `query-vcpu`: registers (general, rip, rflags, cr0/cr2/cr3/cr4, efer, cs and
  ss), read with the vCPU parked -- a running VM is paused for the read and
  resumed; one the user stopped stays stopped; none are read while a
  migration runs, whose own pause must not be undone -- and the exit counts by
  kind (`IoOut`, `IoIn`, `Interrupted`, ...: the classes of kvmlite/exits.py).
* `query-pagemap`: per-page arrays of guest memory.  Each array is an object
  `{"dtype": "<u8" or "|u1", "shape": [n], "zlib_base64": "..."}`: the
  array's numpy bytes, zlib-compressed, as base64.  Bitmaps are uint64 words,
  page p in bit p % 64 of word p // 64: `free` (the guest's free bitmap,
  pages outside its registered range clear), `backed` (pages the host has
  backed: clear means never touched), `dirty` (pages a running migration has
  still to send, as it last synced; null without one); `sent_round` is one
  byte per page, the round that last sent it (0: never; the final pass is
  the last round), null if no migration ran.  Missing facts are null.
* `query-migrate` with `{"hold": true}` reads the stats without releasing a
  finished source: it stays up (up to 30 s) until a plain `query-migrate`,
  so a client can fetch `query-pagemap` first.
"""

from __future__ import annotations

import json
import os
import socket
import threading

from . import __version__
from .control.arraycodec import encode_array, mask_to_words
from .errors import KvmliteError
from .migration.status import MigrationStatus as S
from .units import parse_size

MAX_LINE = 64 * 1024
FINAL_WAIT = 3.0    # s a migrated-away source waits for a client to read the final stats
HOLD_WAIT = 30.0    # s more, once a client has asked it to hold


class CommandError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls = cls


class Monitor:
    def __init__(self, machine, address: str, *, new_migration=None):
        self.machine = machine
        self.path = address[5:] if address.startswith("unix:") else address
        self.migration = None
        # new_migration(uri, **params) -> a Migration with this VMM's credentials
        # and timeout as defaults (runner.py); None: no migrations from here
        self.new_migration = new_migration
        self.final_seen = threading.Event()   # a client has read a finished migration's stats
        self.held = threading.Event()         # a client asked a finished source to wait for it
        # stop, cont, migrate and query-vcpu's own pause take turns, so an
        # inspection never resumes a VM that a command paused meanwhile
        self._control = threading.Lock()
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
            "x-migrate-resolve": self.migrate_resolve,
            "query-free-pages": self.query_free_pages,
            "query-pagemap": self.query_pagemap,
            "query-vcpu": self.query_vcpu,
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
            except RecursionError:
                raise CommandError(f"arguments for {name} nest too deeply") from None
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
        if mig is not None and mig.status is S.COMPLETED and not mig.params.keep_running:
            status = "postmigrate"
        elif mig is not None and mig.status in (S.DEVICE, S.HANDOVER, S.UNRESOLVED):
            status = "finish-migrate" if mig.status is not S.UNRESOLVED else "paused"
        elif not m.running:
            status = "shutdown"
        elif m.paused:
            status = "paused"
        else:
            status = "running"
        return {"status": status, "running": status == "running", "exits": m.exits}

    def stop_vm(self) -> dict:
        self._require_running()
        with self._control:
            self.machine.pause_all()
        return {}

    def cont(self) -> dict:
        with self._control:
            mig = self.migration
            if mig is not None and (mig.status.in_progress):
                raise CommandError(f"a migration is {mig.status.value}: its pause is not ours to undo")
            self.machine.resume_all()
        return {}

    def migrate(self, uri: str, hint: bool = True, live: bool = True, bandwidth: str = "0",
                **kw) -> dict:
        self._require_running()
        if self.new_migration is None:
            raise CommandError("this VMM cannot start migrations")
        allowed = {"downtime-ms": "downtime_ms", "max-rounds": "max_rounds", "timeout": "timeout",
                   "keep-running": "keep_running", "channels": "channels", "local": "local"}
        params = {"hint": hint, "live": live}
        for k, v in kw.items():
            if k == "auth-key":
                continue
            if k not in allowed:
                raise CommandError(f"unknown argument {k!r}")
            params[allowed[k]] = v
        if not isinstance(bandwidth, str):
            raise CommandError("bandwidth must be a string such as \"100M\"")
        params["bandwidth"] = parse_size(bandwidth, "bandwidth")
        if "auth-key" in kw:
            from dataclasses import replace
            from .config import Credentials, read_key
            if not isinstance(kw["auth-key"], str):
                raise CommandError("auth-key must be a path")
            base = params.get("creds") or Credentials()
            params["creds"] = replace(base, key=read_key(kw["auth-key"]))
        with self._control:
            # Checked and claimed under one lock: two clients racing to migrate
            # the same VM get one migration and one refusal.
            mig = self.migration
            if mig is not None and (mig.status.in_progress or not mig.done.is_set()):
                raise CommandError(f"a migration is already {mig.status.value}")
            mig = self.new_migration(uri, **params)
            self.final_seen.clear()
            self.held.clear()
            self.migration = mig
            mig.start()
        return {}

    def query_migrate(self, hold: bool = False) -> dict:
        mig = self.migration
        if mig is None:
            return {"status": "none"}
        d = mig.stats.as_dict()
        if mig.done.is_set():
            (self.held if hold else self.final_seen).set()
        return d

    def wait_released(self) -> None:
        """After migrating away: give `kvmlite migrate` time to read the final
        stats, and more to a client that holds the source for more queries."""
        if not self.final_seen.wait(FINAL_WAIT) and self.held.is_set():
            self.final_seen.wait(HOLD_WAIT)

    def migrate_cancel(self) -> dict:
        mig = self.migration
        if mig is not None and not mig.status.finished and not mig.cancel():
            raise CommandError(f"too late to cancel: the migration is {mig.status.value} "
                               "(the destination may be running the guest)")
        return {}

    def migrate_resolve(self, owner: str) -> dict:
        mig = self.migration
        if mig is None:
            raise CommandError("no migration to resolve")
        mig.resolve(owner)
        return {}

    def query_free_pages(self) -> dict:
        m = self.machine
        total = m.memory.npages
        if m.fph.registration is None:
            return {"pages_total": total, "registered": False}
        free = m.fph.count_free()
        return {"pages_total": total, "registered": True, "free": free, "active": total - free}

    def query_pagemap(self) -> dict:
        m = self.machine
        mig = self.migration
        free = m.fph.free_mask()
        backed = m.memory.backed_pages(0, m.memory.npages)
        dirty = None
        if mig is not None and not mig.done.is_set() and mig.dirty_words is not None:
            dirty = mig.dirty_words.copy()    # the migration thread keeps changing it
        sent = mig.sent_round.copy() if mig is not None else None
        return {
            "page_size": 1 << 12, "pages": m.memory.npages,
            "registered": free is not None,
            "free": encode_array(mask_to_words(free)) if free is not None else None,
            "backed": encode_array(mask_to_words(backed)) if backed is not None else None,
            "dirty": encode_array(dirty) if dirty is not None else None,
            "sent_round": encode_array(sent) if sent is not None else None,
            "migration": None if mig is None else {
                "status": mig.stats.status, "hint": mig.stats.hint, "rounds": mig.stats.rounds},
        }

    def query_vcpu(self) -> dict:
        m = self.machine
        regs, why_not = None, None
        with self._control:
            mig = self.migration
            if not m.running:
                why_not = "the guest is not running here"
            elif mig is not None and not mig.done.is_set():
                why_not = "a migration is in progress (its pause is not ours to undo)"
            else:
                # Every vCPU parked for one consistent picture; a VM the user
                # stopped stays stopped.  Each vCPU's registers are read on its own thread.
                we_pause = not m.paused
                try:
                    if we_pause:
                        m.pause_all()
                    regs = [m.call(i, _registers) for i in range(m.nvcpus)]
                finally:
                    if we_pause:
                        m.resume_all()
        image = m.image
        return {
            "registers": regs[0] if regs else None, "registers_unread": why_not,
            "vcpus": [{"index": i, "registers": regs[i] if regs else None,
                       "exits": m.exits_by_kind(i), "exits_total": m.vcpu_threads[i].exits}
                      for i in range(m.nvcpus)],
            "exits": m.exits_by_kind(), "exits_total": m.exits,
            "image": None if image is None else {"start": image.start, "end": image.end,
                                                 "entry": image.entry},
        }

    def guest_finish(self) -> dict:
        self.machine.fph.request_stop()
        return {}

    def quit(self) -> dict:
        from .machine import RunResult
        self.machine.quit(RunResult("quit", 0))
        return {}

    def _require_running(self) -> None:
        if not self.machine.running:
            raise CommandError("the guest is not running")


def _registers(vcpu) -> dict:
    """General registers, control registers and EFER, and cs/ss, as plain numbers."""
    out = vcpu.regs_dict()
    s = vcpu.sregs_dict()
    for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
        out[name] = s[name]
    for seg in ("cs", "ss"):
        out[seg] = {k: s[seg][k] for k in ("selector", "base", "limit", "dpl", "l", "db")}
    return out
