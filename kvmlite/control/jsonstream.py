"""Split a byte stream into JSON values, with bounds: the reading half of QMP.

QMP (QEMU's docs/interop/qmp-spec.rst) is a stream of JSON objects with
nothing a client must put between them: no newline, no length prefix.  An
object may arrive split over many reads, and several may arrive in one.  This
splitter finds where each top-level value ends by following strings and
bracket depth, as QEMU's json-streamer does, and gives each complete value to
`json.loads`.

No input costs more than it is worth:

* A value may be at most `max_size` bytes and nest `max_depth` levels, so
  `json.loads` never recurses deeply (no RecursionError).  A value over either
  limit gives one error, and the rest of it is skipped, not parsed: its tail
  never turns into requests.
* Anything at the top level that is not an object or array (bare words,
  numbers, strings, stray closing brackets, control bytes) is "junk": one
  error per run of junk, however long the run.
* A control byte other than tab, CR and LF, or a 0xFF byte, anywhere, abandons
  the value in progress (one error) and returns to the top level: the
  spec's way for a client to force the parser into a known-good state.
* The scanning runs in C (`re`, numpy): a 10 MB value costs milliseconds,
  not seconds.
* Numbers: NaN, Infinity and floats that overflow are refused, as are
  integers longer than any 64-bit value; duplicate keys are refused.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

MAX_SIZE = 1 << 20    # bytes per value: QMP requests are small
MAX_DEPTH = 64        # nesting levels: QMP's deepest argument is a few levels
MAX_INT_DIGITS = 24   # the longest 64-bit integer is 20 digits and a sign

_WS = b" \t\r\n"
_CTRL = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xff"            # the bytes that reset the parser
_TOP = re.compile(rb'[{\["]')                          # what ends a run of top-level junk
_IN_CONTAINER = re.compile(rb'["' + _CTRL + rb"]")      # inside {...}/[...], outside strings
_PLAIN = rb'[^"\\' + _CTRL + rb"]*"
# a string's body up to its closing quote: escapes consumed two bytes at a time
_STRING_BODY = re.compile(_PLAIN + rb"(?:\\[^" + _CTRL + rb"]" + _PLAIN + rb")*")
_BRACKET = re.compile(rb"[][{}]")
_DELTA = np.zeros(256, np.int64)
_DELTA[[ord("{"), ord("[")]] = 1
_DELTA[[ord("}"), ord("]")]] = -1
_SMALL = 64           # up to this many bytes a Python loop beats numpy's set-up


class JsonError(ValueError):
    """One value of the stream that could not be taken: `desc` says why."""

    @property
    def desc(self) -> str:
        return str(self.args[0])


class _Refused(ValueError):
    pass


def _no_constant(name: str):
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:32]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise _Refused(f"integer {text[:24]}... is out of range")
    return int(text)


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate key '{key[:64]}'")
            seen.add(key)
    return out


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float,
                            parse_int=_bounded_int, object_pairs_hook=_no_duplicates)


def loads(text: str):
    """`json.loads` with the number and key rules above; raises JsonError."""
    try:
        return _DECODER.decode(text)
    except _Refused as e:
        raise JsonError(f"JSON parse error, {e}") from None
    except json.JSONDecodeError as e:
        raise JsonError(f"JSON parse error, {e.msg[:1].lower()}{e.msg[1:]}") from None
    except (ValueError, RecursionError) as e:    # belt and braces: never a traceback
        raise JsonError(f"JSON parse error, {e}") from None


def _parse(raw: bytearray):
    try:
        return loads(raw.decode())
    except UnicodeDecodeError:
        return JsonError("JSON parse error, invalid UTF-8")
    except JsonError as e:
        return e


def _sample(junk: bytes) -> str:
    text = junk.strip(_WS)[:24].decode("ascii", "backslashreplace")
    return text + ("..." if len(junk.strip(_WS)) > 24 else "")


class JsonStream:
    """Feed bytes in; get back complete values (dicts or lists) and
    JsonErrors, in stream order."""

    def __init__(self, max_size: int = MAX_SIZE, max_depth: int = MAX_DEPTH):
        self.max_size = max_size
        self.max_depth = max_depth
        self._depth = 0          # bracket depth of the value in progress (0: at the top level)
        self._in_str = False     # inside a string (of a value, or a top-level junk string)
        self._esc = False        # the last byte fed was a backslash inside a string
        self._keep = False       # collecting the value in progress (False: skipping it)
        self._junk = False       # in a run of top-level junk whose error has been given
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        out: list = []
        i, n = 0, len(data)
        while i < n:
            if self._in_str:
                i = self._string(data, i, out)
            elif self._depth:
                i = self._container(data, i, out)
            else:
                i = self._top(data, i, out)
        return out

    def eof(self) -> list:
        """The peer has stopped sending: a value left half-way is an error."""
        pending = self._keep and (self._depth or self._in_str)
        self.__init__(self.max_size, self.max_depth)
        return [JsonError("JSON parse error, premature end of input")] if pending else []

    # ---- the three places a byte can be ----------------------------------------

    def _top(self, data: bytes, i: int, out: list) -> int:
        m = _TOP.search(data, i)
        j = m.start() if m else len(data)
        if data[i:j].strip(_WS):
            self._junk_error(data[i:j], out)
        if m is None:
            return j
        if data[j] == ord('"'):                 # a top-level string: junk too
            self._junk_error(b'"', out)
            self._in_str, self._keep = True, False
        else:
            self._junk, self._keep, self._depth = False, True, 1
            self._buf = bytearray(data[j:j + 1])
        return j + 1

    def _container(self, data: bytes, i: int, out: list) -> int:
        # Look ahead in growing windows, so that finding the end of a small
        # value never costs a scan of everything after it in the chunk.
        n = len(data)
        window = _SMALL
        while True:
            end = min(n, i + window)
            m = _IN_CONTAINER.search(data, i, end)
            j = m.start() if m else end
            if j > i:
                k, event = self._brackets(data, i, j)
                if event == "end":
                    self._take(data[i:k + 1], out)
                    if self._keep:
                        out.append(_parse(self._buf))
                    self._keep, self._buf = False, bytearray()
                    return k + 1
                if event == "deep":
                    self._fail(out, f"JSON nesting depth limit exceeded (at most {self.max_depth} levels)")
                    return k + 1
                self._take(data[i:j], out)
            if m is not None:
                break
            if end == n:
                return n
            i, window = end, window * 4
        if data[j] == ord('"'):
            self._take(b'"', out)
            self._in_str = True
        else:
            self._reset(data[j], out)
        return j + 1

    def _string(self, data: bytes, i: int, out: list) -> int:
        n = len(data)
        if self._esc:                           # the escaped byte of a split escape
            self._esc = False
            if _is_ctrl(data[i]):
                self._reset(data[i], out)
                return i + 1
            self._take(data[i:i + 1], out)
            i += 1
            if i == n:
                return n
        k = _STRING_BODY.match(data, i).end()
        if k == n:
            self._take(data[i:], out)
            return n
        if data[k] == ord('"'):
            self._take(data[i:k + 1], out)
            self._in_str = False
            return k + 1
        if data[k] == ord("\\"):                # a backslash, then the end or a control byte
            if k + 1 == n:
                self._take(data[i:], out)
                self._esc = True
                return n
            k += 1
        self._reset(data[k], out)
        return k + 1

    # ---- helpers ------------------------------------------------------------------

    def _brackets(self, data: bytes, i: int, j: int) -> tuple[int, str | None]:
        """Follow the depth through data[i:j] (no strings in it).  Stops at the
        byte that ends the value ("end") or first nests too deep ("deep")."""
        if j - i <= _SMALL:
            depth = self._depth
            for m in _BRACKET.finditer(data, i, j):
                if data[m.start()] in b"{[":
                    depth += 1
                    if depth > self.max_depth and self._keep:
                        self._depth = depth
                        return m.start(), "deep"
                else:
                    depth -= 1
                    if depth == 0:
                        self._depth = 0
                        return m.start(), "end"
            self._depth = depth
            return j, None
        if not _BRACKET.search(data, i, j):
            return j, None
        depth = np.cumsum(_DELTA[np.frombuffer(data, np.uint8, j - i, i)]) + self._depth
        ends = np.flatnonzero(depth <= 0)      # steps of one from >= 1: the first is 0
        stop = int(ends[0]) if ends.size else j - i
        if self._keep:
            deep = np.flatnonzero(depth[:stop] > self.max_depth)
            if deep.size:
                self._depth = int(depth[deep[0]])
                return i + int(deep[0]), "deep"
        if ends.size:
            self._depth = 0
            return i + stop, "end"
        self._depth = int(depth[-1])
        return j, None

    def _take(self, piece: bytes, out: list) -> None:
        if not self._keep:
            return
        if len(self._buf) + len(piece) > self.max_size:
            self._fail(out, f"JSON size limit exceeded (at most {self.max_size} bytes)")
        else:
            self._buf += piece

    def _fail(self, out: list, desc: str) -> None:
        """The value in progress is refused: say so once, skip the rest of it."""
        if self._keep:
            out.append(JsonError(desc))
        self._keep, self._buf = False, bytearray()

    def _reset(self, byte: int, out: list) -> None:
        """A control byte: abandon whatever is in progress, back to the top level."""
        if self._keep:
            out.append(JsonError(f"JSON parse error, stray byte 0x{byte:02x}"))
        self._depth, self._in_str, self._esc, self._keep = 0, False, False, False
        self._buf = bytearray()
        self._junk = True

    def _junk_error(self, junk: bytes, out: list) -> None:
        if self._junk:
            return
        self._junk = True
        first = junk.strip(_WS)[0]
        if first in b"}]":
            out.append(JsonError(f"JSON parse error, stray '{chr(first)}'"))
        elif _is_ctrl(first):
            out.append(JsonError(f"JSON parse error, stray byte 0x{first:02x}"))
        else:
            out.append(JsonError(f"QMP input must be a JSON object (got '{_sample(junk)}')"))


def _is_ctrl(byte: int) -> bool:
    return byte == 0xFF or (byte < 0x20 and byte not in (0x09, 0x0A, 0x0D))
