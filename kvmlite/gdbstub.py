"""A GDB remote stub: `kvmlite run IMAGE --gdb tcp:HOST:PORT`, then
`gdb guest/guest.elf -ex "target remote :PORT"`.

The VM waits for gdb before its first instruction (QEMU's `-s -S`).  gdb then
reads and writes registers and guest-virtual memory, sets breakpoints,
single-steps, continues, and interrupts a running guest with Ctrl-C.  The
protocol is the GDB remote serial protocol ("Remote Protocol" in the gdb
manual): packets `$payload#cs`, each acknowledged with `+`.

Each vCPU is a gdb thread (vCPU i is thread i + 1: `info threads`, `thread
N`), in all-stop mode: a breakpoint or step that stops one vCPU parks them
all, `continue` resumes them all, and `vCont` can step one while the others
stay parked.  Stop replies name the thread (`T05thread:2;`).

How a stop is caught on kvm_pvm.  Measured on this project's host, with the
guest working at CPL 3 as always:

* `KVM_GUESTDBG_USE_SW_BP` does not intercept: an INT3 at CPL 3 raises #BP
  in the guest's own IDT regardless.
* `KVM_GUESTDBG_USE_HW_BP` never fires: DR0-DR3 breakpoints are not honoured.
* `KVM_GUESTDBG_SINGLESTEP` works for every instruction KVM's emulator runs
  (all of CPL 0, and port I/O at CPL 3): each ends in KVM_EXIT_DEBUG.  For a
  native CPL 3 instruction KVM only sets RFLAGS.TF, and the #DB that follows
  also goes to the guest's IDT.

So the stub catches the two exceptions at the door of the guest's handlers,
which every vCPU shares, and undoes the delivery on the vCPU that took it.
While gdb lets the guest run, the first byte of the #DB and #BP handlers that
the guest's IDT names is an INT3 too.  The handlers run at CPL 0, where KVM's
emulator executes them, and that emulator cannot execute INT3 outside real
mode: delivering either exception ends in KVM_EXIT_INTERNAL_ERROR (emulation)
with RIP on the handler, before its first instruction.  The CPU has just
pushed RIP, CS, RFLAGS, RSP and SS at RSP (SDM Vol. 3, 6.14.2), so loading
them back puts the vCPU where it was at CPL 3, as if nothing was delivered.
An INT3 at a CPL 0 address fails the same way with RIP on the breakpoint.
Where KVM does intercept (VMX/SVM) a breakpoint arrives as KVM_EXIT_DEBUG
with exception 3 instead, and the stub takes that too.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import sys
import threading

from . import exits as ex
from .errors import GuestMemoryError, KvmliteError
from .kvm import lib

INT3 = 0xCC
DB_VECTOR, BP_VECTOR = 1, 3
RFLAGS_TF = 1 << 8
PAGE = 4096
PACKET_SIZE = 0x4000          # the largest packet we accept, announced in qSupported

# ---- the packet codec (pure: no sockets, no KVM) -----------------------------------

ESCAPE = 0x7D                 # '}': the next byte is XORed with 0x20
_MUST_ESCAPE = frozenset(b"#$}*")


def checksum(data: bytes) -> int:
    """The sum of the bytes between '$' and '#', modulo 256."""
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape the bytes the framing uses: '#', '$', '}' and '*' (run-length marker)."""
    out = bytearray()
    for b in data:
        if b in _MUST_ESCAPE:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESCAPE:
            b = next(it, None)
            if b is None:
                raise ValueError("packet ends in the middle of an escape")
            b ^= 0x20
        out.append(b)
    return bytes(out)


def encode_packet(payload: bytes) -> bytes:
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


class PacketReader:
    """Splits the byte stream from gdb into events: ("packet", payload),
    ("bad", raw) for a checksum mismatch, ("ack",), ("nack",) and ("interrupt",)
    for the Ctrl-C byte 0x03 that gdb sends outside packets."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple]:
        self._buf += data
        events = []
        while self._buf:
            b = self._buf[0]
            if b != ord("$"):
                del self._buf[0]
                if b == ord("+"):
                    events.append(("ack",))
                elif b == ord("-"):
                    events.append(("nack",))
                elif b == 0x03:
                    events.append(("interrupt",))
                continue        # anything else between packets is line noise
            end = self._buf.find(b"#")
            if end < 0 or len(self._buf) < end + 3:
                if len(self._buf) > 2 * PACKET_SIZE:
                    raise ValueError("a packet without its end, longer than any gdb sends")
                break
            body = bytes(self._buf[1:end])
            sent = bytes(self._buf[end + 1:end + 3])
            del self._buf[:end + 3]
            try:
                ok = int(sent, 16) == checksum(body)
            except ValueError:
                ok = False
            if not ok:
                events.append(("bad", body))
                continue
            try:
                events.append(("packet", unescape(body)))
            except ValueError:
                events.append(("bad", body))
        return events


# ---- registers ------------------------------------------------------------------------

# gdb's amd64 register numbers 0-23 and their sizes in the 'g' packet (gdb's
# features/i386/64bit-core.xml).  Floating point registers follow in gdb's
# layout; the guest uses none (-mgeneral-regs-only), so the 'g' reply stops
# here and gdb shows them as unavailable.
GDB_REGS = (("rax", 8), ("rbx", 8), ("rcx", 8), ("rdx", 8), ("rsi", 8), ("rdi", 8),
            ("rbp", 8), ("rsp", 8), ("r8", 8), ("r9", 8), ("r10", 8), ("r11", 8),
            ("r12", 8), ("r13", 8), ("r14", 8), ("r15", 8), ("rip", 8), ("eflags", 4),
            ("cs", 4), ("ss", 4), ("ds", 4), ("es", 4), ("fs", 4), ("gs", 4))
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_FORMAT = "<" + "".join("Q" if size == 8 else "I" for _, size in GDB_REGS)

TARGET_XML = (b'<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
              b"<target><architecture>i386:x86-64</architecture></target>\n")


def pack_registers(values: dict[str, int]) -> bytes:
    """Registers in gdb's 'g' order, little-endian as the target stores them."""
    return struct.pack(_FORMAT, *(values[name] for name, _ in GDB_REGS))


def unpack_registers(data: bytes) -> dict[str, int]:
    if len(data) != struct.calcsize(_FORMAT):
        raise ValueError(f"expected {struct.calcsize(_FORMAT)} bytes of registers, got {len(data)}")
    return dict(zip((name for name, _ in GDB_REGS), struct.unpack(_FORMAT, data)))


def segment_from_descriptor(selector: int, descriptor: int) -> dict[str, int]:
    """A kvm_segment's fields for `selector` from its 8-byte GDT descriptor
    (SDM Vol. 3, 3.4.5: base and limit are scattered over the descriptor)."""
    limit = (descriptor & 0xFFFF) | ((descriptor >> 48) & 0xF) << 16
    g = (descriptor >> 55) & 1
    return {
        "selector": selector,
        "base": ((descriptor >> 16) & 0xFFFFFF) | ((descriptor >> 56) & 0xFF) << 24,
        "limit": (limit << 12 | 0xFFF) if g else limit,
        "type": (descriptor >> 40) & 0xF, "s": (descriptor >> 44) & 1,
        "dpl": (descriptor >> 45) & 3, "present": (descriptor >> 47) & 1,
        "avl": (descriptor >> 52) & 1, "l": (descriptor >> 53) & 1,
        "db": (descriptor >> 54) & 1, "g": g, "unusable": 0,
    }


def gate_offset(gate: bytes) -> int:
    """The handler address in a 16-byte 64-bit IDT gate (SDM Vol. 3, 6.14.1)."""
    lo, mid, hi = struct.unpack_from("<H4xHI", gate)
    return lo | mid << 16 | hi << 32


def parse_endpoint(text: str) -> tuple[str, int]:
    """`tcp:HOST:PORT`, `tcp:PORT` or QEMU's `tcp::PORT` (both on 127.0.0.1)
    → (host, port); a bad value is a ConfigError naming --gdb."""
    from .endpoints import parse_endpoint as parse
    target = parse(text, what="--gdb", kinds=("tcp",))
    return target.host, target.port


class _Fault(Exception):
    """A guest-virtual address that the page tables do not map."""


# ---- threads: vCPU i is gdb's thread i + 1 --------------------------------------------

def parse_thread_id(text: bytes, nvcpus: int) -> int | None:
    """A thread-id in a packet → vCPU index; None for "-1" (all) and "0" (any).
    gdb numbers threads from 1, so vCPU i is thread i + 1."""
    if text in (b"-1", b"0"):
        return None
    tid = int(text, 16)
    if not 1 <= tid <= nvcpus:
        raise ValueError(f"no thread {tid}")
    return tid - 1


def parse_vcont(actions: bytes, nvcpus: int) -> dict[int, str]:
    """`vCont;ACTION[:TID];...` (the part after "vCont") → {vCPU index: "c" or "s"}.

    For each thread the leftmost action that names it applies (the gdb
    manual); a thread that no action names stays stopped.  `C sig` and
    `S sig` are continue and step: a guest has no signals to deliver."""
    out: dict[int, str] = {}
    if not actions.startswith(b";"):
        raise ValueError("vCont without an action")
    for item in actions[1:].split(b";"):
        act, _, tid = item.partition(b":")
        kind = act[:1]
        if kind in (b"C", b"S"):
            int(act[1:], 16)            # a signal number, checked and not delivered
        elif kind not in (b"c", b"s") or len(act) != 1:
            raise ValueError(f"vCont action {act!r} is not supported")
        index = parse_thread_id(tid, nvcpus) if tid else None
        for i in range(nvcpus) if index is None else (index,):
            out.setdefault(i, kind.lower().decode())
    return out


# ---- the stub ----------------------------------------------------------------------------

class GdbStub:
    """Serves one gdb connection on its own thread; vCPU i is gdb's thread i + 1.

    All-stop, as gdb's default mode and QEMU's stub: when one vCPU stops (a
    breakpoint, a step, Ctrl-C) every vCPU is parked with Machine.pause_all(),
    and `continue` resumes them all.  A vCPU thread hands the stub its debug
    exits through `vcpu_exit()`; registers and memory are only touched while
    the vCPUs are parked, and each vCPU's registers through its own thread
    (vcpu_proxy).  gdb's general thread (Hg) says whose registers and whose
    page tables `g`, `p`, `m` use."""

    def __init__(self, machine, conn: socket.socket):
        self.machine = machine
        self.vcpus = [machine.vcpu_proxy(i) for i in range(machine.nvcpus)]
        self.memory = machine.memory
        self.conn = conn
        self.reader = PacketReader()
        self.breakpoints: dict[int, tuple[int, bytes]] = {}   # vaddr → (gpa, original byte)
        self._traps: dict[int, tuple[int, int, bytes]] = {}   # handler → (vector, gpa, original)
        self._lock = threading.Lock()    # vCPU threads race for _traps and for the first stop
        self._running = False
        self._stepping: frozenset[int] = frozenset()   # vCPUs gdb asked to step
        self._stopped: tuple[int, int] | None = None   # (signal, vCPU): the first vCPU to stop
        self._last_stop = (signal.SIGTRAP, 0)
        self._thread_g = 0               # Hg: whose registers and address space
        self._thread_c: int | None = None   # Hc: whom `s` steps (None: the general thread)
        self._last_sent = b""
        self._ended: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)

    @property
    def vcpu(self):
        """The general thread's vCPU (Hg)."""
        return self.vcpus[self._thread_g]

    # -- setting up -------------------------------------------------------------

    @classmethod
    def wait_for_gdb(cls, machine, endpoint: str) -> "GdbStub":
        """Listen on `endpoint`, wait for gdb, and hold the vCPUs before their first instruction."""
        host, port = parse_endpoint(endpoint)
        try:
            with socket.create_server((host, port)) as server:
                print(f"kvmlite: waiting for gdb on tcp:{host}:{port}", file=sys.stderr, flush=True)
                conn, _ = server.accept()
        except OSError as e:
            raise KvmliteError(f"--gdb {endpoint}: {os.strerror(e.errno) if e.errno else e}") from None
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stub = cls(machine, conn)
        machine.debugger = stub
        machine.pause_all()     # not started yet: they stay parked before their first instruction
        stub._thread.start()
        return stub

    def guest_ended(self, status: int) -> None:
        """Called when Machine.run() has returned: tell gdb, then end the thread."""
        self._ended = status
        os.write(self._wake_w, b"!")
        self._thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- on a vCPU thread ---------------------------------------------------------------

    def vcpu_exit(self, exit_: ex.Exit, index: int = 0) -> bool:
        """A Debug or InternalError exit of vCPU `index`, on its thread: True if it
        is the stub's (the vCPU then either parks for gdb or runs on), False for
        a real crash."""
        vcpu = self.vcpus[index]         # on its own thread: calls go straight to KVM
        match exit_:
            case ex.Debug(exception=vector) if vector == BP_VECTOR:
                return self._stop(signal.SIGTRAP, index)    # KVM intercepted an INT3 (VMX/SVM)
            case ex.Debug():
                rip = vcpu.get_regs().rip
                if index in self._stepping or rip in self.breakpoints:
                    return self._stop(signal.SIGTRAP, index)
                # Continuing through CPL 0 code one emulated instruction at a time
                # (see _arm): re-arm, since the guest may just have loaded its IDT.
                self._arm(vcpu, step=False)
                return True
            case ex.InternalError(suberror=lib.KVM_INTERNAL_ERROR_EMULATION):
                rip = vcpu.get_regs().rip
                trap = self._traps.get(rip)
                if trap is not None:
                    self._take_back(vcpu, trap[0])
                    if trap[0] == DB_VECTOR and index not in self._stepping:
                        # A trap flag left from single-stepping CPL 0 code that
                        # then returned to CPL 3: not a stop gdb asked for.
                        self._arm(vcpu, step=False)
                        return True
                    return self._stop(signal.SIGTRAP, index)
                if rip in self.breakpoints:
                    return self._stop(signal.SIGTRAP, index)
        return False

    def _stop(self, sig: int, index: int) -> bool:
        """Park every vCPU; gdb hears of the first one that stopped.  Another that
        stops at a breakpoint meanwhile is left on it, and hits it again on continue."""
        with self._lock:
            if self._stopped is None:
                self._stopped = (sig, index)
        self.machine.request_pause()
        os.write(self._wake_w, b"!")
        return True

    def _take_back(self, vcpu, vector: int) -> None:
        """Undo the delivery of #DB or #BP that stopped at the guest's handler:
        load RIP, CS, RFLAGS, RSP and SS from the frame the CPU pushed."""
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        rip, cs, rflags, rsp, ss = struct.unpack("<5Q", self._read_virtual(regs.rsp, 40, vcpu))
        for name, selector in (("cs", cs), ("ss", ss)):
            if selector & ~3:
                desc = self._read_virtual(sregs.gdt.base + (selector & ~7), 8, vcpu)
                seg = getattr(sregs, name)
                for field, value in segment_from_descriptor(selector, int.from_bytes(desc, "little")).items():
                    setattr(seg, field, value)
        vcpu.set_sregs(sregs)
        # #BP is a trap: the pushed RIP is after the INT3, and gdb wants the breakpoint's address.
        regs.rip = rip - 1 if vector == BP_VECTOR else rip
        regs.rsp, regs.rflags = rsp, rflags & ~RFLAGS_TF
        vcpu.set_regs(regs)

    def _arm(self, vcpu, step: bool) -> None:
        """Before a vCPU runs (on its thread): INT3 at the entry of the guest's #DB
        and #BP handlers, and KVM's single-step when gdb steps it, or while it is at
        CPL 0 where every instruction is emulated and the handlers may not be set up yet."""
        sregs = vcpu.get_sregs()
        for vector in (DB_VECTOR, BP_VECTOR):
            if sregs.idt.limit < vector * 16 + 15:
                continue
            try:
                handler = gate_offset(self._read_virtual(sregs.idt.base + vector * 16, 16, vcpu))
                with self._lock:
                    if handler not in self._traps:
                        gpa = self._gpa(handler, vcpu)
                        self._traps[handler] = (vector, gpa, self.memory.read(gpa, 1))
                        self.memory.write(gpa, bytes((INT3,)))
            except (_Fault, GuestMemoryError):
                pass            # an IDT that points nowhere: the guest would triple-fault anyway
        control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP
        if step or sregs.cs.selector & 3 == 0:
            control |= lib.KVM_GUESTDBG_SINGLESTEP
        vcpu.set_guest_debug(control)

    def _disarm(self) -> None:
        with self._lock:
            for _, gpa, original in self._traps.values():
                self.memory.write(gpa, original)
            self._traps.clear()

    # -- guest memory by virtual address (the general thread's page tables) ---------------

    def _gpa(self, vaddr: int, vcpu=None) -> int:
        gpa = (vcpu or self.vcpu).translate(vaddr)
        if gpa is None:
            raise _Fault(vaddr)
        return gpa

    def _read_virtual(self, vaddr: int, length: int, vcpu=None) -> bytes:
        out = bytearray()
        while length > 0:
            n = min(length, PAGE - vaddr % PAGE)
            out += self.memory.read(self._gpa(vaddr, vcpu), n)
            vaddr, length = vaddr + n, length - n
        return bytes(out)

    def read_memory(self, vaddr: int, length: int) -> bytes:
        """What gdb sees: the guest's bytes, with its breakpoints' original bytes."""
        data = bytearray(self._read_virtual(vaddr, length))
        for addr, (_, original) in self.breakpoints.items():
            if vaddr <= addr < vaddr + length:
                data[addr - vaddr] = original[0]
        return bytes(data)

    def write_memory(self, vaddr: int, data: bytes) -> None:
        gpas = [self._gpa(vaddr + i) for i in range(len(data))]   # all or nothing
        for i, (gpa, b) in enumerate(zip(gpas, data)):
            if vaddr + i in self.breakpoints:
                self.breakpoints[vaddr + i] = (gpa, bytes((b,)))  # stays an INT3 until removed
            else:
                self.memory.write(gpa, bytes((b,)))

    # -- the connection ------------------------------------------------------------------

    def _send(self, payload: bytes) -> None:
        self._last_sent = encode_packet(payload)
        self.conn.sendall(self._last_sent)

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.conn, selectors.EVENT_READ, "gdb")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "wake":
                        os.read(self._wake_r, 64)
                        if self._ended is not None:
                            self._send(b"W%02x" % (self._ended & 0xFF))
                            return
                        if self._running and self._stopped is not None:
                            self._report_stop(signal.SIGTRAP)
                        continue
                    data = self.conn.recv(65536)
                    if not data:
                        self._detach()      # gdb went away: let the guest run on
                        return
                    for event in self.reader.feed(data):
                        if self._handle(event) == "done":
                            return
        except (OSError, ValueError) as e:
            print(f"kvmlite: gdb connection: {e}", file=sys.stderr)
            self._detach()
        finally:
            sel.close()
            self.conn.close()

    def _handle(self, event: tuple):
        kind = event[0]
        if kind == "interrupt":
            if self._running:
                self._report_stop(signal.SIGINT)
        elif kind == "nack" and self._last_sent:
            self.conn.sendall(self._last_sent)
        elif kind == "bad":
            self.conn.sendall(b"-")
        elif kind == "packet":
            self.conn.sendall(b"+")
            reply = self._dispatch(event[1])
            if reply == "done":
                return "done"
            if reply is not None:
                self._send(reply)
        return None

    def _stop_reply(self) -> bytes:
        sig, index = self._last_stop
        return b"T%02xthread:%x;" % (sig, index + 1)

    def _report_stop(self, default: int) -> None:
        """Park every vCPU, then tell gdb which one stopped and why (Ctrl-C: the general thread)."""
        self.machine.pause_all()
        with self._lock:
            sig, index = self._stopped or (default, self._thread_g)
            self._stopped = None
        self._running = False
        self._stepping = frozenset()
        self._disarm()
        self._last_stop = (sig, index)
        self._thread_g = index           # gdb switches to the thread that stopped
        self._send(self._stop_reply())

    def _resume(self, actions: dict[int, str]) -> None:
        """Run the vCPUs `actions` names ("c" or "s" each); the others stay parked."""
        self._stepping = frozenset(i for i, a in actions.items() if a == "s")
        self._stopped = None
        for i in actions:
            self.machine.call(i, lambda v, step=i in self._stepping: self._arm(v, step))
        self._running = True
        self.machine.resume_all(only=None if len(actions) == len(self.vcpus) else actions)

    def _detach(self) -> None:
        """Take every INT3 out and let the guest run on without gdb."""
        self.machine.pause_all()        # vCPUs are only touched while they are parked
        self.machine.debugger = None
        for gpa, original in self.breakpoints.values():
            self.memory.write(gpa, original)
        self.breakpoints.clear()
        self._disarm()
        for i in range(len(self.vcpus)):
            self.machine.call(i, lambda v: v.set_guest_debug(0))
        self.machine.resume_all()

    # -- commands ---------------------------------------------------------------------------

    def _dispatch(self, packet: bytes):
        """The reply to one packet; None when the reply comes later (a stop)."""
        cmd, args = packet[:1], packet[1:]
        try:
            if cmd == b"?":
                return self._stop_reply()
            if cmd == b"g":
                regs = self.vcpu.regs_dict()
                sregs = self.vcpu.get_sregs()
                values = {**regs, "eflags": regs["rflags"] & 0xFFFFFFFF,
                          **{s: getattr(sregs, s).selector for s in SEGMENTS}}
                return pack_registers(values).hex().encode()
            if cmd == b"G":
                self._set_registers(unpack_registers(bytes.fromhex(args.decode())))
                return b"OK"
            if cmd == b"p":
                n = int(args, 16)
                if n >= len(GDB_REGS):
                    return b""          # not in our set: gdb shows it as unavailable
                data = bytes.fromhex(self._dispatch(b"g").decode())
                start = sum(size for _, size in GDB_REGS[:n])
                return data[start:start + GDB_REGS[n][1]].hex().encode()
            if cmd == b"P":
                n, value = args.split(b"=")
                n = int(n, 16)
                name, size = GDB_REGS[n] if n < len(GDB_REGS) else ("", 0)
                if name in SEGMENTS or not name:
                    return b"E16"       # a selector alone cannot load a segment
                self._set_registers({name: int.from_bytes(bytes.fromhex(value.decode()), "little")})
                return b"OK"
            if cmd == b"m":
                addr, length = (int(x, 16) for x in args.split(b","))
                return self.read_memory(addr, min(length, PACKET_SIZE // 2)).hex().encode()
            if cmd == b"M":
                where, data = args.split(b":")
                addr, length = (int(x, 16) for x in where.split(b","))
                data = bytes.fromhex(data.decode())
                if len(data) != length:
                    return b"E16"
                self.write_memory(addr, data)
                return b"OK"
            if cmd in (b"c", b"s"):
                # Without vCont: `c` resumes every vCPU, `s` steps the Hc thread alone.
                who = self._thread_g if self._thread_c is None else self._thread_c
                if args:
                    self.machine.call(who, lambda v: self._set_rip(v, int(args, 16)))
                if cmd == b"c":
                    self._resume({i: "c" for i in range(len(self.vcpus))})
                else:
                    self._resume({who: "s"})
                return None
            if packet == b"vCont?":
                return b"vCont;c;C;s;S"
            if packet.startswith(b"vCont;"):
                actions = parse_vcont(packet[5:], len(self.vcpus))
                if not actions:
                    return b"E16"
                self._resume(actions)
                return None
            if cmd in (b"Z", b"z"):
                kind, addr, _ = args.split(b",")
                if kind != b"0":
                    return b""          # hardware breakpoints: DR0-3 do not fire on kvm_pvm
                return self._breakpoint(int(addr, 16), insert=cmd == b"Z")
            if cmd == b"k":
                from .machine import RunResult
                self.machine.debugger = None
                self.machine.quit(RunResult("quit", 0))
                return "done"
            if cmd == b"D":
                self._send(b"OK")
                self._detach()
                return "done"
            if cmd == b"H":
                which, index = args[:1], parse_thread_id(args[1:], len(self.vcpus))
                if which == b"g":
                    if index is not None:
                        self._thread_g = index
                elif which == b"c":
                    self._thread_c = index
                else:
                    return b"E16"
                return b"OK"
            if cmd == b"T":
                parse_thread_id(args, len(self.vcpus))
                return b"OK"            # every vCPU lives as long as the VM
            return self._query(packet)
        except (_Fault, GuestMemoryError):
            return b"E14"               # EFAULT
        except (ValueError, IndexError):
            return b"E16"               # EINVAL: a malformed packet, or no such thread

    def _query(self, packet: bytes) -> bytes:
        if packet.startswith(b"qSupported"):
            return b"PacketSize=%x;qXfer:features:read+" % PACKET_SIZE
        if packet.startswith(b"qXfer:features:read:"):
            annex, _, span = packet[len(b"qXfer:features:read:"):].partition(b":")
            if annex != b"target.xml":
                return b"E00"
            offset, length = (int(x, 16) for x in span.split(b","))
            chunk = TARGET_XML[offset:offset + length]
            return (b"m" if offset + length < len(TARGET_XML) else b"l") + chunk
        if packet == b"qAttached":
            return b"1"                 # gdb attached to a running VM: detach, don't kill, on quit
        if packet == b"qC":
            return b"QC%x" % (self._thread_g + 1)
        if packet == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (i + 1) for i in range(len(self.vcpus)))
        if packet == b"qsThreadInfo":
            return b"l"                 # all of them came in the first reply
        if packet.startswith(b"qThreadExtraInfo,"):
            index = parse_thread_id(packet[len(b"qThreadExtraInfo,"):], len(self.vcpus))
            return self._describe(0 if index is None else index).encode().hex().encode()
        return b""                      # anything else: not supported

    def _describe(self, index: int) -> str:
        """What `info threads` shows beside the thread: the vCPU and, with the
        irqchip, whether it waits in HLT or for its start."""
        text = f"vCPU {index}"
        if getattr(self.machine, "irqchip", False):
            state = self.vcpus[index].get_mp_state()
            if state == lib.KVM_MP_STATE_HALTED:
                text += ", halted"
            elif state == lib.KVM_MP_STATE_UNINITIALIZED:
                text += ", not started"
        return text

    @staticmethod
    def _set_rip(vcpu, rip: int) -> None:
        regs = vcpu.get_regs()
        regs.rip = rip
        vcpu.set_regs(regs)

    def _set_registers(self, values: dict[str, int]) -> None:
        regs = self.vcpu.get_regs()
        for name, value in values.items():
            if name == "eflags":
                regs.rflags = (regs.rflags & ~0xFFFFFFFF) | value
            elif name not in SEGMENTS:
                setattr(regs, name, value)
        self.vcpu.set_regs(regs)

    def _breakpoint(self, addr: int, insert: bool) -> bytes:
        if insert and addr not in self.breakpoints:
            gpa = self._gpa(addr)
            self.breakpoints[addr] = (gpa, self.memory.read(gpa, 1))
            self.memory.write(gpa, bytes((INT3,)))
        elif not insert and addr in self.breakpoints:
            gpa, original = self.breakpoints.pop(addr)
            self.memory.write(gpa, original)
        return b"OK"
