"""`kvmlite run --gdb`: the real gdb debugging the guest through the stub."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys

import pytest

from kvmlite.gdbstub import PacketReader, encode_packet
from kvmlite.procs import ChildProcess, free_port

from .helpers import ROOT

GDB = shutil.which("gdb")
ELF = ROOT / "guest" / "guest.elf"
BOOT_INFO_MAGIC = 0x4F464E49        # "INFO", docs/boot.md: the first bytes of the boot area
# 256 MiB of RAM (the default): the boot area is its last 32 KiB + 3 pages of page tables
BOOT_INFO_GPA = (256 << 20) - 0x8000 - 3 * 4096


def start_vm(port: int, cmdline: str, *extra: str) -> ChildProcess:
    vm = ChildProcess([sys.executable, "-m", "kvmlite", "run", str(ELF), "--gdb",
                       f"tcp:127.0.0.1:{port}", "--cmdline", cmdline, *extra])
    vm.wait_for(rf"kvmlite: waiting for gdb on tcp:127\.0\.0\.1:{port}", stream="stderr")
    return vm


def run_gdb(port: int, *commands: str) -> str:
    args = [GDB, "-batch", "-nx", str(ELF), "-ex", f"target remote :{port}"]
    for c in commands:
        args += ["-ex", c]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return done.stdout + done.stderr


@pytest.mark.skipif(GDB is None, reason="needs gdb")
def test_gdb_breaks_steps_reads_and_the_guest_finishes():
    """`break main` stops at the guest's C entry (guest_main), steps, reads boot info and a command-line value, then the guest ends normally."""
    port = free_port()
    with start_vm(port, "workload=hello pages=4321") as vm:
        out = run_gdb(port, "break main", "continue", "next", "frame",
                      "print/x bi->magic", "info registers rip",
                      "break run_hello", "continue", "print g_cfg.pages", "print g_cfg.workload_name",
                      "continue")
        status = vm.wait(60)
    assert re.search(rf"Breakpoint 1, guest_main \(bi={BOOT_INFO_GPA:#x},", out), out
    assert re.search(r"#0  guest_main \(.*\) at \S*main\.c:\d+", out), out     # `next` moved into main.c
    assert f"= {BOOT_INFO_MAGIC:#x}" in out, out
    assert re.search(r"rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <guest_main\+\d+>", out), out
    assert re.search(r"Breakpoint 2, run_hello \(\)", out), out
    assert re.search(r"\$\d+ = 4321\n", out), out
    assert re.search(r'\$\d+ = 0x[0-9a-f]+ "hello"', out), out
    assert "exited normally" in out, out
    assert status == 0, vm.output()
    assert "Hello from the kvmlite guest!" in vm.stdout_lines, vm.output()
    assert vm.summary()["status"] == "ok"


@pytest.mark.skipif(GDB is None, reason="needs gdb")
def test_gdb_stepi_moves_one_instruction_at_cpl3():
    """stepi at guest_main (CPL 3) lands on the next instruction gdb disassembled there."""
    port = free_port()
    with start_vm(port, "workload=hello") as vm:
        out = run_gdb(port, "break guest_main", "continue", "x/2i $pc", "stepi", "print/x $pc",
                      "print/x $cs & 3", "continue")
        status = vm.wait(60)
    listing = re.findall(r"^\s*(?:=> )?(0x[0-9a-f]+) <guest_main(?:\+\d+)?>:", out, re.MULTILINE)
    assert len(listing) == 2, out
    values = re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.MULTILINE)
    assert values == [listing[1], "0x3"], out
    assert status == 0, vm.output()


@pytest.mark.skipif(GDB is None, reason="needs gdb")
def test_gdb_shows_vcpus_as_threads_and_a_breakpoint_stops_them_all():
    """--smp 2: CPU 1 alone runs run_workload_ap; its breakpoint names thread 2, `info threads`
    lists both vCPUs, thread 1 has its own RIP and stays put (its page counter too) while
    stopped, and the guest finishes once gdb continues."""
    port = free_port()
    with start_vm(port, "workload=churn pages=2000 rounds=60", "--smp", "2") as vm:
        out = run_gdb(port, "break run_workload_ap", "continue", "info threads",
                      "thread 1", "print $pc", "print g_percpu[0].stats.pages_written", "shell sleep 1",
                      "print g_percpu[0].stats.pages_written", "print $pc",
                      "thread 2", "print $pc", "delete", "continue")
        status = vm.wait(60)
    assert re.search(r"Thread 2 hit Breakpoint 1, run_workload_ap \(\)", out), out
    assert re.search(r"^\s+1\s+Thread 1 \(vCPU 0\) ", out, re.MULTILINE), out
    assert re.search(r"^\*\s+2\s+Thread 2 \(vCPU 1\) run_workload_ap \(\)", out, re.MULTILINE), out
    values = dict(re.findall(r"^\$(\d+) = (.*)$", out, re.MULTILINE))
    assert values["1"] == values["4"], out           # vCPU 0 did not move while vCPU 1 was stopped
    assert values["2"] == values["3"], out           # ... nor write a page
    assert "<run_workload_ap>" in values["5"] and values["5"] != values["1"], out
    assert "exited normally" in out, out
    assert status == 0, vm.output()
    s = vm.summary()
    assert s["status"] == "ok" and s["cpus"] == 2


def test_ctrl_c_interrupts_a_running_guest():
    """The 0x03 byte stops a running guest with SIGINT; registers are then readable and 'k' ends kvmlite."""
    port = free_port()
    with start_vm(port, "workload=fill live_pages=16 stale=0 seconds=60") as vm:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            reader = PacketReader()

            def exchange(payload: bytes | None, raw: bytes = b"") -> bytes:
                s.sendall(raw or encode_packet(payload))
                while True:
                    for event in reader.feed(s.recv(65536)):
                        if event[0] == "packet":
                            s.sendall(b"+")
                            return event[1]

            assert exchange(b"?") == b"T05thread:1;"
            s.sendall(encode_packet(b"c"))
            vm.wait_for(r"fill: ready")
            assert exchange(None, raw=b"\x03") == b"T02thread:1;"
            regs = bytes.fromhex(exchange(b"g").decode())
            rip = int.from_bytes(regs[16 * 8:17 * 8], "little")
            cs = int.from_bytes(regs[17 * 8 + 4:17 * 8 + 8], "little")     # after eflags
            assert rip > 0x100000 and cs & 3 == 3
            assert exchange(f"m{BOOT_INFO_GPA:x},4".encode()) == BOOT_INFO_MAGIC.to_bytes(4, "little").hex().encode()
            assert exchange(b"mffffffffff000000,4").startswith(b"E")
            s.sendall(encode_packet(b"k"))
        assert vm.wait(30) == 0, vm.output()
