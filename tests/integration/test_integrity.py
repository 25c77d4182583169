"""Page data protected: a bit flipped anywhere in a snapshot, or a record edited or
dropped on a keyed link, is refused before the guest runs (docs/wire-format.md, "Integrity")."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from kvmlite import exitcodes
from kvmlite.migration import wire
from kvmlite.procs import free_port, start_destination

from .helpers import finish_and_check, kvmlite, migrate
from .test_reliability import busy_vm


def record_regions(data: bytes) -> dict[str, int]:
    """An offset inside each kind of region of a snapshot with integrity on:
    the preamble, the header, a PAGES head, payload and tag, a ZERO record,
    a ROUND record, the STATE body, END's counts, checksum and MAC."""
    (hlen,) = struct.unpack_from("<I", data, 12)
    out = {"magic": 3, "version": 9, "header": 16 + hlen // 2}
    pos = 16 + hlen
    while pos < len(data):
        rtype = data[pos]
        if rtype == wire.REC_PAGES:
            _, _, n = struct.unpack_from("<BQI", data, pos)
            out.setdefault("PAGES head", pos + 5)
            out.setdefault("PAGES payload", pos + 13 + n * wire.PAGE_SIZE // 2)
            out.setdefault("PAGES tag", pos + 13 + n * wire.PAGE_SIZE + n * wire.TAG_SIZE // 2)
            pos += 13 + n * (wire.PAGE_SIZE + wire.TAG_SIZE)
        elif rtype == wire.REC_ZERO:
            out.setdefault("ZERO record", pos + 10)
            pos += 13
        elif rtype == wire.REC_ROUND:
            out.setdefault("ROUND record", pos + 1)
            pos += 5
        elif rtype == wire.REC_STATE:
            (n,) = struct.unpack_from("<I", data, pos + 1)
            out["STATE body"] = pos + 5 + n // 2
            pos += 5 + n
        elif rtype == wire.REC_END:
            out.update({"END counts": pos + 3, "END checksum": pos + 18, "END MAC": pos + 40})
            pos += 53
        else:
            raise AssertionError(f"unknown record {rtype:#x} at {pos}")
    assert pos == len(data)
    return out


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A stop-copy snapshot of the fill guest (every page sent once, no race), and its live pages."""
    path = tmp_path_factory.mktemp("snap") / "vm.snap"
    src, live = busy_vm()
    with src:
        s = migrate(src, f"file:{path}", stop_copy=True)
        assert s["status"] == "completed", s
        assert src.wait(60) == 0
    return path, live


def test_an_intact_snapshot_restores(snapshot, tmp_path):
    """The snapshot as written restores, and the guest's check passes."""
    path, live = snapshot
    from kvmlite.procs import VmProcess
    vm = VmProcess(["--incoming", f"file:{path}"])
    with vm:
        vm.wait_for("guest resumed", stream="stderr")
        finish_and_check(vm, live)


def test_a_bit_flipped_in_any_region_of_a_snapshot_is_refused(snapshot, tmp_path):
    """One bit flipped in each region of a snapshot: each is refused, the guest never runs."""
    path, _ = snapshot
    data = path.read_bytes()
    regions = record_regions(data)
    assert {"PAGES payload", "PAGES tag", "ZERO record", "STATE body", "END MAC"} <= set(regions)
    for name, offset in regions.items():
        flipped = bytearray(data)
        flipped[offset] ^= 0x04
        bad = tmp_path / f"{name.replace(' ', '-')}.snap"
        bad.write_bytes(flipped)
        r = kvmlite("run", "--incoming", f"file:{bad}", timeout=60)
        assert r.returncode == exitcodes.DATAERR, (name, r.stderr)
        assert "the guest was not started" in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert "KVMLITE-SUMMARY" not in r.stdout and not r.stdout.strip(), name
        if name in ("PAGES payload", "PAGES tag"):
            # nothing but the tag protects page data: this is the check that caught it
            assert "failed the integrity check" in r.stderr, (name, r.stderr)
        if name == "END MAC":
            assert "structure MAC does not match" in r.stderr, r.stderr


class TamperingRelay:
    """A TCP relay between source and destination that changes the source's
    stream: `edit(offset)` flips a bit at that stream offset, `drop(start, n)`
    leaves out n bytes.  Everything else passes through both ways."""

    def __init__(self, target_port: int, *, flip_at: int | None = None, drop: tuple[int, int] | None = None):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.target = target_port
        self.flip_at, self.drop = flip_at, drop
        self.forwarded = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        a, _ = self.srv.accept()
        b = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pipe, args=(b, a, False), daemon=True).start()
        self._pipe(a, b, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, tamper: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if tamper:
                    data = self._tamper(bytearray(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _tamper(self, data: bytearray) -> bytes:
        start, end = self.forwarded, self.forwarded + len(data)
        self.forwarded = end
        if self.flip_at is not None and start <= self.flip_at < end:
            data[self.flip_at - start] ^= 0x01
        if self.drop is not None:
            d0, n = self.drop
            lo, hi = max(d0, start), min(d0 + n, end)
            if lo < hi:
                del data[lo - start:hi - start]
        return bytes(data)


@pytest.mark.parametrize("how", ["flip page data", "flip a record head", "drop bytes mid-stream"])
def test_a_keyed_link_refuses_a_tampered_stream(tmp_path, how):
    """--auth-key without TLS: a relay that edits or drops stream bytes is caught; the source keeps the VM."""
    key = tmp_path / "vm.key"
    key.write_text("a shared key of thirty-two bytes!\n")
    key.chmod(0o600)
    port = free_port()
    dst = start_destination(port, extra=["--auth-key", str(key), "--timeout", "5"])
    # Past the handshake (< 1 KiB), inside the first round's pages.
    relay = TamperingRelay(port, **{"flip page data": {"flip_at": 200_000},
                                    "flip a record head": {"flip_at": 200_000 - 200_000 % 4122 + 4122 * 3},
                                    "drop bytes mid-stream": {"drop": (300_000, 4096 + 13 + 16)}}[how])
    src, live = busy_vm(extra=("--auth-key", str(key)))
    with dst, src:
        s = migrate(src, relay.port, stop_copy=True)
        assert s["status"] == "failed", s
        assert dst.wait(30) == exitcodes.DATAERR
        err = "\n".join(dst.stderr_lines)
        assert "the guest was not started" in err and "Traceback" not in err, err
        if how == "flip page data":
            assert "failed the integrity check" in err, err
        assert not dst.stdout_lines, "the tampered guest must not have run"
        assert src.execute("query-status")["status"] == "running"
        finish_and_check(src, live)


@pytest.mark.slow
def test_honest_races_never_refuse_a_keyed_migration(tmp_path):
    """A guest churning flat out, migrated live over keyed links: pages it writes while
    they are being sent fail their tags and come again; every migration completes, 0 pages lost."""
    import json
    import subprocess
    import sys

    from .helpers import ROOT
    key = tmp_path / "soak.key"
    key.write_text("a key for the keyed soak, 32 bytes\n")
    key.chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "kvmlite.soak", "--migrations", "5", "--memory", "256M",
                        "--auth-key", str(key), "--json"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    figures = json.loads(r.stdout)
    assert figures["completed"] == 5 and figures["failed"] == 0, figures
    assert figures["corrupted_pages"] == 0 and figures["guest_errors"] == 0, figures
    assert r.returncode == 0
