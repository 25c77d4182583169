"""The free-page-hint device (docs/abi.md): where the guest registers its bitmap."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import abi
from ..bitmap import PAGE_SHIFT, clear_bit_range, mask_to_words, set_bit_range, words_for, words_to_mask
from ..log import log
from .bus import Device

if TYPE_CHECKING:
    from ..vstate.memory import GuestMemory

ALL_ONES32 = 0xFFFFFFFF

# "The registration in force now": the default of the host-side readers below.
CURRENT = object()


class FreePageHint(Device):
    name = "free-page-hint"

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.region_lo = 0
        self.region_hi = 0
        self.status = abi.STATUS_NONE
        self.host_events = 0
        self.registration: abi.Registration | None = None
        self.refusal: str | None = None
        self._last_logged: str | None = None
        self._view: FreeBitmapView | None = None

    # ---- guest side ----------------------------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        if size != 4:
            return (1 << (8 * size)) - 1
        if offset == abi.REG_ID:
            return abi.DEVICE_ID
        if offset == abi.REG_REGION_LO:
            return self.region_lo
        if offset == abi.REG_REGION_HI:
            return self.region_hi
        if offset == abi.REG_COMMAND_STATUS:
            return self.status
        if offset == abi.REG_HOST_EVENTS:
            return self.host_events
        return ALL_ONES32

    def io_write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        if offset == abi.REG_REGION_LO:
            self.region_lo = value
        elif offset == abi.REG_REGION_HI:
            self.region_hi = value
        elif offset == abi.REG_COMMAND_STATUS:
            if value == abi.CMD_REGISTER:
                self._register((self.region_hi << 32) | self.region_lo)
            elif value == abi.CMD_UNREGISTER:
                self.registration = None
                self.status = abi.STATUS_NONE

    def _register(self, gpa: int) -> None:
        ram = self.memory.size
        header = self.memory.read(gpa, abi.HEADER.size) if self.memory.contains(gpa, abi.HEADER.size) else b""
        try:
            self.registration = abi.validate_registration(gpa, header, ram)
            self.status = abi.STATUS_REGISTERED
            self.refusal = None
        except abi.RegistrationError as e:
            self.registration = None
            self.status = abi.STATUS_ERROR | e.reason
            self.refusal = f"free-page-hint registration at GPA {gpa:#x} refused: {e}"
            # A guest repeating the same bad REGISTER in a loop is logged once.
            if self.refusal != self._last_logged:
                log.warning(self.refusal)
            self._last_logged = self.refusal

    # ---- host side -------------------------------------------------------------
    #
    # The vCPU thread may register, re-register or unregister at any moment,
    # also while a migration thread is in the middle of reading.  A reader that
    # looked at `registration` and then calls these passes what it saw as
    # `reg`, so that every answer describes the same registration.

    def request_stop(self) -> None:
        self.host_events |= abi.HOST_EVENT_STOP

    def bitmap_words(self, reg=CURRENT) -> np.ndarray | None:
        """The guest's bitmap as uint64 words, a live view of guest memory (not a copy)."""
        if reg is CURRENT:
            reg = self.registration
        if reg is None:
            return None
        nwords = reg.bitmap_size // 8
        return np.frombuffer(self.memory.slice(reg.bitmap_gpa, nwords * 8), dtype="<u8")

    def always_sent_pages(self, reg=CURRENT) -> list[tuple[int, int]]:
        """(first page, count) ranges sent whatever the bitmap says: header and bitmap."""
        if reg is CURRENT:
            reg = self.registration
        if reg is None:
            return []
        out = []
        for gpa, size in ((reg.region_gpa, abi.HEADER_MIN_SIZE), (reg.bitmap_gpa, reg.bitmap_size)):
            first = gpa >> PAGE_SHIFT
            last = (gpa + size - 1) >> PAGE_SHIFT
            out.append((first, last - first + 1))
        return out

    def hintable_mask(self, reg=CURRENT) -> np.ndarray | None:
        """Per page of RAM, True where the bitmap may call the page free: inside
        the registered range, and not the header's or the bitmap's own pages."""
        if reg is CURRENT:
            reg = self.registration
        if reg is None:
            return None
        mask = np.zeros(self.memory.npages, dtype=bool)
        first = reg.base_gpa >> PAGE_SHIFT
        mask[first:first + reg.npages] = True
        for page, count in self.always_sent_pages(reg):
            mask[page:page + count] = False
        return mask

    def free_mask(self, reg=CURRENT) -> np.ndarray | None:
        """Per page of RAM, True where the hint says free (and the page may be skipped).

        A snapshot: read it after the dirty log was cleared.
        """
        if reg is CURRENT:
            reg = self.registration
        words = self.bitmap_words(reg)
        if words is None:
            return None
        bits = words_to_mask(words, reg.npages)
        mask = np.zeros(self.memory.npages, dtype=bool)
        first = reg.base_gpa >> PAGE_SHIFT
        mask[first:first + reg.npages] = bits
        return mask & self.hintable_mask(reg)

    def count_free(self) -> int:
        view = self.free_view()
        return view.count_free() if view is not None else 0

    # ---- the FreePageSource a migration reads (docs/architecture.md) ---------------

    def free_view(self) -> "FreeBitmapView | None":
        """The registration in force, as a view a migration reads; None without one.

        The same view is returned while the registration lasts, so its
        per-registration set-up is done once.
        """
        reg = self.registration
        if reg is None:
            return None
        view = self._view
        if view is None or view.registration is not reg:
            view = self._view = FreeBitmapView(self, reg)
        return view

    # ---- migration ---------------------------------------------------------------

    def save_state(self) -> dict:
        return {"region_lo": self.region_lo, "region_hi": self.region_hi,
                "status": self.status, "host_events": self.host_events,
                "registration": self.registration.to_state() if self.registration else None}

    def restore_state(self, state: dict) -> None:
        self.region_lo = int(state["region_lo"]) & ALL_ONES32
        self.region_hi = int(state["region_hi"]) & ALL_ONES32
        self.status = int(state["status"]) & ALL_ONES32
        self.host_events = 0
        reg = state["registration"]
        if reg is None:
            self.registration = None
        else:
            # Validated against *this* VMM's RAM: the numbers came over the wire.
            self.registration = abi.validate_numbers(
                reg["region_gpa"], reg["base_gpa"], reg["npages"], reg["bitmap_gpa"],
                self.memory.size)


class FreeBitmapView:
    """One registration of the guest's free bitmap, read as RAM-aligned words.

    `free_words(w0, w1)` reads the guest's bits *now* (a migration calls it
    after clearing the dirty log: claim 2), one uint64 word per 64 pages of
    RAM, 1 = free.  Pages the hint may not cover (outside the registered
    range, the region header's and the bitmap's own pages) always read 0.
    """

    def __init__(self, device: FreePageHint, reg: abi.Registration):
        self.registration = reg
        self._device = device
        npages = device.memory.npages
        # Built a word range at a time: a 16 GiB guest's page-per-bool mask took
        # 14 ms here, inside a local migration's downtime; this takes well under one.
        hintable = np.zeros(words_for(npages), dtype=np.uint64)
        first = reg.base_gpa >> PAGE_SHIFT
        set_bit_range(hintable, first, min(first + reg.npages, npages))
        for page, count in device.always_sent_pages(reg):
            clear_bit_range(hintable, page, page + count)
        self._hintable = hintable
        self._words = device.bitmap_words(reg)          # a live view of guest memory
        base = reg.base_gpa >> PAGE_SHIFT
        # The common case: the guest's bitmap words line up with RAM words; copy, don't convert.
        self._aligned = base % 64 == 0
        self._base_word = base // 64
        self._npages = npages

    def free_words(self, w0: int, w1: int) -> np.ndarray:
        if self._aligned:
            out = np.zeros(w1 - w0, dtype=np.uint64)
            gw0 = self._base_word
            lo, hi = max(w0, gw0), min(w1, gw0 + len(self._words))
            if hi > lo:
                out[lo - w0:hi - w0] = self._words[lo - gw0:hi - gw0]
        else:
            mask = self._device.free_mask(self.registration)[w0 * 64:w1 * 64]
            bits = np.zeros((w1 - w0) * 64, dtype=bool)
            bits[:len(mask)] = mask
            out = mask_to_words(bits)
        out &= self._hintable[w0:w1]
        return out

    def count_free(self) -> int:
        return int(np.bitwise_count(self.free_words(0, len(self._hintable))).sum())
