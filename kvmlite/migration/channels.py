"""A migration over several TCP connections (`migrate --channels N`, QEMU's multifd).

The sender stays one loop (source.py); only where a batch of PAGES records
goes changes.  `ChannelSink` is the main connection's sink plus N - 1
secondary channels, each with its own thread and its own stream
(docs/wire-format.md, "Channels"): the sender asks `page_channel()` for
each batch and gets None (the main stream) or a channel, round-robin, so
that several `sendmsg` copies run at once (each releases the GIL).  At every
ROUND each channel sends a ROUND too, and the destination applies nothing of
round k + 1 before every open connection has reached its ROUND k
(`RoundSync`): a page may travel on one connection in round k and on another
in round k + 1.  The channels end (each its own END) when pre-copy ends, so
the last pass inside the downtime is one stream with no hand-off between
threads; a stop-copy migration keeps them for its one pass.

Integrity: every connection ran the whole handshake, with the key if there is
one, and derived its own stream keys from its own nonces; each channel's PAGES
carry tags under its own keys, numbered in its own stream, and its END its own
structure MAC.  No two streams share a GMAC key, so no (key, IV) pair repeats.
"""

from __future__ import annotations

import queue
import socket
import threading

from ..config import Credentials
from ..endpoints import TcpUri
from ..errors import MigrationError, StreamError
from ..bitmap import PAGE_SHIFT
from . import transport, wire

# Batches queued per channel: the sender prepares the next while the channel sends.
CHANNEL_QUEUE = 4
MAX_IOV = 1024                  # buffers per sendmsg: IOV_MAX on Linux
# A secondary channel has this long to arrive once its main connection is in.
JOIN_TIMEOUT = 5.0


# ---- the source ------------------------------------------------------------------------

def connect(uri: TcpUri, creds: Credentials, channels: int, *, connect_timeout: float,
            io_timeout: float, on_socket=None):
    """The main connection, asking for `channels` connections in all, then the
    secondary ones.  A ChannelSink, or a plain sink when the destination offers
    no more than one (TLS, or an older destination)."""
    hello: dict = {}

    def ask_main(h: dict) -> dict:
        hello.update(h)
        return {"channels": _granted(h, channels)}
    main = transport.connect(uri, creds, connect_timeout=connect_timeout, io_timeout=io_timeout,
                             on_socket=on_socket, ask=ask_main)
    n = _granted(hello, channels)
    if n == 1:
        return main
    session = hello["nonce"]
    extras = []
    try:
        for i in range(1, n):
            sink = transport.connect(uri, creds, connect_timeout=connect_timeout,
                                     io_timeout=io_timeout, on_socket=on_socket,
                                     ask=lambda h, i=i: _join(h, session, i, n))
            extras.append((sink.sock, sink.keys))
    except BaseException:
        for s, _ in extras:
            s.close()
        main.close()
        raise
    return ChannelSink(main.sock, main.keys, extras, io_timeout)


def _granted(hello: dict, asked: int) -> int:
    offered = hello.get("channels", 1)
    if type(offered) is not int or offered < 1 or not isinstance(hello.get("nonce"), bytes):
        return 1
    return max(1, min(asked, offered))


def _join(hello: dict, session: bytes, i: int, n: int) -> dict:
    if _granted(hello, n) < n:
        raise MigrationError(f"secondary channel {i} met a destination that does not take "
                             f"{n} connections")
    return {"join": session, "channel": i}


class _Channel:
    """One secondary channel: its socket, its stream's checksum and integrity,
    and the thread that sends on it, fed through a short queue so that the
    sender prepares the next batch (and other channels send) while this one's
    sendmsg copies pages into the kernel."""

    def __init__(self, sock: socket.socket, keys, index: int):
        self.sock = sock
        self.index = index
        self.integrity = wire.Integrity(keys) if keys is not None else None
        self.crc = 0
        self.pages = 0
        self.error: BaseException | None = None
        self.queued = 0                  # bytes handed over and not yet sent
        self._q: queue.Queue = queue.Queue(maxsize=CHANNEL_QUEUE)
        self._thread = threading.Thread(target=self._run, name=f"channel-{index}", daemon=True)
        self._thread.start()

    def _structure(self, data) -> None:
        self.crc = wire.crc(data, self.crc)
        if self.integrity is not None:
            self.integrity.structure(data)

    def send_structure(self, data: bytes) -> None:
        self._structure(data)
        self._put([data])

    def send_pages(self, heads, memory, offsets, npages) -> int:
        """PAGES records (heads, and the pages at `offsets` of guest memory),
        tagged under this channel's keys; returns the bytes queued."""
        self._structure(heads)
        tags = None
        if self.integrity is not None:
            tags = memoryview(self.integrity.tags(heads, memory.pointer, offsets, npages))
        bufs = wire.page_buffers(heads, memory.view, offsets, npages, tags)
        self.pages += int(npages.sum())
        return self._put(bufs)

    def _put(self, bufs: list) -> int:
        if self.error is not None:
            raise MigrationError(f"channel {self.index}: {self.error}")
        n = sum(len(b) for b in bufs)
        self.queued += n
        self._q.put(bufs)
        return n

    def end(self, timeout: float) -> None:
        """END (this channel's pages and structure), then wait until all is sent."""
        self._put([wire.end_record(self.pages, 0, self.crc, self.integrity)])
        self._q.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise MigrationError(f"channel {self.index}: the destination stopped taking pages")
        if self.error is not None:
            raise MigrationError(f"channel {self.index}: {self.error}")

    def _run(self) -> None:
        while (bufs := self._q.get()) is not None:
            if self.error is not None:
                continue                 # drain: the sender raises at its next put
            try:
                n = sum(len(b) for b in bufs)
                while bufs:
                    bufs = transport._after(bufs, self.sock.sendmsg(bufs[:MAX_IOV]))
                self.queued -= n
            except OSError as e:
                self.error = e

    def stop(self) -> None:
        """Without END (the migration failed, its sockets shut): the thread ends at
        the None, put in place of batches it would fail to send anyway."""
        while True:
            try:
                self._q.put_nowait(None)
                return
            except queue.Full:
                try:
                    self._q.get_nowait()
                except queue.Empty:
                    pass

    def unacked(self) -> int:
        import fcntl
        import termios
        out = bytearray(4)
        try:
            fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, out)
        except OSError:
            return self.queued
        return self.queued + int.from_bytes(out, "little")


class ChannelSink(transport.SocketSink):
    """The main TCP stream plus secondary channels: PAGES batches go
    round-robin over all of them; everything else stays on the main stream."""

    def __init__(self, sock: socket.socket, keys, extras: list, timeout: float):
        super().__init__(sock, keys)
        self._extras = extras            # (socket, keys) of channels 1 .. N-1
        self._timeout = timeout
        self._chans: list[_Channel] = []
        self._next = 0
        self._open = False               # between begin() and close_channels()
        self.channels = 1 + len(extras)

    def begin(self, info: dict) -> None:
        pre = wire.encode_preamble(info, flags=wire.FLAG_CHANNEL)
        self._chans = [_Channel(s, keys, i) for i, (s, keys) in enumerate(self._extras, 1)]
        for ch in self._chans:
            ch.send_structure(pre)
        self._open = True

    def page_channel(self):
        if not self._open:
            return None
        i = self._next
        self._next = (i + 1) % self.channels
        return None if i == 0 else self._chans[i - 1]

    def end_round(self, n: int) -> None:
        if self._open:
            rec = wire.round_record(n)
            for ch in self._chans:
                ch.send_structure(rec)

    def close_channels(self) -> None:
        if not self._open:
            return
        self._open = False
        for ch in self._chans:
            ch.end(self._timeout)

    def unacked(self) -> int:
        return super().unacked() + sum(ch.unacked() for ch in self._chans)

    def abort(self) -> None:
        super().abort()
        for s, _ in self._extras:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.abort()
        for ch in self._chans:
            ch.stop()
        for s, _ in self._extras:
            s.close()
        super().close()


# ---- the destination ----------------------------------------------------------------------

class RoundSync:
    """Keeps the main stream and the secondary channels in the same pre-copy round.

    A page may go on one channel in round k and on another (or as a ZERO record
    on the main stream) in round k + 1: so nobody applies anything of round
    k + 1 before everybody has applied all of round k.  Each party calls
    arrive(k) at its k-th ROUND record and waits there for the others.  A
    channel that has ended (its END, right after one of its ROUNDs) takes no
    part in later rounds: the source sends their pages on the main stream,
    and the main END's page count catches a channel that stopped short."""

    def __init__(self, parties: int, timeout: float):
        self._cond = threading.Condition()
        self._reached = [0] * parties
        self._ended = [False] * parties
        self._failed: str | None = None
        self.timeout = timeout

    def arrive(self, party: int, k: int) -> None:
        with self._cond:
            self._reached[party] = k
            self._cond.notify_all()

            def settled():
                return self._failed is not None or all(
                    r >= k or e for r, e in zip(self._reached, self._ended))
            if not self._cond.wait_for(settled, self.timeout):
                self._failed = f"round {k}: a channel sent nothing for {self.timeout:g} s"
            if self._failed is not None:
                self._cond.notify_all()
                raise StreamError(self._failed)

    def end(self, party: int) -> None:
        with self._cond:
            self._ended[party] = True
            self._cond.notify_all()

    def fail(self, why: str) -> None:
        with self._cond:
            self._failed = self._failed or why
            self._cond.notify_all()


class ChannelReader(threading.Thread):
    """Reads one secondary channel (PAGES and ROUND records, then END) straight into
    guest memory, checked as the main stream is, on its own thread."""

    def __init__(self, conn, keys, index: int, header: wire.Header, memory, written, unverified,
                 target, sync: RoundSync):
        super().__init__(name=f"channel-{index}", daemon=True)
        self.conn, self.keys, self.index, self.header = conn, keys, index, header
        self.memory, self.written, self.unverified = memory, written, unverified
        self.target, self.sync = target, sync
        self.pages = self.bytes = self.tags_bad = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            dec = wire.StreamDecoder(self.conn, keys=self.keys, channel=True)
            if dec.read_preamble().ram != self.header.ram:
                raise StreamError("its header's RAM differs from the main stream's")
            rounds = 0
            while True:
                if dec.scatter_buffered(self.memory, self.written, self.unverified):
                    continue
                match dec.next_record(self.target):
                    case wire.Pages(gpa, npages, failed):
                        first = gpa >> PAGE_SHIFT
                        self.written[first:first + npages] = 1
                        if self.unverified is not None:
                            self.unverified[first:first + npages] = failed
                    case wire.Round():
                        rounds += 1
                        self.sync.arrive(self.index, rounds)
                    case wire.End():
                        break
            self.pages, self.bytes, self.tags_bad = dec.pages, dec.bytes_received, dec.tags_bad
        except StreamError as e:
            self.error = f"channel {self.index}: {e}"
            self.sync.fail(self.error)
        except Exception as e:         # any failure here is the migration's, reported by the main thread
            self.error = f"channel {self.index}: {type(e).__name__}: {e}"
            self.sync.fail(self.error)
        finally:
            self.sync.end(self.index)

    def finish(self) -> None:
        """Wait for END (due before the main stream's STATE); StreamError if it failed."""
        self.join(self.sync.timeout)
        if self.error or self.is_alive():
            raise StreamError(self.error or f"channel {self.index} did not end before STATE")
