"""Load a guest image into guest memory: ELF64 by its program headers, or flat."""

from __future__ import annotations

import io
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .boot import DEFAULT_LOAD_ADDR
from .errors import ImageError

ELF_MAGIC = b"\x7fELF"
PAGE = 4096


@dataclass
class LoadedImage:
    entry: int
    start: int      # lowest GPA written
    end: int        # first GPA above the image, page-aligned
    kind: str       # "elf" or "flat"


def _check_range(path, what, start, size, ram_size):
    # Any RAM will do, address 0 included: the VMM puts its boot area where the
    # image is not (boot.place_boot_area, docs/boot.md).
    if start < 0 or start + size > ram_size:
        raise ImageError(f"{path}: {what} at {start:#x}+{size:#x} does not fit in "
                         f"{ram_size >> 20} MiB of RAM (use a larger --memory)")


def read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file (build the guest with 'make guest')") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not a guest image") from None
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    if not data:
        raise ImageError(f"{path}: the file is empty")
    return data


def load_image(mem, path: str, *, load_addr: int | None = None,
               entry: int | None = None) -> LoadedImage:
    data = read_image(path)
    if data[:4] == ELF_MAGIC:
        if load_addr is not None:
            raise ImageError(f"{path}: --load applies to flat images; an ELF image says where it goes")
        return _load_elf(mem, path, data, entry)
    addr = DEFAULT_LOAD_ADDR if load_addr is None else load_addr
    _check_range(path, "the image", addr, len(data), mem.size)
    mem.write(addr, data)
    end = (addr + len(data) + PAGE - 1) & ~(PAGE - 1)
    start = addr if entry is None else entry
    if not addr <= start < addr + len(data):
        raise ImageError(f"{path}: entry point {start:#x} is outside the image "
                         f"({addr:#x}..{addr + len(data):#x})")
    return LoadedImage(entry=start, start=addr, end=end, kind="flat")


def _load_elf(mem, path, data, entry_override) -> LoadedImage:
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise ImageError(f"{path}: not an x86-64 ELF64 image "
                             f"(class {elf.elfclass}, machine {elf['e_machine']})")
        if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
            raise ImageError(f"{path}: ELF type {elf['e_type']} is not an executable")
        segments = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        if not segments:
            raise ImageError(f"{path}: ELF has no PT_LOAD segments")
        lo, hi = None, 0
        for seg in segments:
            paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            if filesz > memsz:
                raise ImageError(f"{path}: segment at {paddr:#x} has p_filesz > p_memsz")
            if seg["p_offset"] + filesz > len(data):
                raise ImageError(f"{path}: segment at {paddr:#x} runs past the end of the file")
            _check_range(path, "a PT_LOAD segment", paddr, memsz, mem.size)
            mem.write(paddr, seg.data())
            if memsz > filesz:
                mem.zero(paddr + filesz, memsz - filesz)
            lo = paddr if lo is None else min(lo, paddr)
            hi = max(hi, paddr + memsz)
        entry = elf["e_entry"] if entry_override is None else entry_override
    except ELFError as e:
        raise ImageError(f"{path}: bad ELF image: {e}") from None
    except ImageError:
        raise
    except Exception as e:  # pyelftools raises assorted errors on corrupt files
        raise ImageError(f"{path}: bad ELF image: {e}") from None
    if not lo <= entry < hi:
        raise ImageError(f"{path}: entry point {entry:#x} is outside the loaded segments")
    return LoadedImage(entry=entry, start=lo, end=(hi + PAGE - 1) & ~(PAGE - 1), kind="elf")


