"""docs/abi.md is the contract: a guest written from it alone registers and is counted."""

from __future__ import annotations

import re

import pytest

from .helpers import assemble, kvmlite

# A second guest, written from docs/abi.md only: a static region header and
# bitmap for 16 MiB of RAM (4096 pages), pages 1024.. marked free.  It
# registers through the device's ports and exits with STATUS's low byte
# (1 = registered) or 0xEE if the device ID is wrong.
ABI_GUEST = r"""
.code64
.globl _start
_start:
    mov  $0x520, %dx
    in   %dx, %eax                 /* ID */
    cmp  $0x31485046, %eax
    jne  no_device
    lea  hdr(%rip), %rax
    mov  $0x524, %dx
    out  %eax, %dx                 /* REGION_LO */
    shr  $32, %rax
    mov  $0x528, %dx
    out  %eax, %dx                 /* REGION_HI */
    mov  $1, %eax
    mov  $0x52c, %dx
    out  %eax, %dx                 /* COMMAND = register */
    in   %dx, %eax                 /* STATUS */
    jmp  done
no_device:
    mov  $0xee, %eax
done:
    mov  $0x501, %dx
    out  %al, %dx
.align 8
hdr:
    .long 0x48505246               /* magic "FRPH" */
    .word VERSION                  /* version */
    .word 64                       /* header_size */
    .long 4096                     /* page_size */
    .long 0                        /* flags */
    .quad 0                        /* base_gpa */
    .quad NPAGES                   /* npages */
    .quad bitmap                   /* bitmap_gpa */
    .quad (NPAGES + 63) / 64 * 8   /* bitmap_size */
    .quad 3072                     /* free_pages (informational) */
    .quad 0
.align 8
bitmap:
    .fill 128, 1, 0                /* pages 0..1023: active */
    .fill 384, 1, 0xff             /* pages 1024..4095: free */
    .fill 64, 1, 0xff              /* spare, for the oversized variant */
"""


def _guest(tmp_path, version=1, npages=4096):
    src = f"#define VERSION {version}\n#define NPAGES {npages}\n" + ABI_GUEST
    return assemble(tmp_path, f"abi_v{version}_n{npages}", src)


def test_guest_written_from_the_abi_document_registers(tmp_path):
    """A from-the-docs guest registers; --stats counts exactly the bits it set free."""
    r = kvmlite("run", str(_guest(tmp_path)), "--memory", "16M", "--stats")
    assert r.returncode == 1, r.stderr          # STATUS = 1: registered
    m = re.search(r"pages total (\d+), free per bitmap (\d+), active (\d+)", r.stderr)
    assert m and m.groups() == ("4096", "3072", "1024"), r.stderr


@pytest.mark.parametrize("version,npages,reason", [
    (2, 4096, 3),          # unsupported version
    (1, 0, 5),             # npages = 0
    (1, 4096 + 64, 5),     # covers pages past the end of RAM
])
def test_bad_registrations_are_refused(tmp_path, version, npages, reason):
    """The VMM refuses a bad header: STATUS = 0x80000000 | reason, and says why."""
    r = kvmlite("run", str(_guest(tmp_path, version, npages)), "--memory", "16M", "--stats")
    assert r.returncode == reason, r.stderr     # the low byte of STATUS
    assert "registration at GPA" in r.stderr and "refused" in r.stderr
    assert "no free-page bitmap registered" in r.stderr
