"""N vCPUs, one thread each: the smallest change that runs an SMP guest.

A stop-gap until the VcpuThread core (docs/architecture.md) takes it over;
what that core must keep from here is listed in the SMP report and in
docs/boot.md ("Starting the other CPUs").  Kept apart from machine.py so the
core can replace it in one piece.

* The VM has the in-kernel irqchip: every vCPU a LAPIC (timer, IPIs,
  INIT-SIPI), and KVM handles HLT (a halted vCPU waits in KVM_RUN for an
  interrupt; KVM_EXIT_HLT never comes).
* vCPU 0 runs on the caller's thread, vCPU i > 0 on thread "vcpu-i", which
  enters KVM_RUN at once: KVM keeps an AP there (KVM_MP_STATE_UNINITIALIZED)
  until a SIPI (the AP then starts in real mode; the first KVM_RUN after it
  returns -EAGAIN, an Interrupted exit) or until the CPU-start device asks
  for it: the caller's thread records the request and kicks the AP, whose own
  thread then sets its registers (boot.setup_ap) and KVM_MP_STATE_RUNNABLE.
* The first vCPU that ends the VM (exit device, crash) sets the result; the
  others are kicked and stop at their next safe point.  pause() parks all.
* Not here: migration and gdb of an SMP VM (they use vCPU 0 only), throttling.
"""

from __future__ import annotations

import collections
import threading

from . import boot, exits as ex
from .devices import GuestExit
from .devices.cpustart import (DEFAULT_PORT as CPUSTART_PORT, E_ADDRESS, E_ALREADY_ON, E_NO_CPU,
                               PORT_COUNT as CPUSTART_PORT_COUNT, CpuStart)
from .errors import ConfigError, KvmliteError
from .kvm import lib
from .machine import CRASH_STATUS, Machine, RunResult


class SmpMachine(Machine):
    def __init__(self, memory_size: int, *, vcpus: int, **kw):
        if vcpus < 2:
            raise ConfigError("SmpMachine is for 2 or more vCPUs; Machine runs one")
        super().__init__(memory_size, vcpus=vcpus, irqchip=True, **kw)
        limit = self.kvm.check("KVM_CAP_MAX_VCPUS") or self.kvm.check("KVM_CAP_NR_VCPUS")
        if vcpus > limit:
            raise ConfigError(f"--smp {vcpus}: this KVM allows at most {limit} vCPUs")
        self.cpustart = CpuStart(vcpus, self._cpu_on)
        self.bus.register(CPUSTART_PORT, CPUSTART_PORT_COUNT, self.cpustart)
        self._start_requests: dict[int, tuple[int, int, int]] = {}   # vCPU -> (entry, stack, arg)
        self._started = {0}
        self._parked = set()
        self._threads: list[threading.Thread] = []
        self._vcpu_exits = [0] * vcpus
        self._vcpu_counts = [collections.defaultdict(int) for _ in range(vcpus)]
        self.crashed_vcpu: int | None = None

    def _smp_boot_info(self) -> dict:
        return {"cpu_count": len(self.vcpus), "lapic": True, "cpustart_port": CPUSTART_PORT}

    # ---- starting an AP through the CPU-start device --------------------------------

    def _cpu_on(self, cpu: int, entry: int, stack: int, arg: int) -> int:
        """CPU_ON, on the calling vCPU's thread: check, record, kick vCPU `cpu`."""
        if not 0 < cpu < len(self.vcpus):
            return E_NO_CPU
        if not (self.memory.contains(entry) and 0 < stack <= self.memory.size):
            return E_ADDRESS
        with self._lock:
            if cpu in self._started:
                return E_ALREADY_ON
            self._started.add(cpu)
            self._start_requests[cpu] = (entry, stack, arg)
        self.vcpus[cpu].kick()       # out of KVM_RUN (it waits there for INIT-SIPI)
        return 0

    def _apply_start(self, i: int) -> None:
        """On vCPU i's own thread: the registers the CPU-start device asked for."""
        with self._lock:
            req = self._start_requests.pop(i, None)
        if req is not None:
            entry, stack, arg = req
            v = self.vcpus[i]
            boot.setup_ap(v, i, entry=entry, stack=stack, arg=arg, boot_area=self.boot_area)
            v.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)

    # ---- running ---------------------------------------------------------------------

    def run(self) -> RunResult:
        self.running = True
        self._result = None
        for i in range(1, len(self.vcpus)):
            t = threading.Thread(target=self._ap_thread, args=(i,), name=f"vcpu-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        try:
            result = self._loop(0)
            self._end(result)
            for t in self._threads:
                t.join()
        finally:
            self.running = False
            self.output.flush()
            with self._lock:
                self._paused = False
                self._lock.notify_all()
        self.exits = sum(self._vcpu_exits)
        if self.crashed_vcpu is not None:
            # The crash report (crash.py) reads machine.vcpu: make it the one that crashed.
            self.vcpu = self.vcpus[self.crashed_vcpu]
        res = self._result
        return RunResult(res.reason, res.status, crash=res.crash, exits=self.exits)

    def _ap_thread(self, i: int) -> None:
        self._end(self._loop(i))

    def _end(self, result: RunResult) -> None:
        """vCPU's loop ended with `result`: the first one decides; the others stop."""
        with self._lock:
            if self._result is None:
                self._result = result
            self._quit = self._quit or result
            self._lock.notify_all()
        for v in self.vcpus:
            v.kick()

    def _loop(self, i: int) -> RunResult:
        vcpu, bus, trace = self.vcpus[i], self.bus, self.trace
        vcpu.bind_thread()
        counts = self._vcpu_counts[i]
        exits = 0
        try:
            while True:
                exit_ = vcpu.run()
                exits += 1
                counts[type(exit_)] += 1
                if trace:
                    trace(f"vCPU {i}: {exit_!r}")
                match exit_:
                    case ex.IoOut(port, size, value):
                        bus.write(port, size, value)
                    case ex.IoIn(port, size, count):
                        vcpu.complete_io_in(bus.read(port, size, count))
                    case ex.IoOutString(port, size, data):
                        bus.write_string(port, size, data)
                    case ex.Interrupted():
                        # a kick, or -EAGAIN after a SIPI woke an AP
                        if (result := self._safe_point_of(i)) is not None:
                            return result
                    case ex.MmioRead(_, length):
                        vcpu.complete_mmio_read(b"\xff" * length)
                    case ex.MmioWrite():
                        pass
                    case _:
                        # with the irqchip, HLT stays in KVM: anything else here is a crash
                        self.crashed_vcpu = i
                        self.log(f"vCPU {i} crashed: {exit_!r}")
                        return RunResult("crash", CRASH_STATUS, crash=exit_)
        except GuestExit as e:
            return RunResult("exit", e.status)
        finally:
            self._vcpu_exits[i] = exits
            with self._lock:
                self._parked.discard(i)
                self._lock.notify_all()

    def _safe_point_of(self, i: int) -> RunResult | None:
        """vCPU i is between exits: start it if asked, park while paused, quit if told."""
        self._apply_start(i)
        with self._lock:
            while True:
                if self._quit is not None:
                    return self._quit
                if not self._pause_requested:
                    self._parked.discard(i)
                    self._paused = False
                    return None
                if i not in self._parked:
                    self._parked.add(i)
                    if len(self._parked) == sum(t.is_alive() for t in self._threads) + 1:
                        self._paused = True
                        self.output.flush()
                    self._lock.notify_all()
                self._lock.wait()

    # ---- control from other threads ----------------------------------------------------

    def pause(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._pause_requested = True
            self._lock.notify_all()
        for v in self.vcpus:
            v.kick()
        with self._lock:
            if not self._lock.wait_for(lambda: self._paused or not self.running, timeout):
                raise KvmliteError(f"the vCPUs did not all stop within {timeout:.1f} s "
                                   f"(parked: {sorted(self._parked)})")

    def resume(self) -> None:
        with self._lock:
            self._pause_requested = False
            self._paused = False
            self._lock.notify_all()

    def quit(self, result: RunResult) -> None:
        with self._lock:
            self._quit = result
            self._lock.notify_all()
        for v in self.vcpus:
            v.kick()

    def set_throttle(self, share: float) -> None:
        raise KvmliteError("throttling an SMP VM is not supported yet")

    def exits_by_kind(self) -> dict[str, int]:
        total = collections.Counter()
        for c in self._vcpu_counts:
            total.update(dict(c))
        return {t.__name__: n for t, n in sorted(total.items(), key=lambda kv: (-kv[1], kv[0].__name__))}

    def exits_per_vcpu(self) -> list[int]:
        return [sum(dict(c).values()) for c in self._vcpu_counts]
