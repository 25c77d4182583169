"""The free-page-hint ABI (docs/abi.md): constants and strict validation.

Pure code, no KVM: the device calls :func:`validate_registration` with bytes it
read from guest memory, and migration calls :func:`validate_numbers` on state
that arrived over the wire.  Neither trusts anything the guest wrote.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .bitmap import PAGE_SIZE  # the ABI's page size is the host's: one bit per 4 KiB page

HEADER_MAGIC = 0x48505246        # "FRPH"
HEADER_VERSION = 1
HEADER_MIN_SIZE = 64
DEVICE_ID = 0x31485046           # "FPH1"
DEFAULT_PORT = 0x520
PORT_COUNT = 0x20

# magic, version, header_size, page_size, flags, base_gpa, npages, bitmap_gpa,
# bitmap_size, free_pages, reserved
HEADER = struct.Struct("<IHHIIQQQQQQ")
assert HEADER.size == HEADER_MIN_SIZE

# Register offsets (docs/abi.md, "The device")
REG_ID = 0x00
REG_REGION_LO = 0x04
REG_REGION_HI = 0x08
REG_COMMAND_STATUS = 0x0C
REG_HOST_EVENTS = 0x10

CMD_REGISTER = 1
CMD_UNREGISTER = 2

STATUS_NONE = 0
STATUS_REGISTERED = 1
STATUS_ERROR = 0x80000000

HOST_EVENT_STOP = 1 << 0

# Refusal reasons (docs/abi.md, STATUS table)
E_PLACEMENT = 1
E_MAGIC = 2
E_VERSION = 3
E_FORMAT = 4
E_RANGE = 5
E_BITMAP = 6

REASONS = {
    E_PLACEMENT: "the header is not 8-byte aligned or not inside RAM",
    E_MAGIC: "bad magic",
    E_VERSION: "unsupported version",
    E_FORMAT: "header_size < 64, page_size != 4096 or flags != 0",
    E_RANGE: "base_gpa not page-aligned, npages = 0, or the covered pages leave RAM",
    E_BITMAP: "the bitmap is misaligned, leaves RAM, has the wrong size or overlaps the header",
}


class RegistrationError(ValueError):
    def __init__(self, reason: int, detail: str = ""):
        self.reason = reason
        text = REASONS[reason] + (f" ({detail})" if detail else "")
        super().__init__(text)


@dataclass(frozen=True)
class Registration:
    """The VMM's own copy of a validated region: never re-read from the guest."""
    region_gpa: int
    base_gpa: int
    npages: int
    bitmap_gpa: int

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.npages)

    def to_state(self) -> dict:
        return {"region_gpa": self.region_gpa, "base_gpa": self.base_gpa,
                "npages": self.npages, "bitmap_gpa": self.bitmap_gpa}


def bitmap_size(npages: int) -> int:
    """Bytes of bitmap for `npages` bits, rounded up to whole 64-bit words."""
    return (npages + 63) // 64 * 8


def validate_numbers(region_gpa: int, base_gpa: int, npages: int, bitmap_gpa: int,
                     ram_size: int) -> Registration:
    """Check a region's numbers against RAM [0, ram_size); raise RegistrationError."""
    for v in (region_gpa, base_gpa, npages, bitmap_gpa):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise RegistrationError(E_RANGE, "non-integer or negative field")
    if region_gpa % 8 or region_gpa + HEADER_MIN_SIZE > ram_size:
        raise RegistrationError(E_PLACEMENT, f"region at {region_gpa:#x}")
    if base_gpa % PAGE_SIZE or npages == 0 or base_gpa + npages * PAGE_SIZE > ram_size:
        raise RegistrationError(E_RANGE, f"base {base_gpa:#x}, {npages} pages, RAM {ram_size:#x}")
    size = bitmap_size(npages)
    if bitmap_gpa % 8 or bitmap_gpa + size > ram_size:
        raise RegistrationError(E_BITMAP, f"bitmap at {bitmap_gpa:#x}+{size:#x}")
    if bitmap_gpa < region_gpa + HEADER_MIN_SIZE and region_gpa < bitmap_gpa + size:
        raise RegistrationError(E_BITMAP, "bitmap overlaps the header")
    return Registration(region_gpa, base_gpa, npages, bitmap_gpa)


def validate_registration(region_gpa: int, header: bytes, ram_size: int) -> Registration:
    """Validate the header bytes found at `region_gpa` (at least 64 of them)."""
    if region_gpa % 8 or region_gpa + HEADER_MIN_SIZE > ram_size or len(header) < HEADER.size:
        raise RegistrationError(E_PLACEMENT, f"region at {region_gpa:#x}")
    (magic, version, header_size, page_size, flags, base_gpa, npages, bitmap_gpa,
     bm_size, _free, _reserved) = HEADER.unpack_from(header)
    if magic != HEADER_MAGIC:
        raise RegistrationError(E_MAGIC, f"{magic:#010x}")
    if version != HEADER_VERSION:
        raise RegistrationError(E_VERSION, f"version {version}")
    if header_size < HEADER_MIN_SIZE or page_size != PAGE_SIZE or flags != 0:
        raise RegistrationError(E_FORMAT, f"header_size {header_size}, page_size {page_size}, "
                                          f"flags {flags:#x}")
    if bm_size != bitmap_size(npages):
        raise RegistrationError(E_BITMAP, f"bitmap_size {bm_size} for {npages} pages")
    return validate_numbers(region_gpa, base_gpa, npages, bitmap_gpa, ram_size)
