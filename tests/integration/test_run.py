"""`kvmlite run`: booting guests, their output, exit status, crashes and bad input."""

from __future__ import annotations

import re
import subprocess

from kvmlite import exitcodes

from .helpers import assemble, kvmlite, summary


def test_hello_prints_and_exits_zero(guest_image):
    """The hello workload greets on the serial console and exits 0."""
    r = kvmlite("run", str(guest_image), "--cmdline", "workload=hello")
    assert r.returncode == 0, r.stderr
    assert "Hello from the kvmlite guest!" in r.stdout
    s = summary(r.stdout)
    assert s["workload"] == "hello" and s["status"] == "ok" and s["errors"] == 0


def test_churn_self_check_passes(guest_image):
    """churn allocates, fills, frees and verifies pages; every check passes."""
    r = kvmlite("run", str(guest_image), "--memory", "256M",
                "--cmdline", "workload=churn pages=20000 rounds=20 free=50")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    s = summary(r.stdout)
    assert s["errors"] == 0 and s["status"] == "ok"
    assert s["live"] > 0 and s["verified"] >= 20 * s["live"]
    assert s["pages_written"] > 20000


def test_stats_agree_with_the_guest(guest_image):
    """--stats counts free pages from the guest's bitmap; the guest's own count agrees."""
    r = kvmlite("run", str(guest_image), "--memory", "128M", "--stats",
                "--cmdline", "workload=churn pages=5000 rounds=3 free=30")
    assert r.returncode == 0, r.stderr
    s = summary(r.stdout)
    m = re.search(r"pages total (\d+), free per bitmap (\d+), active (\d+)", r.stderr)
    assert m, r.stderr
    total, free, active = map(int, m.groups())
    assert total == (128 << 20) // 4096
    assert free == s["free"]
    assert active == total - free
    assert active >= s["live"]


def test_bad_command_line_exits_2(guest_image):
    """The guest refuses an unknown workload with status 2 and says why."""
    r = kvmlite("run", str(guest_image), "--cmdline", "workload=nonsense")
    assert r.returncode == 2
    assert "nonsense" in r.stdout


def test_guest_exception_is_reported_by_the_guest(guest_image):
    """A page fault in the guest's ring 3 reaches its own handler: status 3 and a report."""
    r = kvmlite("run", str(guest_image), "--cmdline", "workload=fault")
    assert r.returncode == 3
    assert re.search(r"exception 14\b", r.stdout), r.stdout


def test_triple_fault_gives_a_crash_report(guest_image):
    """A triple fault ends the run with status 125 and a report: exit, registers, code."""
    r = kvmlite("run", str(guest_image), "--cmdline", "workload=triple")
    assert r.returncode == 125, r.stdout + r.stderr
    assert "KVM_EXIT_SHUTDOWN" in r.stderr
    assert re.search(r"RIP 0x[0-9a-f]{16}", r.stderr)
    assert "CR0" in r.stderr and "EFER" in r.stderr
    assert "=>" in r.stderr, "no disassembly at RIP"
    assert "Traceback" not in r.stderr


def test_flat_binary_crash_is_disassembled(tmp_path):
    """Any flat 64-bit binary runs; a UD2 with no IDT triple-faults and is disassembled."""
    img = assemble(tmp_path, "ud2", ".code64\n.globl _start\n_start:\n  mov $0x41, %al\n"
                   "  mov $0xe9, %dx\n  out %al, %dx\n  ud2\n")
    r = kvmlite("run", str(img), "--memory", "16M")
    assert r.returncode == 125
    assert r.stdout == "A"
    assert re.search(r"=> 0x0*100007: 0f 0b +ud2", r.stderr), r.stderr


def test_exit_device_status_and_hlt(tmp_path):
    """The exit device's byte becomes the status (up to 63: above are kvmlite's own, a guest's
    200 exits 63 and says so); HLT with interrupts off exits 0."""
    img = assemble(tmp_path, "exit42", ".code64\n.globl _start\n_start:\n  mov $42, %al\n"
                   "  mov $0x501, %dx\n  out %al, %dx\n  hlt\n")
    assert kvmlite("run", str(img), "--memory", "16M").returncode == 42
    img = assemble(tmp_path, "exit200", ".code64\n.globl _start\n_start:\n  mov $200, %al\n"
                   "  mov $0x501, %dx\n  out %al, %dx\n  hlt\n")
    r = kvmlite("run", str(img), "--memory", "16M")
    assert r.returncode == exitcodes.GUEST_MAX and "exit status 200 is above 63" in r.stderr, r.stderr
    img = assemble(tmp_path, "halt", ".code64\n.globl _start\n_start:\n  hlt\n")
    assert kvmlite("run", str(img), "--memory", "16M").returncode == 0


def test_elf_image_loads_by_program_headers(tmp_path):
    """An ELF image loads at its PT_LOAD addresses and starts at e_entry."""
    img = assemble(tmp_path, "elf", ".code64\n.globl _start\n_start:\n  mov $0x4b, %al\n"
                   "  mov $0x3f8, %dx\n  out %al, %dx\n  mov $7, %al\n  mov $0x501, %dx\n"
                   "  out %al, %dx\n", flat=False)
    r = kvmlite("run", str(img), "--memory", "16M")
    assert r.returncode == 7 and r.stdout == "K"


def test_load_and_entry_overrides(tmp_path):
    """--load and --entry place a flat binary anywhere in RAM."""
    img = assemble(tmp_path, "moved", ".code64\n.globl _start\n_start:\n  nop\n  nop\n"
                   "  mov $9, %al\n  mov $0x501, %dx\n  out %al, %dx\n")
    r = kvmlite("run", str(img), "--memory", "16M", "--load", "0x400000", "--entry", "0x400002")
    assert r.returncode == 9, r.stderr


def test_trace_logs_every_exit(tmp_path):
    """--trace writes one line per VM exit."""
    img = assemble(tmp_path, "two", ".code64\n.globl _start\n_start:\n  mov $0xe9, %dx\n"
                   "  mov $0x61, %al\n  out %al, %dx\n  out %al, %dx\n  hlt\n")
    r = kvmlite("run", str(img), "--memory", "16M", "--trace")
    lines = [l for l in r.stderr.splitlines() if "trace" in l]
    assert len(lines) == 3, r.stderr
    assert "IoOut(port=233" in lines[0] and "Hlt" in lines[2]


def _one_line_error(r, *needles, status: int = exitcodes.CONFIG):
    assert r.returncode == status, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmlite: error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_images_give_one_clear_line(tmp_path):
    """Missing, empty, corrupt-ELF, oversized and misplaced images: one line, status 66 (EX_NOINPUT)."""
    bad_image = {"status": exitcodes.NOINPUT}
    _one_line_error(kvmlite("run", str(tmp_path / "nope.bin")), "no such file", **bad_image)
    (tmp_path / "empty.bin").write_bytes(b"")
    _one_line_error(kvmlite("run", str(tmp_path / "empty.bin")), "empty", **bad_image)
    (tmp_path / "bad.elf").write_bytes(b"\x7fELF" + b"\x02\x01\x01" + b"\xff" * 100)
    _one_line_error(kvmlite("run", str(tmp_path / "bad.elf")), "ELF", **bad_image)
    (tmp_path / "big.bin").write_bytes(b"\x90" * (20 << 20))
    _one_line_error(kvmlite("run", str(tmp_path / "big.bin"), "--memory", "16M"), "does not fit", **bad_image)
    (tmp_path / "small.bin").write_bytes(b"\xf4")
    _one_line_error(kvmlite("run", str(tmp_path / "small.bin"), "--memory", "16M",
                            "--load", "0x2000000"), "does not fit", **bad_image)
    (tmp_path / "huge.bin").write_bytes(b"\x90" * ((16 << 20) - 4096))
    _one_line_error(kvmlite("run", str(tmp_path / "huge.bin"), "--memory", "16M",
                            "--load", "0"), "boot area", **bad_image)


HELLO_AT_0 = """
/* A 64-bit flat binary linked at address 0, like the well-known minimal KVM
   examples: absolute addresses, a call (so a stack), port 0xE9, HLT. */
.code64
.globl _start
_start:
    mov     $msg, %esi              /* absolute: right only if loaded at 0 */
1:  lodsb
    test    %al, %al
    jz      2f
    call    putc
    jmp     1b
2:  movq    $42, 0x400              /* the image's own low memory is RAM like any other */
    hlt
putc:
    mov     $0xe9, %dx
    out     %al, %dx
    ret
msg:
    .asciz  "Hello, world!\n"
"""


def test_flat_binary_linked_at_0_runs(tmp_path):
    """`kvmlite run hello.bin --load 0 --entry 0`: a binary linked at 0 prints its message and halts with status 0."""
    src = tmp_path / "hello.S"
    src.write_text(HELLO_AT_0)
    subprocess.run(["gcc", "-c", "-o", str(tmp_path / "hello.o"), str(src)], check=True)
    subprocess.run(["ld", "--oformat", "binary", "-Ttext=0", "-o", str(tmp_path / "hello.bin"),
                    str(tmp_path / "hello.o")], check=True)
    r = kvmlite("run", str(tmp_path / "hello.bin"), "--load", "0", "--entry", "0", "--memory", "16M")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello, world!\n"


def test_bad_memory_sizes_give_one_clear_line(tmp_path):
    """--memory must parse, be page-aligned and within limits: status 78 (EX_CONFIG)."""
    (tmp_path / "g.bin").write_bytes(b"\xf4")
    _one_line_error(kvmlite("run", str(tmp_path / "g.bin"), "--memory", "lots"), "--memory")
    _one_line_error(kvmlite("run", str(tmp_path / "g.bin"), "--memory", "1M"), "at least")
    _one_line_error(kvmlite("run", str(tmp_path / "g.bin"), "--memory", "100000"), "2 MiB")
    _one_line_error(kvmlite("run", str(tmp_path / "g.bin"), "--memory", "128G"), "at most")


def test_large_guest_does_not_touch_all_its_memory(guest_image):
    """A 16 GiB guest boots without the VMM touching all of it."""
    r = kvmlite("run", str(guest_image), "--memory", "16G", "--cmdline", "workload=hello")
    assert r.returncode == 0, r.stderr
    assert "RAM 16384 MiB" in r.stdout


def test_info_reports_kvm():
    """`kvmlite info` reports the API version and capabilities, like kvm-ok."""
    r = kvmlite("info")
    assert r.returncode == 0
    assert "KVM API version 12" in r.stdout
    assert "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2" in r.stdout


def test_idle_device_gives_the_cpu_back_for_a_bounded_time(tmp_path):
    """Three 100 ms idles take at least 0.3 s; an absurd request is capped at 100 ms."""
    import time
    img = assemble(tmp_path, "idle", ".code64\n.globl _start\n_start:\n  mov $0x504, %dx\n"
                   "  mov $100000, %eax\n  out %eax, %dx\n  out %eax, %dx\n  out %eax, %dx\n"
                   "  mov $0xffffffff, %eax\n  out %eax, %dx\n  hlt\n")
    t = time.perf_counter()
    r = kvmlite("run", str(img), "--memory", "16M")
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    assert elapsed >= 0.4                  # 3 × 100 ms, then the capped request: 100 ms more
    assert elapsed < 30                    # not 4295 s
