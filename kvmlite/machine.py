"""A whole virtual machine: KVM VM + RAM + one vCPU + devices, and its run loop."""

from __future__ import annotations

import collections
import sys
import threading
import time
from dataclasses import dataclass

from . import boot, exits as ex
from .abi import DEFAULT_PORT as FPH_PORT, PORT_COUNT as FPH_PORT_COUNT
from .devices import DebugCon, ExitDevice, FreePageHint, GuestExit, IdleDevice, IoBus, Uart16550
from .devices.output import SerialOutput
from .devices.uart import PORT_COUNT as UART_PORT_COUNT
from .errors import KvmliteError
from .vstate import GuestMemory, Kvm, Vm
from .vstate.vcpu import cpuid_with_apic_id

UART_PORT = 0x3F8
DEBUGCON_PORT = 0xE9
EXIT_PORT = 0x501
IDLE_PORT = 0x504


@dataclass
class RunResult:
    """How a run ended: `status` is what `kvmlite run` exits with."""
    reason: str             # "exit", "hlt", "crash", "migrated", "quit"
    status: int
    crash: ex.Exit | None = None
    exits: int = 0


class Machine:
    """Builds the VM and runs its vCPU.  Other threads (monitor, migration)
    control it with pause() / resume() / quit(), which kick the vCPU out of
    KVM_RUN and park it at a safe point between exits."""

    def __init__(self, memory_size: int, *, prefault: bool = False, output: SerialOutput | None = None,
                 trace=None, log=None, vcpus: int = 1, irqchip: bool = False):
        self.kvm = Kvm()
        self.vm = Vm(self.kvm)
        if irqchip:
            self.vm.create_irqchip()    # before the vCPUs: each gets a LAPIC
        self.memory = GuestMemory(memory_size, prefault=prefault)
        self.vm.add_memory(self.memory)
        # vCPU i has APIC ID i; vCPU 0 boots (several vCPUs: kvmlite/smp.py runs them)
        self.vcpus = [self.vm.create_vcpu() for _ in range(vcpus)]
        for v in self.vcpus:
            v.set_cpuid(cpuid_with_apic_id(self.kvm.supported_cpuid(), v.index))
        self.vcpu = self.vcpus[0]
        self.output = output or SerialOutput()
        self.log = log or (lambda msg: print(f"kvmlite: {msg}", file=sys.stderr, flush=True))
        self.bus = IoBus()
        self.uart = Uart16550(self.output)
        self.debugcon = DebugCon(self.output)
        self.exit_device = ExitDevice()
        self.fph = FreePageHint(self.memory, log=self.log)
        self.idle = IdleDevice(self._idle)
        self.bus.register(UART_PORT, UART_PORT_COUNT, self.uart)
        self.bus.register(DEBUGCON_PORT, 1, self.debugcon)
        self.bus.register(EXIT_PORT, 1, self.exit_device)
        self.bus.register(FPH_PORT, FPH_PORT_COUNT, self.fph)
        self.bus.register(IDLE_PORT, 4, self.idle)
        self.trace = trace
        self.bus.trace = trace
        self.image = None
        self.boot_area = None
        self.exits = 0
        # Exits by kind (exit class), for `kvmlite inspect`: one dict update per
        # exit costs ~35 ns here, against ~28 µs for the exit itself.
        self.exit_counts: dict[type, int] = collections.defaultdict(int)
        # pause/resume protocol between the vCPU thread and controllers
        self._lock = threading.Condition()
        self._pause_requested = False
        self._paused = False
        self._quit = None          # RunResult to return at the next safe point
        self.running = False
        self._throttle = 0.0       # share of time the vCPU sits out (migration auto-converge)
        self.debugger = None       # a GdbStub while `kvmlite run --gdb` is attached

    # ---- devices by name, for migration ------------------------------------

    def devices(self) -> dict:
        return {"uart": self.uart, "debugcon": self.debugcon, "exit": self.exit_device,
                "fph": self.fph}

    # ---- booting -------------------------------------------------------------

    def boot(self, image_path: str, cmdline: str = "", load_addr=None, entry=None) -> None:
        from .loader import load_image
        self.image = load_image(self.memory, image_path, load_addr=load_addr, entry=entry)
        self.boot_area = boot.place_boot_area(self.memory.size, self.image.start, self.image.end)
        info = boot.boot_info_bytes(
            ram_size=self.memory.size, boot_area=self.boot_area, cmdline_len=len(cmdline.encode()),
            fph=True, tsc_khz=self.vcpu.tsc_khz(), image_start=self.image.start,
            image_end=self.image.end, uart_port=UART_PORT, debugcon_port=DEBUGCON_PORT,
            exit_port=EXIT_PORT, fph_port=FPH_PORT, idle_port=IDLE_PORT, **self._smp_boot_info())
        boot.write_boot_area(self.memory, boot_area=self.boot_area, cmdline=cmdline, boot_info=info)
        boot.setup_long_mode(self.vcpu, self.image.entry, self.boot_area)

    def _smp_boot_info(self) -> dict:
        """Boot-info fields about CPUs and interrupts (kvmlite/smp.py fills them for N vCPUs)."""
        return {}

    # ---- the run loop ----------------------------------------------------------

    def run(self) -> RunResult:
        """Run the vCPU on this thread until the guest exits, crashes or is told to quit."""
        vcpu, bus = self.vcpu, self.bus
        vcpu.bind_thread()
        self.running = True
        trace = self.trace
        counts = self.exit_counts
        try:
            while True:
                exit_ = vcpu.run()
                self.exits += 1
                counts[type(exit_)] += 1
                if trace:
                    trace(repr(exit_))
                match exit_:
                    case ex.IoOut(port, size, value):
                        bus.write(port, size, value)
                    case ex.IoIn(port, size, count):
                        vcpu.complete_io_in(bus.read(port, size, count))
                    case ex.IoOutString(port, size, data):
                        bus.write_string(port, size, data)
                    case ex.Interrupted():
                        if (result := self._safe_point()) is not None:
                            return result
                    case ex.Hlt():
                        return RunResult("hlt", 0, exits=self.exits)
                    case ex.MmioRead(_, length):
                        vcpu.complete_mmio_read(b"\xff" * length)
                    case ex.MmioWrite():
                        pass  # no MMIO devices: writes to unbacked addresses vanish
                    case ex.Debug() | ex.InternalError() if self.debugger is not None:
                        # gdb's breakpoints and steps; the stub says if the exit was its own
                        if not self.debugger.vcpu_exit(exit_):
                            return RunResult("crash", CRASH_STATUS, crash=exit_, exits=self.exits)
                        if (result := self._safe_point()) is not None:
                            return result
                    case _:
                        return RunResult("crash", CRASH_STATUS, crash=exit_, exits=self.exits)
        except GuestExit as e:
            return RunResult("exit", e.status, exits=self.exits)
        finally:
            self.running = False
            self.output.flush()
            with self._lock:
                self._paused = False
                self._lock.notify_all()

    def _idle(self, seconds: float) -> None:
        """The guest idles: sleep on this (vCPU) thread, but wake for a pause or quit."""
        with self._lock:
            self._lock.wait_for(lambda: self._pause_requested or self._quit is not None, seconds)

    def _safe_point(self) -> RunResult | None:
        """The vCPU is between exits: park while paused, return a result to quit."""
        with self._lock:
            if self._throttle:
                # Sit out a share of each THROTTLE_PERIOD (a pause or quit cuts it short).
                t = self._throttle
                self._lock.wait_for(lambda: self._pause_requested or self._quit is not None,
                                    THROTTLE_PERIOD * t / (1 - t))
            while True:
                if self._quit is not None:
                    return self._quit
                if not self._pause_requested:
                    self._paused = False
                    self._lock.notify_all()
                    return None
                if not self._paused:
                    self._paused = True
                    self.output.flush()
                    self._lock.notify_all()
                self._lock.wait()

    # ---- control from other threads ----------------------------------------------

    def pause(self, timeout: float = 5.0) -> None:
        """Stop the vCPU at a safe point and wait until it is parked there."""
        with self._lock:
            self._pause_requested = True
            self._lock.notify_all()   # wakes a vCPU parked in the idle device
            self.vcpu.kick()          # and takes one out of KVM_RUN
            if not self._lock.wait_for(lambda: self._paused or not self.running, timeout):
                raise KvmliteError("the vCPU did not stop within %.1f s" % timeout)

    def request_pause(self) -> None:
        """Park the vCPU at its next safe point without waiting for it: for code
        running on the vCPU thread itself (the gdb stub stopping at a breakpoint)."""
        with self._lock:
            self._pause_requested = True

    def resume(self) -> None:
        with self._lock:
            self._pause_requested = False
            self._lock.notify_all()

    def exits_by_kind(self) -> dict[str, int]:
        """Exit counts named by exit class (IoOut, Interrupted, ...), most frequent first."""
        counts = dict(self.exit_counts)   # one C-level copy: the vCPU thread keeps counting
        return {t.__name__: n for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].__name__))}

    @property
    def paused(self) -> bool:
        return self._paused

    def set_throttle(self, share: float) -> None:
        """Make the vCPU sit out `share` (0 to 0.95) of its time, as QEMU's
        auto-converge does, so a guest that dirties memory faster than a
        migration can send it slows down enough for the migration to finish."""
        share = min(max(share, 0.0), 0.95)
        start = share and not self._throttle
        self._throttle = share
        if start:
            threading.Thread(target=self._throttle_kicker, name="throttle", daemon=True).start()

    def _throttle_kicker(self) -> None:
        # A guest that computes without exits must be taken out of KVM_RUN to sit out.
        while self._throttle and self.running:
            time.sleep(THROTTLE_PERIOD)
            if self._throttle:
                self.vcpu.kick()

    def quit(self, result: RunResult) -> None:
        """End run() at the next safe point with `result` (e.g. after migrating away)."""
        with self._lock:
            self._quit = result
            self._lock.notify_all()
        self.vcpu.kick()

    def close(self) -> None:
        self.output.flush()
        self.vm.close()
        self.kvm.close()


CRASH_STATUS = 125
THROTTLE_PERIOD = 0.01   # seconds: the vCPU runs, then sits out its share, every 10 ms
