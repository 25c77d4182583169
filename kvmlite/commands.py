"""What each subcommand does, kept apart from argument parsing."""

from __future__ import annotations

import os
import sys

from .errors import ConfigError
from .units import parse_addr, parse_size

MAX_MEMORY_HELP = "64G"


def _memory(args, default: str = "256M") -> int:
    from .boot import MAX_RAM, MIB2
    from .cli import MIN_MEMORY
    size = parse_size(args.memory or default)
    if size < MIN_MEMORY:
        raise ConfigError(f"--memory {args.memory}: at least {MIN_MEMORY >> 20} MiB is needed")
    if size % MIB2:
        raise ConfigError(f"--memory {args.memory}: must be a multiple of 2 MiB "
                          "(the boot page tables map RAM in 2 MiB pages)")
    if size > MAX_RAM:
        raise ConfigError(f"--memory {args.memory}: at most {MAX_RAM >> 30} GiB is supported")
    return size


def _trace():
    count = [0]

    def trace(msg: str) -> None:
        count[0] += 1
        print(f"kvmlite: trace {count[0]}: {msg}", file=sys.stderr)
    return trace


def cmd_run(args) -> int:
    if args.incoming:
        if args.image:
            raise ConfigError("give either an image or --incoming, not both")
        if getattr(args, "gdb", None):
            raise ConfigError("--gdb debugs a guest booted here, not one arriving with --incoming")
        from .migration.destination import run_incoming
        return run_incoming(args)
    if not args.image:
        raise ConfigError("no guest image given (try: kvmlite run guest/guest.bin)")
    if args.auth_key or args.tls_cert or args.tls_key or args.tls_ca:
        # a bad key or certificate fails now, not when the first migration starts
        # (imported only here: ssl and friends cost ~40 ms of start-up)
        from .migration.transport import Credentials
        args.creds = Credentials.load(args.auth_key, args.tls_cert, args.tls_key, args.tls_ca)
    from .machine import Machine
    size = _memory(args)
    load = parse_addr(args.load, "--load") if args.load else None
    entry = parse_addr(args.entry, "--entry") if args.entry else None
    from .loader import read_image
    read_image(args.image)   # a missing image fails before /dev/kvm is opened
    gdb = getattr(args, "gdb", None)
    if gdb:
        from .gdbstub import parse_endpoint
        parse_endpoint(gdb)  # and so does a bad --gdb
    smp = getattr(args, "smp", 1)
    if smp < 1:
        raise ConfigError(f"--smp {smp}: at least one vCPU")
    if smp > 1:
        # kvmlite/smp.py: a thread per vCPU, until the VcpuThread core does SMP
        if gdb or args.monitor:
            raise ConfigError("--smp with --gdb or --monitor is not supported yet")
        from .smp import SmpMachine
        if smp > (os.cpu_count() or 1):
            print(f"kvmlite: {smp} vCPUs on {os.cpu_count()} host CPUs: overcommitted", file=sys.stderr)
        machine = SmpMachine(size, vcpus=smp, prefault=args.prealloc,
                             trace=_trace() if args.trace else None)
    else:
        machine = Machine(size, prefault=args.prealloc, trace=_trace() if args.trace else None)
    try:
        machine.boot(args.image, args.cmdline, load, entry)
        if not gdb:
            return run_machine(machine, args)
        from .gdbstub import GdbStub
        stub = GdbStub.wait_for_gdb(machine, gdb)
        status = None
        try:
            status = run_machine(machine, args)
            return status
        finally:
            stub.guest_ended(1 if status is None else status)
    finally:
        machine.close()


def run_machine(machine, args) -> int:
    """Run until the guest ends; serve the monitor meanwhile; report crash and stats."""
    monitor = None
    if getattr(args, "monitor", None):
        from .monitor import Monitor
        monitor = Monitor(machine, args.monitor)
        # outgoing migrations prove themselves with this VMM's own credentials
        monitor.creds = getattr(args, "creds", None)
        monitor.timeout = getattr(args, "timeout", None) or 0
        monitor.start()
    try:
        result = machine.run()
        if result.reason == "migrated" and monitor:
            # Let `kvmlite migrate` read the final stats before this process goes.
            monitor.wait_released()
    finally:
        if monitor:
            monitor.stop()
    if result.reason == "crash":
        from .crash import crash_report
        print(crash_report(machine, result.crash), file=sys.stderr)
    if args.stats:
        print_stats(machine)
    return result.status


def print_stats(machine) -> None:
    total = machine.memory.npages
    if machine.fph.registration is None:
        print(f"kvmlite: stats: pages total {total}, no free-page bitmap registered, "
              f"exits {machine.exits}", file=sys.stderr)
        return
    free = machine.fph.count_free()
    print(f"kvmlite: stats: pages total {total}, free per bitmap {free}, active {total - free}, "
          f"exits {machine.exits}", file=sys.stderr)


def cmd_info(args) -> int:
    from .kvm import lib
    from .vstate import Kvm
    with Kvm() as k:
        print(f"/dev/kvm: KVM API version {k.api_version} (kvmlite needs {lib.KVM_API_VERSION})")
        print(f"vCPU run area: {k.vcpu_mmap_size} bytes")
        for cap, value in k.capabilities().items():
            print(f"  {cap:<36} {'yes' if value else 'no ':<4} {value if value > 1 else ''}")
        cpuid = k.supported_cpuid()
        print(f"supported CPUID leaves: {cpuid.nent}")
        msrs = k.msr_index_list()
        print(f"saveable MSRs: {len(msrs)}")
        modules = _kvm_modules()
        if modules:
            print(f"kernel modules: {', '.join(modules)}")
    print("kvmlite can run guests here.")
    return 0


def _kvm_modules() -> list[str]:
    import os
    try:
        return sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))
    except OSError:
        return []


def cmd_migrate(args) -> int:
    from .migration.client import migrate_command
    return migrate_command(args)


def cmd_pagemap(args) -> int:
    from .pagemap import pagemap_command
    return pagemap_command(args)


def cmd_inspect(args) -> int:
    from .inspector import inspect_command
    return inspect_command(args)
