"""The userfaultfd ABI as kvmlite._postcopy sees it, checked against <linux/userfaultfd.h>.

As tests/unit/test_abi_header.py does for <linux/kvm.h>: a separate C program
compiled by gcc against the same header prints every size, offset and
constant, and each must equal what cffi took from the header.  Also the
post-copy wire layout the C threads are given (struct kvmlite_pc_wire) must
match wire.py's own record sizes.  No /dev/kvm, no userfaultfd needed.
"""

from __future__ import annotations

import pytest

from kvmlite._postcopy import ffi, lib
from kvmlite.migration import wire
from tests.unit.cfacts import header_facts

STRUCTS = {
    "uffdio_api": ["api", "features", "ioctls"],
    "uffdio_range": ["start", "len"],
    "uffdio_register": ["range", "mode", "ioctls"],
    "uffdio_copy": ["dst", "src", "len", "mode", "copy"],
    "uffdio_zeropage": ["range", "mode", "zeropage"],
    "uffd_msg": ["event"],
}
HEADER_CONSTANTS = sorted(n for n in dir(lib) if isinstance(getattr(lib, n), int)
                          and (n.startswith(("UFFD", "_UFFDIO", "USERFAULTFD")) or n == "MADV_DONTNEED"))

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, ctype: str | None) -> int:
    """asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr, type UFFDIO."""
    size = ffi.sizeof(ctype) if ctype else 0
    return direction << 30 | size << 16 | lib.UFFDIO << 8 | nr


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <sys/mman.h>",
             "#include <sys/ioctl.h>", "#include <linux/userfaultfd.h>", "int main(void) {"]
    for struct, fields in STRUCTS.items():
        lines.append(f'printf("size {struct} %zu\\n", sizeof(struct {struct}));')
        for f in fields:
            lines.append(f'printf("offset {struct} {f} %zu\\n", offsetof(struct {struct}, {f}));')
    lines.append('printf("offset uffd_msg arg.pagefault.address %zu\\n", '
                 'offsetof(struct uffd_msg, arg.pagefault.address));')
    for name in HEADER_CONSTANTS:
        lines.append(f'printf("const {name} %llu\\n", (unsigned long long)({name}));')
    lines.append("return 0; }")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header(tmp_path_factory):
    return header_facts(tmp_path_factory, "uffd", _c_program())


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_struct_layout_matches_header(header, struct):
    """ffi.sizeof and ffi.offsetof of each field equal the header's sizeof/offsetof."""
    ours = {"sizeof": ffi.sizeof(f"struct {struct}")}
    theirs = {"sizeof": header[("size", struct)]}
    for field in STRUCTS[struct]:
        ours[field] = ffi.offsetof(f"struct {struct}", field)
        theirs[field] = header[("offset", struct, field)]
    assert ours == theirs


def test_fault_message_is_what_the_fault_thread_reads(header):
    """A fault message is 32 bytes with the address at offset 16 (the fault thread reads
    a batch of them with one read(2); the C compiler checks its own field use)."""
    assert ffi.sizeof("struct uffd_msg") == header[("size", "uffd_msg")] == 32
    assert header[("offset", "uffd_msg", "arg.pagefault.address")] == 16


def test_constants_match_header(header):
    """Every userfaultfd constant kvmlite._postcopy exports equals the header's value."""
    assert len(HEADER_CONSTANTS) >= 15
    ours = {name: getattr(lib, name) for name in HEADER_CONSTANTS}
    theirs = {name: header[("const", name)] for name in HEADER_CONSTANTS}
    assert ours == theirs


@pytest.mark.parametrize("name,computed", [
    ("UFFDIO_API", lambda: _ioc(_IOC_READ | _IOC_WRITE, lib._UFFDIO_API, "struct uffdio_api")),
    ("UFFDIO_REGISTER", lambda: _ioc(_IOC_READ | _IOC_WRITE, lib._UFFDIO_REGISTER,
                                     "struct uffdio_register")),
    ("UFFDIO_UNREGISTER", lambda: _ioc(_IOC_READ, lib._UFFDIO_UNREGISTER, "struct uffdio_range")),
    ("UFFDIO_WAKE", lambda: _ioc(_IOC_READ, lib._UFFDIO_WAKE, "struct uffdio_range")),
    ("UFFDIO_COPY", lambda: _ioc(_IOC_READ | _IOC_WRITE, lib._UFFDIO_COPY, "struct uffdio_copy")),
    ("UFFDIO_ZEROPAGE", lambda: _ioc(_IOC_READ | _IOC_WRITE, lib._UFFDIO_ZEROPAGE,
                                     "struct uffdio_zeropage")),
])
def test_ioctl_number_computed_from_struct_size(header, name, computed):
    """An ioctl number rebuilt from dir/size/type/nr and ffi.sizeof equals the header's."""
    assert computed() == header[("const", name)] == getattr(lib, name)


def test_the_c_threads_get_wire_py_layout():
    """struct kvmlite_pc_wire, as wire.py fills it: the same sizes its own encoders produce."""
    w = wire.postcopy_c_wire()
    assert w["run_head"] == len(wire.pages_header(0, 1)) == len(wire.request_record(0)) == 13
    assert w["end_head"] + 4 == len(wire.postcopy_end_record(1, 2, 3)) == 21
    assert w["done_head"] == len(wire.done_record(5)) == 9
    assert w["tag_size"] == 0 and wire.postcopy_c_wire(True)["tag_size"] == wire.TAG_SIZE == 16
    assert w["max_run"] == wire.MAX_POSTCOPY_RUN
    assert {w["pages_type"], w["zero_type"], w["end_type"]} == {
        wire.pages_header(0, 1)[0], wire.zero_record(0, 1)[0], wire.postcopy_end_record(0, 0, 0)[0]}
    assert w["request_type"] == wire.request_record(0)[0] and w["done_type"] == wire.done_record(0)[0]
    c = ffi.new("struct kvmlite_pc_wire *", w)      # every value fits the C field
    assert {k: getattr(c, k) for k in w} == w
