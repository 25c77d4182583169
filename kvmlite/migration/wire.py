"""The migration wire format, version 2 (docs/wire-format.md is the contract).

Sending side: small pure functions that return the bytes of one piece of the
stream.  Page payloads never pass through this module: the sender hands them to
`socket.sendmsg` straight from guest memory, and chains a `Crc` over every other
byte it sends.

Receiving side: `StreamDecoder`, which treats the stream as hostile.  Every
length, GPA and count is checked before it is used, and anything wrong --
including truncation and a broken connection -- raises `StreamError`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import msgpack
import numpy as np

from ..bitmap import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from ..errors import StreamError

MAGIC = b"KVMLMIG\x00"
VERSION = 2                      # 2: the handover (READY, COMMIT) after END

# Record types: the first byte of every record after the preamble.
REC_PAGES = 0x50  # 'P'
REC_ZERO = 0x5A   # 'Z'
REC_ROUND = 0x52  # 'R'
REC_STATE = 0x53  # 'S'
REC_END = 0x45    # 'E'
REC_PAGESET = 0x4D  # 'M': post-copy, the sets of pages at the switch
RECORD_NAMES = {REC_PAGES: "PAGES", REC_ZERO: "ZERO", REC_ROUND: "ROUND",
                REC_STATE: "STATE", REC_END: "END", REC_PAGESET: "PAGESET"}

# Post-copy (docs/wire-format.md, "Post-copy").  After the handover the source
# sends PAGES and ZERO records, then POSTCOPY-END; the destination answers on
# the same connection with REQUEST records and, once every page is here, DONE.
REC_POSTCOPY_END = 0x46  # 'F'
REC_REQUEST = 0x51       # 'Q'  destination -> source
REC_DONE = 0x44          # 'D'  destination -> source
REC_NEED = 0x4E          # 'N'  destination -> source, when a broken link is recovered
PAGESET_PENDING = 1      # PAGESET kinds: pages still to come after the switch
PAGESET_FREE = 2         #                pages free at the switch
PAGESET_KINDS = {PAGESET_PENDING: "pending", PAGESET_FREE: "free"}
# PAGES and ZERO records of the post-copy stream carry at most this many pages:
# the destination's C receive thread checks a whole record (and its tags) in
# its buffer before any of it reaches guest memory.
MAX_POSTCOPY_RUN = 256
# With integrity, DONE's tag and NEED's MAC use IVs / labels no record can have.
DONE_TAG_SEQ = (1 << 64) - 1

# Preamble flags (docs/wire-format.md).  A reader refuses every flag it does not know.
# RAM_FD: the guest's RAM comes as a memfd attached to the preamble (SCM_RIGHTS,
# a local migration over a unix socket), not as PAGES and ZERO records.
FLAG_RAM_FD = 0x0001
# CHANNEL: a secondary channel of a migration over several connections
# (--channels N): PAGES and ROUND records only, then an END of its own.
FLAG_CHANNEL = 0x0002
KNOWN_FLAGS = FLAG_RAM_FD | FLAG_CHANNEL

# Limits a destination enforces.
MAX_HEADER_LEN = 64 * 1024
MAX_RAM_ENTRIES = 16
MAX_RAM_BYTES = 1 << 40          # 1 TiB in total
GPA_LIMIT = 1 << 64              # every RAM entry ends at or below this
MAX_VCPUS = 256
MAX_RUN_PAGES = 262144           # 1 GiB per PAGES or ZERO record
MAX_STATE_LEN = 16 << 20

_PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, header_len: 16 bytes
_RUN = struct.Struct("<BQI")         # type, gpa, npages: 13 bytes (PAGES, ZERO)
_TYPE_U32 = struct.Struct("<BI")     # type, u32: 5 bytes (ROUND, STATE)
_END_HEAD = struct.Struct("<BQQ")    # type, pages, zero_pages: the checksummed 17 bytes
_END = struct.Struct("<BQQI32s")     # ... + crc32 + structure MAC: 53 bytes
_U32 = struct.Struct("<I")
_PAGESET = struct.Struct("<BBQI")    # type, kind, gpa, npages: 14 bytes, then the bitmap
_NEED = struct.Struct("<BQI")        # type, gpa, npages: 13 bytes, then the bitmap (and a MAC)
_DONE = struct.Struct("<BQ")         # type, pages: 9 bytes (and a tag)

PAGES_HEADER_SIZE = _RUN.size

# Integrity (docs/wire-format.md, "Integrity"): with it on, every PAGES record
# ends with one GMAC tag per page (over the record's head and the page), and
# END with an HMAC of the stream's structure.
INTEGRITY = "gmac-aes128"        # the header's `integrity` value
TAG_SIZE = 16
MAC_SIZE = 32
_NO_MAC = bytes(MAC_SIZE)
MIGRATION_ID_SIZE = 16           # the header's `migration_id`: a recovery names it


# --------------------------------------------------------------------------
# Sending side

crc = zlib.crc32    # the stream's structure checksum (END), chained over every structural byte


class Crc:
    """The running zlib.crc32 of the stream's structure (all but PAGES payloads).

    `add` returns its argument, so a sender can write
    `sock.sendall(crc.add(pages_header(gpa, n)))`.
    """

    __slots__ = ("value",)

    def __init__(self, value: int = 0):
        self.value = value

    def add(self, data):
        self.value = zlib.crc32(data, self.value)
        return data


@dataclass(frozen=True)
class StreamKeys:
    """The keys of one stream's integrity: GMAC for page records, HMAC for the structure."""
    pages: bytes = field(repr=False)       # 16 bytes: AES-128
    structure: bytes = field(repr=False)   # HMAC-SHA256 key

    @classmethod
    def derive(cls, key: bytes, *nonces: bytes) -> "StreamKeys":
        """From a shared key and the handshake's nonces: fresh for every connection."""
        def sub(label: bytes) -> bytes:
            return hmac.new(key, b"kvmlite-stream-v1 " + label + b"".join(nonces), hashlib.sha256).digest()
        return cls(sub(b"pages")[:16], sub(b"structure"))


# Snapshot files: public keys.  They detect a changed bit anywhere in the
# file, not a forger, who can recompute them: sign a snapshot to prove who made it.
FILE_KEYS = StreamKeys(bytes(16), b"kvmlite-stream-v1 file")


class Integrity:
    """One direction of a stream's integrity: page tags and the structure MAC.

    Tags are numbered: page j of the n-th PAGES record has (n, j) as its GMAC
    IV, so a record or a page moved, repeated or dropped does not verify.
    """

    def __init__(self, keys: StreamKeys):
        from ._wire import ffi, lib
        self._ffi, self._lib = ffi, lib
        ctx = lib.kvmlite_gmac_new(keys.pages)
        if ctx == ffi.NULL:
            raise StreamError("libcrypto could not set up AES-128-GCM")
        self._gmac = ffi.gc(ctx, lib.kvmlite_gmac_free)
        self._keys = keys
        self._mac = hmac.new(keys.structure, digestmod=hashlib.sha256)
        self.seq = 0                  # PAGES records tagged (or checked) so far

    @property
    def gmac(self):
        return self._gmac

    def structure(self, data) -> None:
        self._mac.update(data)

    def finish(self, end_head: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(end_head)
        return mac.digest()

    @property
    def keys(self) -> StreamKeys:
        return self._keys

    def tags(self, heads, ram_pointer, offsets: np.ndarray, npages: np.ndarray) -> bytes:
        """The page tags of len(offsets) records, whose heads are `heads` (13 bytes
        each) and whose npages[i] pages are at ram_pointer + offsets[i]; in order."""
        ffi = self._ffi
        n = len(offsets)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        npages = np.ascontiguousarray(npages, dtype=np.int64)
        out = bytearray(int(npages.sum()) * TAG_SIZE)
        if self._lib.kvmlite_gmac_tags(self._gmac, self.seq, n, ffi.from_buffer("uint8_t[]", heads),
                                       _RUN.size, ffi.cast("uint8_t *", ram_pointer),
                                       ffi.from_buffer("int64_t[]", offsets),
                                       ffi.from_buffer("int64_t[]", npages), PAGE_SIZE,
                                       ffi.from_buffer("uint8_t[]", out)) != 0:
            raise StreamError("libcrypto failed to tag page records")
        self.seq += n
        return bytes(out)

    def check(self, head, payload, tags) -> np.ndarray:
        """The next record's pages against their tags: a bool per page, True where it failed."""
        ffi = self._ffi
        npages = len(payload) // PAGE_SIZE
        bad = np.zeros(npages, dtype=np.uint8)
        n = self._lib.kvmlite_gmac_check(self._gmac, self.seq, ffi.from_buffer("uint8_t[]", head),
                                         len(head), ffi.from_buffer("uint8_t[]", payload), npages,
                                         PAGE_SIZE, ffi.from_buffer("uint8_t[]", tags),
                                         ffi.from_buffer("uint8_t[]", bad))
        if n < 0:
            raise StreamError("libcrypto failed to check a page record")
        self.seq += 1
        return bad.view(bool)


def encode_preamble(info: dict, flags: int = 0) -> bytes:
    """Magic, version, flags and the msgpack header map.  Raises ValueError on a bad map."""
    try:
        validate_info(info)
    except StreamError as e:
        raise ValueError(str(e)) from None
    if flags & ~KNOWN_FLAGS or flags & FLAG_RAM_FD and flags & FLAG_CHANNEL:
        raise ValueError(f"bad preamble flags {flags:#06x}")
    body = msgpack.packb(info, use_bin_type=True)
    if len(body) > MAX_HEADER_LEN:
        raise ValueError(f"stream header is {len(body)} bytes; the limit is {MAX_HEADER_LEN}")
    return _PREAMBLE.pack(MAGIC, VERSION, flags, len(body)) + body


def pages_header(gpa: int, npages: int) -> bytes:
    """The 13 bytes that precede `npages` pages of raw data at `gpa`."""
    if gpa & PAGE_MASK or not 1 <= npages <= MAX_RUN_PAGES:
        raise ValueError(f"bad page run {gpa:#x} x {npages}")
    return _RUN.pack(REC_PAGES, gpa, npages)


def zero_record(gpa: int, npages: int) -> bytes:
    """A ZERO record: `npages` pages at `gpa` are all zero."""
    if gpa & PAGE_MASK or not 1 <= npages <= MAX_RUN_PAGES:
        raise ValueError(f"bad zero run {gpa:#x} x {npages}")
    return _RUN.pack(REC_ZERO, gpa, npages)


# The same 13-byte layout as _RUN, as a numpy record: packed, little-endian.
RUN_DTYPE = np.dtype([("type", "u1"), ("gpa", "<u8"), ("npages", "<u4")])
assert RUN_DTYPE.itemsize == _RUN.size
RUN_GPA_OFFSET = RUN_DTYPE.fields["gpa"][1]          # where the C fast path finds them
RUN_NPAGES_OFFSET = RUN_DTYPE.fields["npages"][1]


def run_records(rec_type: int, gpas: np.ndarray, npages: np.ndarray) -> bytes:
    """Many PAGES or ZERO record heads at once: len(gpas) × 13 bytes, in order.

    What `pages_header`/`zero_record` give one at a time, for a sender that
    has thousands of scattered runs to send and cannot afford Python per run.
    """
    if rec_type not in (REC_PAGES, REC_ZERO):
        raise ValueError(f"record type {rec_type:#x} has no page run")
    if len(gpas) and (np.any(gpas & PAGE_MASK) or npages.min() < 1 or npages.max() > MAX_RUN_PAGES):
        raise ValueError("bad page runs")
    out = np.empty(len(gpas), dtype=RUN_DTYPE)
    out["type"] = rec_type
    out["gpa"] = gpas
    out["npages"] = npages
    return out.tobytes()


def page_buffers(heads, view, offsets: np.ndarray, npages: np.ndarray, tags=None) -> list:
    """The buffers of len(offsets) PAGES records, for one sendmsg: each record's
    13-byte head (from `heads`), its pages straight from guest memory (`view`,
    at offsets[i], npages[i] pages) and, with integrity, its tags (from `tags`,
    TAG_SIZE a page, in order).  Nothing is copied."""
    size = _RUN.size
    bufs = []
    t = 0
    for i, (off, n) in enumerate(zip(offsets.tolist(), npages.tolist())):
        bufs.append(heads[i * size:(i + 1) * size])
        bufs.append(view[off:off + n * PAGE_SIZE])
        if tags is not None:
            bufs.append(tags[t:t + n * TAG_SIZE])
            t += n * TAG_SIZE
    return bufs


def round_record(n: int) -> bytes:
    """A ROUND record: pre-copy round `n` is complete."""
    return _TYPE_U32.pack(REC_ROUND, n)


def state_record(state: dict) -> bytes:
    """A STATE record carrying the msgpack of `state` (bytes values stay bytes)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, not {type(state).__name__}")
    body = msgpack.packb(state, use_bin_type=True)
    if len(body) > MAX_STATE_LEN:
        raise ValueError(f"state is {len(body)} bytes of msgpack; the limit is {MAX_STATE_LEN}")
    return _TYPE_U32.pack(REC_STATE, len(body)) + body


def end_record(pages: int, zero_pages: int, crc: int, integrity: Integrity | None = None) -> bytes:
    """The END record.  `crc` is the running crc of everything structural sent
    before it; the record's own first 17 bytes are folded in here, and into the
    structure MAC when the stream has integrity (else the MAC is zeros)."""
    head = _END_HEAD.pack(REC_END, pages, zero_pages)
    mac = integrity.finish(head) if integrity is not None else _NO_MAC
    return head + _U32.pack(zlib.crc32(head, crc)) + mac


# ---- post-copy (docs/wire-format.md, "Post-copy") ----------------------------

def bitmap_nbytes(npages: int) -> int:
    """Bytes of a page bitmap for `npages` pages: whole little-endian u64 words."""
    return (npages + 63) // 64 * 8


def _bitmap_bytes(npages: int, words: np.ndarray) -> bytes:
    words = np.ascontiguousarray(words, dtype="<u8")
    if len(words) * 8 != bitmap_nbytes(npages):
        raise ValueError(f"{len(words)} bitmap words for {npages} pages")
    if npages % 64 and int(words[-1]) >> (npages % 64):
        raise ValueError("bits set past the last page")
    return words.tobytes()


def pageset_record(kind: int, gpa: int, npages: int, words: np.ndarray) -> bytes:
    """A PAGESET record: the pages of the RAM region at `gpa` in set `kind`, one bit each."""
    if kind not in PAGESET_KINDS:
        raise ValueError(f"unknown page set kind {kind}")
    if gpa & PAGE_MASK or not 1 <= npages <= MAX_RAM_BYTES >> PAGE_SHIFT:
        raise ValueError(f"bad page set region {gpa:#x} x {npages}")
    return _PAGESET.pack(REC_PAGESET, kind, gpa, npages) + _bitmap_bytes(npages, words)


def postcopy_end_record(pages: int, zero_pages: int, crc: int) -> bytes:
    """POSTCOPY-END: the source sent every page still to come on this connection.
    `crc` is the running crc of this connection's post-copy record heads; the
    record's own first 17 bytes are folded in here.  (The C page server builds
    the same bytes; a unit test compares them.)"""
    head = _END_HEAD.pack(REC_POSTCOPY_END, pages, zero_pages)
    return head + _U32.pack(zlib.crc32(head, crc))


def request_record(gpa: int, npages: int = 1) -> bytes:
    """REQUEST (destination -> source): send these pages now, a fault waits for them."""
    if gpa & PAGE_MASK or not 1 <= npages <= MAX_POSTCOPY_RUN:
        raise ValueError(f"bad request {gpa:#x} x {npages}")
    return _RUN.pack(REC_REQUEST, gpa, npages)


def done_record(pages: int) -> bytes:
    """DONE (destination -> source), without its tag: all `pages` pages still to come are here."""
    return _DONE.pack(REC_DONE, pages)


def need_record(gpa: int, npages: int, words: np.ndarray, keys: StreamKeys | None = None) -> bytes:
    """NEED (destination -> source, at recovery): the pages of the region still
    missing here; on a keyed link followed by its MAC (need_mac)."""
    if gpa & PAGE_MASK or not 1 <= npages <= MAX_RAM_BYTES >> PAGE_SHIFT:
        raise ValueError(f"bad region {gpa:#x} x {npages}")
    rec = _NEED.pack(REC_NEED, gpa, npages) + _bitmap_bytes(npages, words)
    return rec + need_mac(keys, rec) if keys is not None else rec


def need_mac(keys: StreamKeys, record) -> bytes:
    """NEED's MAC on a keyed link: HMAC-SHA256 under the structure key, labelled."""
    return hmac.new(keys.structure, b"kvmlite-need-v1 " + bytes(record), hashlib.sha256).digest()


def postcopy_c_wire(integrity: bool = False) -> dict:
    """The post-copy byte layout for kvmlite._postcopy's threads
    (struct kvmlite_pc_wire): record types and sizes, from this module only."""
    return {"pages_type": REC_PAGES, "zero_type": REC_ZERO, "end_type": REC_POSTCOPY_END,
            "request_type": REC_REQUEST, "done_type": REC_DONE, "run_head": _RUN.size,
            "end_head": _END_HEAD.size, "done_head": _DONE.size,
            "tag_size": TAG_SIZE if integrity else 0, "max_run": MAX_POSTCOPY_RUN,
            "done_seq": DONE_TAG_SEQ}


# --------------------------------------------------------------------------
# Frames: u32 length + msgpack map.  The connection handshake and the
# handover after END (docs/wire-format.md) are sequences of frames.

MAX_FRAME = 64 * 1024
MAX_FRAME_ERROR = 4096          # encode_frame shortens longer error messages

# The handover's `status` values.
READY = "ready"                 # destination: END verified, state restored; waiting for COMMIT
COMMIT = "commit"               # source: the VM is yours; I will not run it again
RUNNING = "running"             # destination: COMMIT taken, the guest runs here
ABORTED = "aborted"             # destination: no COMMIT in time; I will never run this guest
ERROR = "error"                 # destination: the stream was refused (before READY)
# Post-copy: the destination's answer to a header that announces it (its VM is
# made and userfaultfd works), and to a recovery's RESUME frame.
PREPARED = "prepared"
OK = "ok"
POSTCOPY_STATS = "postcopy-stats"   # destination -> source after DONE: its figures, informational
DEST_ANSWERS_TO_HEADER = (PREPARED, ERROR)
DEST_ANSWERS_TO_RESUME = (OK, ERROR)
DEST_ANSWERS_TO_END = (READY, ERROR)
DEST_ANSWERS_TO_COMMIT = (RUNNING, ABORTED)
SOURCE_ANSWERS_TO_READY = (COMMIT,)
# A local migration (preamble flag RAM_FD): the destination has mapped the RAM
# and built its VM; only now does the source pause the guest.
MAPPED = "mapped"
DEST_ANSWERS_TO_RAM_FD = (MAPPED, ERROR)
_NEEDS_ERROR = (ERROR, ABORTED)


def encode_frame(obj: dict, max_len: int = MAX_FRAME) -> bytes:
    """One frame.  An `error` longer than MAX_FRAME_ERROR characters is shortened so it fits."""
    if not isinstance(obj, dict):
        raise ValueError("a frame is a map")
    err = obj.get("error")
    if isinstance(err, str) and len(err) > MAX_FRAME_ERROR:
        obj = {**obj, "error": err[:MAX_FRAME_ERROR - 3] + "..."}
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_len:
        raise ValueError(f"frame is {len(body)} bytes; the limit is {max_len}")
    return _U32.pack(len(body)) + body


def read_frame(sock, what: str, statuses: tuple[str, ...] | None = None,
               max_len: int = MAX_FRAME) -> dict:
    """One frame from `sock`, checked: a map, and with `statuses`, a `status` among
    them (with an `error` string where the status needs one).  StreamError otherwise."""
    head = bytearray(_U32.size)
    _recv_exactly(sock, memoryview(head), f"before {what}")
    (n,) = _U32.unpack(head)
    if not 1 <= n <= max_len:
        raise StreamError(f"{what}: frame length {n} is outside 1 to {max_len}")
    body = bytearray(n)
    _recv_exactly(sock, memoryview(body), f"in the middle of {what}")
    obj = _unpack_map(body, what)
    if statuses is not None:
        status = obj.get("status")
        if status not in statuses:
            raise StreamError(f"{what}: status {_show(status)}, expected {' or '.join(statuses)}")
        if status in _NEEDS_ERROR and not isinstance(obj.get("error"), str):
            raise StreamError(f"{what}: status {status} without an error message")
    return obj


# --------------------------------------------------------------------------
# Receiving side

@dataclass
class Header:
    """The validated stream header."""
    version: int
    page_size: int
    ram: list[tuple[int, int]]   # (gpa, size), in the order the source sent them
    vcpus: int
    hint: bool
    live: bool
    source: str
    info: dict = field(repr=False)  # the whole map, unknown keys included
    integrity: bool = False         # PAGES records carry tags, END a structure MAC
    postcopy: bool = False          # the source may switch to post-copy (PAGESET records)
    migration_id: bytes | None = None   # what a post-copy recovery names
    ram_fd: bool = False            # flag RAM_FD: the RAM came as a descriptor, no page records
    channel: bool = False           # flag CHANNEL: a secondary channel's stream


@dataclass(frozen=True, slots=True)
class Pages:
    """`npages` pages at `gpa`; their data is already in destination memory.
    `failed`: with integrity, a bool per page, True where its tag did not match."""
    gpa: int
    npages: int
    failed: Any = None


@dataclass(frozen=True, slots=True)
class Zero:
    """`npages` pages at `gpa` are all zero (the destination must make them so)."""
    gpa: int
    npages: int


@dataclass(frozen=True, slots=True)
class Round:
    """Pre-copy round `n` is complete."""
    n: int


@dataclass(frozen=True, slots=True)
class State:
    """vCPU and device state (a msgpack map, checked to be a dict and nothing more)."""
    state: dict


@dataclass(frozen=True, slots=True)
class End:
    """The stream is complete and its counts and checksum matched."""
    pages: int
    zero_pages: int
    crc: int


@dataclass(frozen=True, slots=True)
class PageSet:
    """Post-copy: the pages of the RAM region at `gpa` in set `kind` (PAGESET_*),
    as uint64 words, bit i = page (gpa >> 12) + i."""
    kind: int
    gpa: int
    npages: int
    words: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Request:
    """Post-copy return path: the destination waits for these pages."""
    gpa: int
    npages: int


@dataclass(frozen=True, slots=True)
class Done:
    """Post-copy return path: every page still to come (`pages` of them) is there."""
    pages: int


Record = Union[Pages, Zero, Round, State, End, PageSet]
Target = Callable[[int, int], Any]  # (gpa, nbytes) -> writable buffer of nbytes


def _show(value: Any, limit: int = 40) -> str:
    try:
        r = repr(value)
    except RecursionError:  # msgpack nests ~1000 deep before it gives up; repr does not
        r = f"a deeply nested {type(value).__name__}"
    return r if len(r) <= limit else r[:limit] + "..."


def _unpack_map(data, what: str) -> dict:
    n = len(data)
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False,
                              max_str_len=n, max_bin_len=n, max_array_len=n,
                              max_map_len=n, max_ext_len=n)
    except Exception as e:  # msgpack raises many types on garbage; all mean the same
        raise StreamError(f"{what} is not valid msgpack ({type(e).__name__}: "
                          f"{_show(str(e), 80)})") from e
    if not isinstance(obj, dict):
        raise StreamError(f"{what} is a msgpack {type(obj).__name__}, not a map")
    return obj


def validate_info(info: Any, version: int = VERSION) -> Header:
    """Check a stream header map; return it as a Header or raise StreamError."""
    if not isinstance(info, dict):
        raise StreamError(f"stream header is a {type(info).__name__}, not a map")
    ps = info.get("page_size")
    if type(ps) is not int or ps != PAGE_SIZE:
        raise StreamError(f"stream header: page_size is {_show(ps)}; kvmlite needs {PAGE_SIZE}")
    ram = info.get("ram")
    if not isinstance(ram, (list, tuple)) or not 1 <= len(ram) <= MAX_RAM_ENTRIES:
        raise StreamError(f"stream header: ram must be a list of 1 to {MAX_RAM_ENTRIES} "
                          f"[gpa, size] entries, not {_show(ram)}")
    regions = []
    for i, entry in enumerate(ram):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2
                or type(entry[0]) is not int or type(entry[1]) is not int):
            raise StreamError(f"stream header: ram[{i}] is {_show(entry)}, not a [gpa, size] pair")
        gpa, size = entry
        if gpa < 0 or size <= 0 or (gpa | size) & PAGE_MASK or gpa + size > GPA_LIMIT:
            raise StreamError(f"stream header: ram[{i}] = [{gpa:#x}, {size:#x}] is not a "
                              f"non-empty page-aligned range")
        regions.append((gpa, size))
    total = sum(size for _, size in regions)
    if total > MAX_RAM_BYTES:
        raise StreamError(f"stream header: {total:#x} bytes of RAM is more than the "
                          f"{MAX_RAM_BYTES >> 40} TiB limit")
    prev_end = 0
    for gpa, size in sorted(regions):
        if gpa < prev_end:
            raise StreamError(f"stream header: RAM regions overlap at {gpa:#x}")
        prev_end = gpa + size
    vcpus = info.get("vcpus")
    if type(vcpus) is not int or not 1 <= vcpus <= MAX_VCPUS:
        raise StreamError(f"stream header: vcpus is {_show(vcpus)}, not 1 to {MAX_VCPUS}")
    hint, live, source = info.get("hint", False), info.get("live", False), info.get("source", "")
    if type(hint) is not bool or type(live) is not bool:
        raise StreamError(f"stream header: hint and live must be booleans, not "
                          f"{_show(hint)} and {_show(live)}")
    if not isinstance(source, str):
        raise StreamError(f"stream header: source is {_show(source)}, not a string")
    integrity = info.get("integrity", "none")
    if integrity not in ("none", INTEGRITY):
        raise StreamError(f"stream header: integrity {_show(integrity)} is not one kvmlite knows")
    postcopy, mid = info.get("postcopy", False), info.get("migration_id")
    if type(postcopy) is not bool:
        raise StreamError(f"stream header: postcopy must be a boolean, not {_show(postcopy)}")
    if mid is not None and not (isinstance(mid, bytes) and len(mid) == MIGRATION_ID_SIZE):
        raise StreamError(f"stream header: migration_id must be {MIGRATION_ID_SIZE} bytes, "
                          f"not {_show(mid)}")
    if postcopy and mid is None:
        raise StreamError("stream header: a post-copy stream needs a migration_id")
    return Header(version, ps, regions, vcpus, hint, live, source, info,
                  integrity=integrity == INTEGRITY, postcopy=postcopy, migration_id=mid)


def _recv_some(sock, view, what: str, so_far: int) -> int:
    """One recv_into into `view`; never returns 0.  `what` completes
    "connection closed ..." (e.g. "in the middle of a STATE record")."""
    try:
        n = sock.recv_into(view, len(view))
    except TimeoutError as e:
        raise StreamError(f"stream timed out {what} after {so_far} bytes") from e
    except OSError as e:
        raise StreamError(f"connection lost after {so_far} bytes: "
                          f"{e.strerror or type(e).__name__}") from e
    if not n:
        raise StreamError(f"stream truncated: connection closed {what} after {so_far} bytes")
    return n


def _recv_exactly(sock, view, what: str) -> None:
    got = 0
    while got < len(view):
        got += _recv_some(sock, view[got:], what, got)


class StreamDecoder:
    """Reads a migration stream from `sock` (anything with `recv_into(buffer, nbytes)`).

    Call `read_preamble()` once, then `next_record(target)` until it returns
    `End`.  Record headers go through an internal buffer; page data is copied
    from that buffer only as far as it was read ahead, and the rest is received
    straight into the memory `target` returns.  Timeouts are the socket's own.
    """

    def __init__(self, sock, *, keys: StreamKeys | None = None, require_integrity: bool = True,
                 bufsize: int = 256 * 1024, ram_fd_allowed: bool = False, channel: bool = False):
        """`ram_fd_allowed`: `sock` can carry a descriptor (a unix socket), so the
        preamble flag RAM_FD is accepted; elsewhere it is refused.  `channel`:
        this is a secondary channel, whose preamble must carry the flag CHANNEL
        (and a main stream's must not)."""
        if bufsize < 64:
            raise ValueError("bufsize must be at least 64 bytes")
        self._sock = sock
        self._ram_fd_allowed = ram_fd_allowed
        self._channel = channel
        self._keys = keys            # given: the stream must have integrity, checked with these
        self._require = require_integrity   # False: with keys, integrity only if the header says so
        self.integrity: Integrity | None = None
        self.tags_bad = 0            # PAGES records whose tag did not match
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)
        self._pos = 0          # first unconsumed byte in _buf
        self._end = 0          # end of the received bytes in _buf
        self._crc = 0
        self._ranges: list[tuple[int, int]] = []  # RAM as (start, end)
        self.header: Header | None = None
        self.offset = 0        # stream bytes consumed
        self.bytes_received = 0
        self.pages = 0
        self.zero_pages = 0
        self.rounds = 0
        self.state_seen = False
        self.ended = False
        # post-copy: {(kind, gpa): words} of the PAGESET records seen so far
        self.pagesets: dict[tuple[int, int], np.ndarray] = {}

    @property
    def postcopy(self) -> bool:
        """The source switches to post-copy after END (it sent PAGESET records)."""
        return bool(self.pagesets)

    # -- buffer

    def _recv(self, view, what: str) -> int:
        n = _recv_some(self._sock, view, what, self.bytes_received)
        self.bytes_received += n
        return n

    def _fill(self, n: int, what: str) -> None:
        """Make at least `n` (<= bufsize) unconsumed bytes available in _buf."""
        avail = self._end - self._pos
        if avail >= n:
            return
        if self._pos + n > len(self._buf):
            self._view[:avail] = self._view[self._pos:self._end]
            self._pos, self._end = 0, avail
        while self._end - self._pos < n:
            self._end += self._recv(self._view[self._end:], what)

    def _structure(self, data) -> None:
        """Structural bytes (all but page payloads and tags): checksummed, and MACed."""
        self._crc = zlib.crc32(data, self._crc)
        if self.integrity is not None:
            self.integrity.structure(data)

    def _consume(self, n: int) -> None:
        """Consume `n` buffered structural bytes, adding them to the checksum."""
        self._structure(self._view[self._pos:self._pos + n])
        self._pos += n
        self.offset += n
        if self._pos == self._end:
            self._pos = self._end = 0

    def _read_into(self, dest, what: str) -> None:
        """Fill `dest` (a byte memoryview): buffered bytes first, then straight from the socket."""
        n = len(dest)
        got = min(self._end - self._pos, n)
        if got:
            dest[:got] = self._view[self._pos:self._pos + got]
            self._pos += got
            if self._pos == self._end:
                self._pos = self._end = 0
        while got < n:
            got += self._recv(dest[got:], what)
        self.offset += n

    # -- stream

    def scatter_buffered(self, ram, written, unverified=None) -> int:
        """Fast path for streams of many small PAGES records (a churning guest
        scatters its pages): copy every complete PAGES record already in the
        receive buffer into `ram` in one C call, and mark their pages in
        `written` (uint8 per page); with integrity, each record's pages in
        `unverified` as its tag did not or did match.  `ram` is a GuestMemory
        that must be the header's only RAM region.  Stops before anything
        else, which next_record() then reads and judges.  Returns the records
        consumed.
        """
        if self.state_seen or self.ended or self._end - self._pos < _RUN.size \
                or self._buf[self._pos] != REC_PAGES or self.header.ram_fd:
            return 0
        from ._wire import ffi, lib
        if self._ranges != [(ram.gpa, ram.gpa + ram.size)] or len(written) != ram.npages \
                or (self.integrity is not None and (unverified is None or len(unverified) != ram.npages)):
            raise ValueError("scatter_buffered needs the header's one RAM region")
        avail = self._end - self._pos
        heads = bytearray(_RUN.size * (avail // (_RUN.size + PAGE_SIZE) + 1))
        counts = ffi.new("uint64_t[4]")
        integrity = self.integrity
        used = lib.kvmlite_scatter_pages(
            ffi.from_buffer("uint8_t[]", self._view[self._pos:self._end]), avail,
            REC_PAGES, _RUN.size, RUN_GPA_OFFSET, RUN_NPAGES_OFFSET, PAGE_SIZE, TAG_SIZE,
            integrity.gmac if integrity is not None else ffi.NULL,
            integrity.seq if integrity is not None else 0,
            ffi.cast("uint8_t *", ram.pointer), ram.gpa, ram.size, MAX_RUN_PAGES,
            ffi.from_buffer("uint8_t[]", written),
            ffi.from_buffer("uint8_t[]", unverified) if integrity is not None else ffi.NULL,
            ffi.from_buffer("uint8_t[]", heads), len(heads), counts)
        if used:
            self._structure(memoryview(heads)[:counts[2]])
            self._pos += used
            self.offset += used
            if self._pos == self._end:
                self._pos = self._end = 0
            self.pages += counts[1]
            if integrity is not None:
                integrity.seq += counts[0]
                self.tags_bad += counts[3]
        return counts[0]

    def read_preamble(self) -> Header:
        """Read and check magic, version, flags and the header map."""
        if self.header is not None:
            raise RuntimeError("read_preamble called twice")
        self._fill(len(MAGIC), "in the middle of the preamble")
        magic = bytes(self._view[self._pos:self._pos + len(MAGIC)])
        if magic != MAGIC:
            raise StreamError(f"not a kvmlite migration stream (it starts with {magic!r})")
        self._fill(_PREAMBLE.size, "in the middle of the preamble")
        _, version, flags, hlen = _PREAMBLE.unpack_from(self._buf, self._pos)
        if version != VERSION:
            raise StreamError(f"stream version {version} is not supported "
                              f"(this kvmlite reads version {VERSION})")
        if flags & ~KNOWN_FLAGS:
            raise StreamError(f"stream flags {flags:#06x} are not supported "
                              f"(version {VERSION} defines {KNOWN_FLAGS:#06x})")
        if flags & FLAG_RAM_FD and not self._ram_fd_allowed:
            raise StreamError("the stream's RAM comes as a file descriptor (a local migration), "
                              "which only a unix: socket can carry")
        if bool(flags & FLAG_CHANNEL) != self._channel:
            raise StreamError("a secondary channel's stream on the main connection" if not self._channel
                              else "a secondary channel's stream lacks the flag CHANNEL")
        if not 1 <= hlen <= MAX_HEADER_LEN:
            raise StreamError(f"stream header length {hlen} is outside 1 to {MAX_HEADER_LEN}")
        preamble = bytes(self._view[self._pos:self._pos + _PREAMBLE.size])
        self._consume(_PREAMBLE.size)
        body = bytearray(hlen)
        self._read_into(memoryview(body), "in the middle of the stream header")
        self._crc = zlib.crc32(body, self._crc)
        header = validate_info(_unpack_map(body, "stream header"), version)
        if header.integrity != (self._keys is not None) and (header.integrity or self._require):
            raise StreamError("the stream's pages carry integrity tags, which this destination "
                              "has no key to check" if header.integrity else
                              "the stream has no integrity tags, which this destination requires "
                              "(a keyed link without TLS, or a snapshot file)")
        if self._keys is not None and header.integrity:
            self.integrity = Integrity(self._keys)
            self.integrity.structure(preamble)
            self.integrity.structure(body)
        header.ram_fd = bool(flags & FLAG_RAM_FD)
        header.channel = bool(flags & FLAG_CHANNEL)
        self._ranges = [(gpa, gpa + size) for gpa, size in header.ram]
        self.header = header
        return header

    def _check_run(self, name: str, gpa: int, npages: int, at: int) -> int:
        if not 1 <= npages <= MAX_RUN_PAGES:
            raise StreamError(f"{name} record at byte {at}: {npages} pages is outside "
                              f"1 to {MAX_RUN_PAGES}")
        if gpa & PAGE_MASK:
            raise StreamError(f"{name} record at byte {at}: GPA {gpa:#x} is not page-aligned")
        nbytes = npages << PAGE_SHIFT
        end = gpa + nbytes
        for start, stop in self._ranges:
            if start <= gpa and end <= stop:
                return nbytes
        raise StreamError(f"{name} record at byte {at}: {gpa:#x}..{end:#x} does not lie "
                          f"inside one RAM region of the stream header")

    def next_record(self, target: Target) -> Record:
        """Read one record.  For PAGES, `target(gpa, nbytes)` is called (only after
        the range was checked against the header's RAM) and must return a writable
        buffer of exactly `nbytes`; the payload is received into it."""
        if self.header is None:
            raise RuntimeError("next_record called before read_preamble")
        if self.ended:
            raise RuntimeError("next_record called after the END record")
        at = self.offset
        self._fill(1, "before the END record")
        rtype = self._buf[self._pos]
        name = RECORD_NAMES.get(rtype)
        if name is None:
            raise StreamError(f"unknown record type {rtype:#04x} at byte {at}")
        if self.state_seen and rtype != REC_END:
            if rtype == REC_STATE:
                raise StreamError(f"a second STATE record at byte {at}")
            raise StreamError(f"a {name} record at byte {at} follows the STATE record; "
                              f"only END may")
        if self.pagesets and not self.state_seen and rtype not in (REC_PAGESET, REC_STATE):
            raise StreamError(f"a {name} record at byte {at} follows a PAGESET record; "
                              f"only PAGESET and STATE may")
        mid = f"in the middle of a {name} record"
        if self.header.channel and rtype in (REC_ZERO, REC_STATE):
            raise StreamError(f"a {name} record at byte {at} on a secondary channel, "
                              f"which carries PAGES and ROUND only")
        if self.header.ram_fd and rtype in (REC_PAGES, REC_ZERO):
            raise StreamError(f"a {name} record at byte {at} in a stream whose RAM came as "
                              f"a file descriptor")

        if rtype == REC_PAGESET:
            return self._pageset(at, mid)

        if rtype == REC_PAGES or rtype == REC_ZERO:
            self._fill(_RUN.size, mid)
            _, gpa, npages = _RUN.unpack_from(self._buf, self._pos)
            nbytes = self._check_run(name, gpa, npages, at)
            head = bytes(self._view[self._pos:self._pos + _RUN.size])
            self._consume(_RUN.size)
            if rtype == REC_ZERO:
                self.zero_pages += npages
                return Zero(gpa, npages)
            dest = memoryview(target(gpa, nbytes)).cast("B")
            if dest.readonly or len(dest) != nbytes:
                raise ValueError(f"target({gpa:#x}, {nbytes}) returned a "
                                 f"{'read-only ' if dest.readonly else ''}buffer of "
                                 f"{len(dest)} bytes")
            self._read_into(dest, "in the middle of a PAGES payload")
            self.pages += npages
            failed = None
            if self.integrity is not None:
                tags = bytearray(TAG_SIZE * npages)
                self._read_into(memoryview(tags), "in the middle of a PAGES record's tags")
                failed = self.integrity.check(head, dest, tags)
                self.tags_bad += int(failed.sum())
            return Pages(gpa, npages, failed)

        if rtype == REC_ROUND:
            self._fill(_TYPE_U32.size, mid)
            _, n = _TYPE_U32.unpack_from(self._buf, self._pos)
            self._consume(_TYPE_U32.size)
            self.rounds += 1
            return Round(n)

        if rtype == REC_STATE:
            self._fill(_TYPE_U32.size, mid)
            _, length = _TYPE_U32.unpack_from(self._buf, self._pos)
            if not 1 <= length <= MAX_STATE_LEN:
                raise StreamError(f"STATE record at byte {at}: length {length} is outside "
                                  f"1 to {MAX_STATE_LEN}")
            self._consume(_TYPE_U32.size)
            body = bytearray(length)
            self._read_into(memoryview(body), mid)
            self._structure(body)
            state = _unpack_map(body, f"STATE record at byte {at}")
            self._check_pagesets_complete(at)
            self.state_seen = True
            return State(state)

        # END
        self._fill(_END.size, mid)
        _, pages, zero_pages, crc, mac = _END.unpack_from(self._buf, self._pos)
        if not self.state_seen and not self.header.channel:
            raise StreamError(f"END record at byte {at} without a STATE record "
                              f"(the source sent no vCPU or device state)")
        end_head = bytes(self._view[self._pos:self._pos + _END_HEAD.size])
        mine = zlib.crc32(end_head, self._crc)
        self._pos += _END.size
        self.offset += _END.size
        if crc != mine:
            raise StreamError(f"stream checksum mismatch: END says {crc:#010x}, the stream "
                              f"checksums to {mine:#010x}")
        expected = self.integrity.finish(end_head) if self.integrity is not None else _NO_MAC
        if not hmac.compare_digest(mac, expected):
            raise StreamError("the stream's structure MAC does not match: records were changed, "
                              "dropped or added on the way" if self.integrity is not None else
                              "END carries a MAC in a stream without integrity")
        if (pages, zero_pages) != (self.pages, self.zero_pages):
            raise StreamError(f"END record counts {pages} pages and {zero_pages} zero pages, "
                              f"but the stream carried {self.pages} and {self.zero_pages}")
        extra = self._end - self._pos
        if extra:
            raise StreamError(f"{extra} unexpected bytes after the END record")
        self._crc = mine
        self.ended = True
        return End(pages, zero_pages, crc)

    def _pageset(self, at: int, mid: str) -> PageSet:
        if not self.header.postcopy:
            raise StreamError(f"PAGESET record at byte {at} in a stream whose header does not "
                              f"announce post-copy")
        self._fill(_PAGESET.size, mid)
        _, kind, gpa, npages = _PAGESET.unpack_from(self._buf, self._pos)
        if kind not in PAGESET_KINDS:
            raise StreamError(f"PAGESET record at byte {at}: unknown kind {kind}")
        if (gpa, gpa + (npages << PAGE_SHIFT)) not in self._ranges:
            raise StreamError(f"PAGESET record at byte {at}: {gpa:#x} x {npages} pages is not "
                              f"a RAM region of the stream header")
        if (kind, gpa) in self.pagesets:
            raise StreamError(f"PAGESET record at byte {at}: a second {PAGESET_KINDS[kind]} "
                              f"set for the region at {gpa:#x}")
        self._consume(_PAGESET.size)
        words = np.empty((npages + 63) // 64, dtype="<u8")
        self._read_into(memoryview(words).cast("B"), mid)
        self._structure(words)
        if npages % 64 and int(words[-1]) >> (npages % 64):
            raise StreamError(f"PAGESET record at byte {at}: bits set past the region's last page")
        other = self.pagesets.get((PAGESET_FREE if kind == PAGESET_PENDING else PAGESET_PENDING, gpa))
        if other is not None and np.any(words & other):
            n = int(np.bitwise_count(words & other).sum())
            raise StreamError(f"PAGESET record at byte {at}: {n} pages are both still to come "
                              f"and free")
        self.pagesets[(kind, gpa)] = words
        return PageSet(kind, gpa, npages, words)

    def _check_pagesets_complete(self, at: int) -> None:
        """Post-copy needs both sets for every RAM region, or no set at all."""
        if not self.pagesets:
            return
        for start, _ in self._ranges:
            for kind, what in PAGESET_KINDS.items():
                if (kind, start) not in self.pagesets:
                    raise StreamError(f"STATE record at byte {at}: no {what} PAGESET for the "
                                      f"RAM region at {start:#x}")


class ReturnPathDecoder:
    """A reader of the post-copy return path (REQUEST and DONE records), in Python.

    The source's page server reads the return path in C (kvmlite._postcopy);
    this is the same contract, for tests and tools.  Fed whatever bytes arrived
    (`feed`), it returns the complete records and keeps a partial one for the
    next call.  The destination is a peer we authenticated, but its bytes are
    still checked: a range outside the RAM regions, an unknown type or
    anything after DONE raise StreamError.  `tag_size`: DONE's tag (integrity).
    """

    def __init__(self, ram: list[tuple[int, int]], tag_size: int = 0):
        self._ranges = [(gpa, gpa + size) for gpa, size in ram]
        self._buf = bytearray()
        self._tag = tag_size
        self.offset = 0
        self.done = False

    def feed(self, data) -> list[Request | Done]:
        self._buf += data
        out: list[Request | Done] = []
        buf = self._buf
        pos = 0
        while pos < len(buf):
            rtype = buf[pos]
            at = self.offset + pos
            if self.done:
                raise StreamError(f"return path: {len(buf) - pos} bytes after DONE")
            if rtype == REC_REQUEST:
                if len(buf) - pos < _RUN.size:
                    break
                _, gpa, npages = _RUN.unpack_from(buf, pos)
                end = gpa + (npages << PAGE_SHIFT)
                if (not 1 <= npages <= MAX_POSTCOPY_RUN or gpa & PAGE_MASK
                        or not any(s <= gpa and end <= e for s, e in self._ranges)):
                    raise StreamError(f"return path: REQUEST at byte {at} for {gpa:#x} x {npages} "
                                      f"pages is not a run inside RAM")
                out.append(Request(gpa, npages))
                pos += _RUN.size
            elif rtype == REC_DONE:
                if len(buf) - pos < _DONE.size + self._tag:
                    break
                _, pages = _DONE.unpack_from(buf, pos)
                out.append(Done(pages))
                self.done = True
                pos += _DONE.size + self._tag
            else:
                raise StreamError(f"return path: unknown record type {rtype:#04x} at byte {at}")
        del buf[:pos]
        self.offset += pos
        return out


def read_need(sock, ram: list[tuple[int, int]], keys: StreamKeys | None = None
              ) -> tuple[int, int, np.ndarray]:
    """Read one NEED record (recovery): (gpa, npages, words) for one RAM region.
    On a keyed link its MAC must match."""
    head = bytearray(_NEED.size)
    _recv_exactly(sock, memoryview(head), "before the NEED record")
    rtype, gpa, npages = _NEED.unpack(head)
    if rtype != REC_NEED:
        raise StreamError(f"expected a NEED record, got type {rtype:#04x}")
    if (gpa, gpa + (npages << PAGE_SHIFT)) not in [(g, g + s) for g, s in ram]:
        raise StreamError(f"NEED record: {gpa:#x} x {npages} pages is not a RAM region")
    words = np.empty((npages + 63) // 64, dtype="<u8")
    _recv_exactly(sock, memoryview(words).cast("B"), "in the middle of a NEED record")
    if keys is not None:
        mac = bytearray(MAC_SIZE)
        _recv_exactly(sock, memoryview(mac), "in the middle of a NEED record's MAC")
        if not hmac.compare_digest(bytes(mac), need_mac(keys, bytes(head) + words.tobytes())):
            raise StreamError("NEED record: its MAC does not match (changed on the way)")
    if npages % 64 and int(words[-1]) >> (npages % 64):
        raise StreamError("NEED record: bits set past the region's last page")
    return gpa, npages, words
