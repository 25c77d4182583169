"""A whole virtual machine: KVM VM + RAM + vCPUs + devices, and the run loop.

Every vCPU has one thread, its `VcpuThread`, that issues all of its ioctls
(KVM's API document asks for this).  Other threads never touch a vCPU; they
ask its thread with `call()` and wait for the answer, as Firecracker's vCPU
events do.  docs/architecture.md draws the model.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from . import boot, exits as ex
from .abi import DEFAULT_PORT as FPH_PORT, PORT_COUNT as FPH_PORT_COUNT
from .config import BootConfig, MachineConfig
from .devices import DebugCon, ExitDevice, FreePageHint, GuestExit, IdleDevice, IoBus, Uart16550
from .devices.cpustart import DEFAULT_PORT as CPUSTART_PORT, PORT_COUNT as CPUSTART_PORT_COUNT, CpuStart
from .devices.output import SerialOutput
from .devices.uart import PORT_COUNT as UART_PORT_COUNT
from .errors import ConfigError, KvmliteError
from .kvm import lib
from .log import log, trace_log
from .vstate import GuestMemory, Kvm, Vm
from .vstate.dirtylog import DEFAULT_RING_BYTES, BitmapLog, RingLog
from .vstate.vcpu import cpuid_with_apic_id

if TYPE_CHECKING:
    from .loader import LoadedImage
    from .vstate.vcpu import Vcpu

T = TypeVar("T")

UART_PORT = 0x3F8
DEBUGCON_PORT = 0xE9
EXIT_PORT = 0x501
IDLE_PORT = 0x504
CRASH_STATUS = 125
THROTTLE_PERIOD = 0.01   # seconds: a throttled vCPU runs, then sits out its share, every 10 ms
READY_TIMEOUT = 10.0


@dataclass
class RunResult:
    """How a run ended: `status` is what `kvmlite run` exits with."""
    reason: str             # "exit", "hlt", "crash", "migrated", "quit"
    status: int
    crash: ex.Exit | None = None
    vcpu: int = 0           # the vCPU that ended it (for a crash report)
    exits: int = 0


class VcpuThread:
    """One vCPU and the thread that owns it: the only thread that issues its ioctls.

    The thread starts parked.  Parked or running, it serves requests, functions
    of the vCPU put on its queue by `call()`: a running vCPU is kicked out of
    KVM_RUN to serve them.
    """

    def __init__(self, machine: "Machine", index: int):
        self.machine = machine
        self.index = index
        self.vcpu: Vcpu | None = None     # made on the thread, which owns it
        self.exits = 0
        # Exits by kind, for `kvmlite inspect`: one dict update per exit costs
        # ~35 ns here, against ~28 µs for the exit itself.
        self.exit_counts: dict[type, int] = collections.defaultdict(int)
        self.parked = True
        self._requests: collections.deque[tuple[Callable[[Vcpu], Any], Future[Any]]] = collections.deque()
        self._ready: Future[None] = Future()
        self._ident: int | None = None
        self._last_sat_out = 0.0
        self.ring = None          # its dirty ring (MachineConfig.dirty_ring), mapped by its thread
        self.thread = threading.Thread(target=self._main, name=f"vcpu{index}", daemon=True)

    # ---- asked from any thread ------------------------------------------------------

    def call(self, fn: Callable[[Vcpu], T], timeout: float | None = None) -> T:
        """Run `fn(vcpu)` on this vCPU's thread; return its result or raise its exception."""
        if threading.get_ident() == self._ident:
            assert self.vcpu is not None
            return fn(self.vcpu)
        return self.post(fn).result(timeout)

    def post(self, fn: Callable[[Vcpu], T]) -> Future[T]:
        """Queue `fn(vcpu)` for this vCPU's thread and return at once (its future).
        For a vCPU thread asking another without waiting on it (CPU_ON)."""
        m = self.machine
        fut: Future[T] = Future()
        with m._cond:
            if not self.thread.is_alive():
                raise KvmliteError(f"vCPU {self.index} is gone")
            self._requests.append((fn, fut))
            m._cond.notify_all()      # a parked vCPU waits on the condition
            running = not self.parked
        if running and self.vcpu is not None:
            self.vcpu.kick()          # out of KVM_RUN, or out of the next one
        return fut

    def on_thread(self) -> bool:
        return threading.get_ident() == self._ident

    # ---- the thread -----------------------------------------------------------------

    def _main(self) -> None:
        m = self.machine
        self._ident = threading.get_ident()
        try:
            # KVM_CREATE_VCPU is a VM ioctl, issued here anyway so that the
            # vCPU's whole life, from its first ioctl to its last, is this thread's.
            self.vcpu = vcpu = m.vm.create_vcpu(self.index)
            # vCPU i has APIC ID i (docs/boot.md)
            vcpu.set_cpuid(cpuid_with_apic_id(m.kvm.supported_cpuid(), self.index))
            vcpu.bind_thread()
            if m.vm.dirty_ring_bytes:
                self.ring = vcpu.dirty_ring()
        except BaseException as e:
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        try:
            while self._wait_to_run():
                result = m._run_vcpu(self)
                if result is not None:
                    result.vcpu = self.index
                    m._end(result)
            self._serve_until_closed()
        finally:
            if self.ring is not None:
                self.ring.close()
            vcpu.close()

    def _serve(self) -> bool:
        """Serve one queued request, if there is one (called without the lock)."""
        m = self.machine
        with m._cond:
            if not self._requests:
                return False
            fn, fut = self._requests.popleft()
        if fut.set_running_or_notify_cancel():
            try:
                assert self.vcpu is not None      # requests are served only once it exists
                fut.set_result(fn(self.vcpu))
            except BaseException as e:
                fut.set_exception(e)
        return True

    def _wait_to_run(self) -> bool:
        """Between exits: serve requests, sit out a throttle share, park while the
        machine is paused or not started.  False once the VM is over."""
        m = self.machine
        while True:
            if self._serve():
                continue
            with m._cond:
                if self._requests:
                    continue
                if m._result is not None or m._closing:
                    self.parked = True
                    m._cond.notify_all()
                    return False
                if m._throttle and not m._pause_requested:
                    now = time.monotonic()
                    if now - self._last_sat_out >= THROTTLE_PERIOD:
                        self._last_sat_out = now
                        t = m._throttle
                        m._cond.wait(THROTTLE_PERIOD * t / (1 - t))
                        continue
                if m._started and not m._pause_requested and self.index not in m._held:
                    if self.parked:
                        self.parked = False
                        m._cond.notify_all()
                    return True
                if not self.parked:
                    self.parked = True
                    m.output.flush()
                    m._cond.notify_all()
                m._cond.wait()

    def _serve_until_closed(self) -> None:
        """The VM is over: answer requests (a crash report reads registers) until close."""
        m = self.machine
        while True:
            if self._serve():
                continue
            with m._cond:
                if m._closing and not self._requests:
                    return
                if not self._requests:
                    m._cond.wait()


class OnVcpuThread:
    """A stand-in for a Vcpu whose methods run on the vCPU's own thread.

    `machine.vcpu_proxy(i).get_regs()` is `machine.call(i, lambda v: v.get_regs())`,
    so the crash report and the gdb stub read and write registers the way
    KVM asks, without knowing there is a thread in between.
    """

    def __init__(self, vt: VcpuThread):
        self._vt = vt

    @property
    def index(self) -> int:
        return self._vt.index

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._vt.call(lambda vcpu: getattr(vcpu, name)(*args, **kwargs))
        return forward


class Machine:
    """Builds the VM and runs its vCPUs, one thread each.  With two or more, the
    VM has the in-kernel irqchip (a LAPIC per vCPU: timer, IPIs, INIT-SIPI; KVM
    handles HLT) and the CPU-start device (docs/boot.md, boot protocol 2).

        with Machine(MachineConfig(memory=256 << 20), output=lines.append) as vm:
            vm.boot(BootConfig("guest/guest.bin", "workload=hello"))
            result = vm.run()

    Other threads (monitor, migration, gdb) control it with pause_all(),
    resume_all(), quit() and call(): the vCPUs stop only at safe points,
    between exits.  Use it as a context manager, or call close().
    """

    def __init__(self, config: MachineConfig, *, output: object = None,
                 memory: GuestMemory | None = None) -> None:
        """`output`, where the guest's serial and debug-console output goes: None
        (stdout), a file descriptor, a binary file object, or a callable taking
        bytes (a line at a time).  `memory`: RAM already made, of `config.memory`
        bytes, which the machine owns from here on (a destination's, pre-faulted,
        kept when the machine is remade for the stream's vCPUs; a local
        migration's memfd)."""
        if config.memory is None:
            raise ConfigError("the machine needs a memory size")
        if memory is not None and memory.size != config.memory:
            raise ConfigError(f"RAM of {memory.size} bytes given for a machine of {config.memory}")
        self.config = config
        self.kvm = Kvm()
        self.vm = Vm(self.kvm)
        self.irqchip = config.vcpus > 1
        self._cond = threading.Condition()
        self._started = False
        self._pause_requested = False
        self._result: RunResult | None = None
        self._closing = False
        self._throttle = 0.0           # share of time vCPUs sit out (migration auto-converge)
        self._held: frozenset[int] = frozenset()   # vCPUs that stay parked on resume (gdb steps one)
        self._closed = False
        self.vcpu_threads: list[VcpuThread] = []
        try:
            if self.irqchip:
                limit = self.kvm.check("KVM_CAP_MAX_VCPUS") or self.kvm.check("KVM_CAP_NR_VCPUS")
                if config.vcpus > limit:
                    raise ConfigError(f"--smp {config.vcpus}: this KVM allows at most {limit} vCPUs")
                hosts = os.cpu_count() or 1
                if config.vcpus > hosts:
                    log.info(f"{config.vcpus} vCPUs on {hosts} host CPUs: overcommitted")
                self.vm.create_irqchip()     # before the vCPUs: each gets a LAPIC
            if config.dirty_ring:            # before the vCPUs too: each gets a ring
                self.vm.enable_dirty_ring(min(DEFAULT_RING_BYTES, self.vm.dirty_ring_cap()[1]) or DEFAULT_RING_BYTES)
            self.memory = memory or GuestMemory(config.memory, prefault=config.prefault,
                                                backend=config.memory_backend)
            self.vm.add_memory(self.memory)
            # the guest's serial and debug-console output: stdout, or a file
            # descriptor, a binary file object or a callable taking bytes
            self.output = output if isinstance(output, SerialOutput) else SerialOutput(output)
            self._trace = _tracer(config.vcpus > 1) if config.trace else None
            self.bus = IoBus()
            self.bus.trace = self._trace
            self.uart = Uart16550(self.output)
            self.debugcon = DebugCon(self.output)
            self.exit_device = ExitDevice()
            self.fph = FreePageHint(self.memory)
            self.idle = IdleDevice(self._idle)
            self.bus.register(UART_PORT, UART_PORT_COUNT, self.uart)
            self.bus.register(DEBUGCON_PORT, 1, self.debugcon)
            self.bus.register(EXIT_PORT, 1, self.exit_device)
            self.bus.register(FPH_PORT, FPH_PORT_COUNT, self.fph)
            self.bus.register(IDLE_PORT, 4, self.idle)
            self.cpustart: CpuStart | None = None
            if self.irqchip:
                self.cpustart = CpuStart(config.vcpus, self._cpu_on, self.memory.contains)
                self.bus.register(CPUSTART_PORT, CPUSTART_PORT_COUNT, self.cpustart)
            self.boot_area: int | None = None
            self.image: LoadedImage | None = None
            self.debugger: Any = None        # a GdbStub while `kvmlite run --gdb` is attached
            for i in range(config.vcpus):
                vt = VcpuThread(self, i)
                self.vcpu_threads.append(vt)
                vt.thread.start()
            for vt in self.vcpu_threads:
                vt._ready.result(READY_TIMEOUT)
            # What a migration asks which pages were written (vstate/dirtylog.py)
            self.dirty_log = (RingLog(self.vm, [vt.ring for vt in self.vcpu_threads], self.memory.npages)
                              if config.dirty_ring else BitmapLog(self.vm))
        except BaseException:
            if memory is not None and memory not in self.vm.regions:
                memory.close()          # ours, though the VM never got it
            self.close()
            raise

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def remade(self, **changes: Any) -> "Machine":
        """A new Machine with `changes` to this one's config, on this one's RAM, which
        it keeps (pre-faulted, it stays so); this one is closed.  For a destination
        that pre-faulted RAM before the stream said how many vCPUs the guest has."""
        mem = self.memory
        self.vm.regions.remove(mem)        # not unmapped with this VM
        self.close()
        return Machine(replace(self.config, **changes), output=self.output, memory=mem)

    # ---- what other modules ask for -----------------------------------------------

    def devices(self) -> dict[str, Any]:
        """Devices by name, whose state travels with a migration."""
        devices = {"uart": self.uart, "debugcon": self.debugcon, "exit": self.exit_device,
                   "fph": self.fph}
        if self.cpustart is not None:
            devices["cpustart"] = self.cpustart
        return devices

    @property
    def free_pages(self) -> FreePageHint:
        """The FreePageSource a migration asks which pages are free."""
        return self.fph

    @property
    def nvcpus(self) -> int:
        return len(self.vcpu_threads)

    def call(self, index: int, fn: Callable[[Vcpu], T], timeout: float | None = None) -> T:
        """Run `fn(vcpu)` on vCPU `index`'s thread and return what it returns."""
        return self.vcpu_threads[index].call(fn, timeout)

    def call_all(self, fn: Callable[[Vcpu], T], timeout: float | None = None) -> list[T]:
        """Run `fn(vcpu)` on every vCPU's thread at once; their results in vCPU order
        (the first exception raised, once all have answered).  N vCPUs' state is
        read or restored in the time of one, not N one after another."""
        futures = [vt.post(fn) for vt in self.vcpu_threads]
        errors = [f.exception(timeout) for f in futures]
        for e in errors:
            if e is not None:
                raise e
        return [f.result() for f in futures]

    def vcpu_proxy(self, index: int = 0) -> OnVcpuThread:
        return OnVcpuThread(self.vcpu_threads[index])

    @property
    def exits(self) -> int:
        return sum(vt.exits for vt in self.vcpu_threads)

    def exits_by_kind(self, index: int | None = None) -> dict[str, int]:
        """Exit counts named by exit class (IoOut, Interrupted, ...), most frequent first:
        of one vCPU, or summed over all."""
        counts: dict[type, int] = collections.Counter()
        for vt in self.vcpu_threads if index is None else [self.vcpu_threads[index]]:
            counts.update(dict(vt.exit_counts))   # one C-level copy: the vCPU keeps counting
        return {t.__name__: n for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].__name__))}

    # ---- booting ---------------------------------------------------------------------

    def boot(self, cfg: BootConfig) -> None:
        """Load the image, write the boot area where the image is not, and put
        vCPU 0 at its entry in long mode (the others wait for INIT-SIPI or CPU_ON)."""
        from .loader import load_image
        self.image = image = load_image(self.memory, cfg.image, load_addr=cfg.load, entry=cfg.entry)
        self.boot_area = area = boot.place_boot_area(self.memory.size, image.start, image.end)
        tsc_khz = self.call(0, lambda v: v.tsc_khz())
        info = boot.boot_info_bytes(
            ram_size=self.memory.size, boot_area=area, cmdline_len=len(cfg.cmdline.encode()),
            fph=True, tsc_khz=tsc_khz, image_start=image.start, image_end=image.end,
            uart_port=UART_PORT, debugcon_port=DEBUGCON_PORT, exit_port=EXIT_PORT,
            fph_port=FPH_PORT, idle_port=IDLE_PORT, cpu_count=self.nvcpus, lapic=self.irqchip,
            cpustart_port=CPUSTART_PORT if self.cpustart is not None else 0)
        boot.write_boot_area(self.memory, boot_area=area, cmdline=cfg.cmdline, boot_info=info)
        entry = image.entry
        self.call(0, lambda v: boot.setup_long_mode(v, entry, area))

    def _cpu_on(self, cpu: int, entry: int, stack: int, arg: int) -> None:
        """CPU_ON, on the asking vCPU's thread: vCPU `cpu`'s own thread sets its
        registers and makes it runnable (it waits in KVM_RUN, uninitialised, until
        then).  Not waited for: the asking vCPU goes on at once."""
        area = self.boot_area
        assert area is not None, "CPU_ON before boot()"

        def start(vcpu: Vcpu) -> None:
            boot.setup_ap(vcpu, cpu, entry=entry, stack=stack, arg=arg, boot_area=area)
            vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
        self.vcpu_threads[cpu].post(start)

    # ---- running ---------------------------------------------------------------------

    def run(self) -> RunResult:
        """Let the vCPUs run and wait until the guest exits, crashes or is told to quit."""
        with self._cond:
            self._started = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._result is not None)
            result = self._result
        assert result is not None
        result.exits = self.exits
        self.output.flush()
        return result

    @property
    def running(self) -> bool:
        """Started, and not yet over."""
        return self._started and self._result is None

    @property
    def paused(self) -> bool:
        """Every vCPU is parked at a safe point (or the VM has not started)."""
        return all(vt.parked for vt in self.vcpu_threads)

    def _run_vcpu(self, vt: VcpuThread) -> RunResult | None:
        """The run loop of one vCPU: until a kick (None) or the end of the VM (a result)."""
        vcpu, bus, trace, counts = vt.vcpu, self.bus, self._trace, vt.exit_counts
        assert vcpu is not None
        try:
            while True:
                exit_ = vcpu.run()
                vt.exits += 1
                counts[type(exit_)] += 1
                if trace:
                    trace(exit_, vt.index)
                match exit_:
                    case ex.IoOut(port, size, value):
                        bus.write(port, size, value)
                    case ex.IoIn(port, size, count):
                        vcpu.complete_io_in(bus.read(port, size, count))
                    case ex.IoOutString(port, size, data):
                        bus.write_string(port, size, data)
                    case ex.Interrupted():
                        return None       # kicked: serve requests, park if asked
                    case ex.DirtyRingFull():
                        # a vCPU with rings empties its own when KVM says it is full
                        assert isinstance(self.dirty_log, RingLog)
                        self.dirty_log.ring_full(vt.index)
                    case ex.Hlt():
                        # only without the irqchip: with it, KVM keeps a halted vCPU waiting
                        return RunResult("hlt", 0)
                    case ex.MmioRead(_, length):
                        vcpu.complete_mmio_read(b"\xff" * length)
                    case ex.MmioWrite():
                        pass  # no MMIO devices: writes to unbacked addresses vanish
                    case ex.Debug() | ex.InternalError() if self.debugger is not None:
                        # gdb's breakpoints and steps; the stub says if the exit was its own
                        if not self.debugger.vcpu_exit(exit_, vt.index):
                            return RunResult("crash", CRASH_STATUS, crash=exit_)
                        return None
                    case _:
                        return RunResult("crash", CRASH_STATUS, crash=exit_)
        except GuestExit as e:
            return RunResult("exit", e.status)

    def _end(self, result: RunResult) -> None:
        """The first result ends the VM; every other vCPU stops at its next safe point."""
        with self._cond:
            if self._result is None:
                self._result = result
            self._cond.notify_all()
        self._kick_all()

    def _kick_all(self) -> None:
        """Take every running vCPU out of KVM_RUN.  A parked one waits on the
        condition instead, and leaves it only after checking, under the lock,
        what the kicker set before kicking."""
        for vt in self.vcpu_threads:
            if vt.vcpu is not None and not vt.parked and not vt.on_thread():
                vt.vcpu.kick()

    def _idle(self, seconds: float) -> None:
        """The guest idles (on its vCPU thread): sleep, but wake for a pause, a request or quit."""
        vt = next((v for v in self.vcpu_threads if v.on_thread()), None)
        with self._cond:
            self._cond.wait_for(lambda: self._pause_requested or self._result is not None
                                or (vt is not None and bool(vt._requests)), seconds)

    # ---- control from other threads ---------------------------------------------------

    def pause_all(self, timeout: float = 5.0) -> float:
        """Park every vCPU at a safe point and wait until all are parked.
        Returns the seconds it took (part of a migration's downtime)."""
        t0 = time.perf_counter()
        with self._cond:
            if any(vt.on_thread() for vt in self.vcpu_threads):
                raise KvmliteError("pause_all() from a vCPU thread would wait for itself")
            self._pause_requested = True
            self._cond.notify_all()   # wakes vCPUs idling in the idle device
        self._kick_all()              # and takes them out of KVM_RUN
        with self._cond:
            if not self._cond.wait_for(lambda: all(vt.parked for vt in self.vcpu_threads), timeout):
                raise KvmliteError(f"the vCPUs did not stop within {timeout:.1f} s")
        return time.perf_counter() - t0

    def request_pause(self) -> None:
        """Park the vCPUs at their next safe point without waiting: for code running
        on a vCPU thread itself (the gdb stub stopping at a breakpoint)."""
        with self._cond:
            self._pause_requested = True
        self._kick_all()

    def resume_all(self, only: Collection[int] | None = None, timeout: float = 5.0) -> None:
        """Let the vCPUs run again.  `only`: the indices that may run; the others
        stay parked (the gdb stub stepping one thread while the rest wait).

        Waits (up to `timeout`) until each released vCPU has left its park, so
        that whoever is told the guest runs again finds `paused` false: a
        migration that says "cancelled" or "failed", a `cont` that returns.
        Without the wait, query-status read "paused" for up to 80 ms after
        "cancelled" on a loaded host.  No wait before the VM has started, or on
        a vCPU thread (the gdb stub), which would wait for itself."""
        with self._cond:
            self._held = frozenset() if only is None else frozenset(range(self.nvcpus)) - frozenset(only)
            self._pause_requested = False
            self._cond.notify_all()
            if not self._started or any(vt.on_thread() for vt in self.vcpu_threads):
                return
            self._cond.wait_for(lambda: self._pause_requested or self._result is not None
                                or self._closing
                                or not any(vt.parked for vt in self.vcpu_threads if vt.index not in self._held),
                                timeout)

    @property
    def pause_requested(self) -> bool:
        return self._pause_requested

    def set_throttle(self, share: float) -> None:
        """Make the vCPUs sit out `share` (0 to 0.95) of their time, as QEMU's
        auto-converge does, so a guest that dirties memory faster than a
        migration can send it slows down enough for the migration to finish."""
        share = min(max(share, 0.0), 0.95)
        start = share and not self._throttle
        with self._cond:
            self._throttle = share
            self._cond.notify_all()
        if start:
            threading.Thread(target=self._throttle_kicker, name="throttle", daemon=True).start()

    def _throttle_kicker(self) -> None:
        # A guest that computes without exits must be taken out of KVM_RUN to sit out.
        while self._throttle and self._result is None and not self._closing:
            time.sleep(THROTTLE_PERIOD)
            if self._throttle:
                self._kick_all()

    def quit(self, result: RunResult) -> None:
        """End run() with `result` (e.g. after migrating away); vCPUs stop at a safe point."""
        self._end(result)

    def close(self) -> None:
        """Stop the vCPU threads (each closes its own vCPU), then the VM and /dev/kvm."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._closing = True
            if self._result is None:
                self._result = RunResult("quit", 0)
            self._cond.notify_all()
        self._kick_all()
        for vt in self.vcpu_threads:
            if vt.thread.is_alive() and not vt.on_thread():
                vt.thread.join(READY_TIMEOUT)
        if hasattr(self, "output"):
            self.output.flush()
        self.vm.close()
        self.kvm.close()


def _tracer(name_vcpus: bool) -> Callable[..., None]:
    """--trace: one numbered line per exit (and per unclaimed port access)."""
    count = [0]

    def trace(what: object, index: int | None = None) -> None:
        count[0] += 1
        who = f"vcpu{index} " if name_vcpus and index is not None else ""
        trace_log.info(f"trace {count[0]}: {who}{what if isinstance(what, str) else repr(what)}")
    return trace


__all__ = ["Machine", "RunResult", "VcpuThread", "OnVcpuThread", "CRASH_STATUS"]
