"""Who may send a VM (shared key, mutual TLS), and snapshots to a file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from kvmlite import exitcodes
from kvmlite.errors import KvmliteError
from kvmlite.pki import make_pki, tls_args
from kvmlite.procs import VmProcess, free_port, start_destination

from .helpers import finish_and_check, kvmlite, migrate, pages_transferred
from .test_reliability import FILL_ARGS, busy_vm


def write_key(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def keys(tmp_path):
    return (write_key(tmp_path / "good.key", "correct horse battery staple 1234\n"),
            write_key(tmp_path / "other.key", "a different key, equally long...\n"))


def _vm_with_key(key: Path | None) -> tuple[VmProcess, int]:
    from .helpers import GUEST
    args = [os.fspath(GUEST), *FILL_ARGS]
    if key:
        args += ["--auth-key", str(key)]
    vm = VmProcess(args)
    m = vm.wait_for(r"^fill: ready live=(\d+)", timeout=60)
    return vm, int(m.group(1))


def test_shared_key_admits_only_the_keyed_source(keys):
    """With --auth-key: wrong key and no key are refused on both sides, the destination waits on, the right key migrates."""
    good, other = keys
    port = free_port()
    dst = start_destination(port, extra=["--auth-key", str(good)])
    assert "key required" in "\n".join(dst.stderr_lines)
    wrong, _ = _vm_with_key(other)
    nokey, _ = _vm_with_key(None)
    right, live = _vm_with_key(good)
    with dst, wrong, nokey, right:
        s = migrate(wrong, port)
        assert s["status"] == "failed" and "authentication failed" in s["error-desc"], s
        dst.wait_for("refused a connection .*the source's key does not match", stream="stderr")
        s = migrate(nokey, port)
        assert s["status"] == "failed" and "requires authentication" in s["error-desc"], s
        dst.wait_for("refused a connection .*the source has no key", stream="stderr")
        for vm in (wrong, nokey):
            assert vm.execute("query-status")["status"] == "running"
        # a stranger that speaks no handshake at all is refused too
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 100)
        dst.wait_for("refused a connection .*(frame length|not a msgpack)", stream="stderr")
        assert dst.proc.poll() is None and not dst.stdout_lines    # no VM state was read
        s = migrate(right, port)
        assert s["status"] == "completed", s
        assert right.wait(30) == 0
        finish_and_check(dst, live)


def test_keyed_source_refuses_an_unauthenticated_destination(keys):
    """A source holding a key does not hand its VM to a destination that asks for none."""
    port = free_port()
    dst = start_destination(port)
    src, live = _vm_with_key(keys[0])
    with src, dst:
        s = migrate(src, port)
        assert s["status"] == "failed" and "does not authenticate" in s["error-desc"], s
        assert src.execute("query-status")["status"] == "running"
        finish_and_check(src, live)


def test_short_key_file_is_a_clear_error(tmp_path):
    """A key shorter than 16 bytes is refused at start-up with one line."""
    r = kvmlite("run", "--incoming", "tcp:127.0.0.1:1", "--auth-key",
                str(write_key(tmp_path / "k", "short")))
    assert r.returncode == exitcodes.CONFIG and "a key must be 16 to" in r.stderr
    assert "Traceback" not in r.stderr


def test_mutual_tls_migrates_and_refuses_a_foreign_certificate(tmp_path):
    """Over TLS with certificates checked both ways the VM arrives intact; a certificate from another CA is refused."""
    pki, rogue = make_pki(tmp_path / "pki"), make_pki(tmp_path / "rogue", name="rogue")
    from .helpers import GUEST
    port = free_port()
    dst = start_destination(port, extra=tls_args(pki, "dst"))
    bad = VmProcess([os.fspath(GUEST), *FILL_ARGS, *tls_args(rogue, "src")])
    src = VmProcess([os.fspath(GUEST), *FILL_ARGS, *tls_args(pki, "src")])
    with dst, bad, src:
        bad.wait_for(r"^fill: ready", timeout=60)
        s = migrate(bad, port)
        assert s["status"] == "failed" and "TLS" in s["error-desc"], s
        dst.wait_for("refused a connection .*TLS handshake failed", stream="stderr")
        assert bad.execute("query-status")["status"] == "running"
        live = int(src.wait_for(r"^fill: ready live=(\d+)", timeout=60).group(1))
        s = migrate(src, port)
        assert s["status"] == "completed", s
        finish_and_check(dst, live)


def test_snapshot_to_file_and_restore(tmp_path):
    """migrate file:PATH saves the active pages only; run --incoming file:PATH restores and the guest carries on."""
    snap = tmp_path / "vm.snap"
    src, live = busy_vm()
    with src:
        src.execute("stop")
        active = src.execute("x-query-free-pages")["active"]
        s = migrate(src, f"file:{snap}")
        assert s["status"] == "completed", s
        assert src.wait(30) == 0
    assert pages_transferred(s) == active
    assert snap.stat().st_size == s["ram"]["transferred"]
    assert s["ram"]["normal-bytes"] < snap.stat().st_size < s["ram"]["normal-bytes"] + (1 << 20)
    assert not (tmp_path / "vm.snap.part").exists()
    dst = VmProcess(["--incoming", f"file:{snap}"])
    with dst:
        dst.wait_for("guest resumed", stream="stderr")
        finish_and_check(dst, live)


def test_truncated_snapshot_is_refused(tmp_path):
    """A snapshot cut short is refused with a clear error and the guest is not started."""
    snap = tmp_path / "vm.snap"
    src, _ = busy_vm()
    with src:
        assert migrate(src, f"file:{snap}", stop_copy=True)["status"] == "completed"
        assert src.wait(60) == 0
    data = snap.read_bytes()
    (tmp_path / "cut.snap").write_bytes(data[:len(data) // 2])
    r = kvmlite("run", "--incoming", f"file:{tmp_path / 'cut.snap'}")
    assert r.returncode == exitcodes.DATAERR
    assert "truncated" in r.stderr and "the guest was not started" in r.stderr
    assert "Traceback" not in r.stderr and "KVMLITE-SUMMARY" not in r.stdout


def test_a_silent_peer_does_not_hold_the_port():
    """A peer that connects and says nothing does not keep the real source out; it is dropped."""
    port = free_port()
    dst = start_destination(port)
    src, live = busy_vm()
    with dst, src, socket.create_connection(("127.0.0.1", port)) as silent:
        silent.settimeout(30)
        assert silent.recv(1 << 16)     # it got the HELLO, and says nothing back
        s = migrate(src, port)          # served beside the silent peer, not behind it
        assert s["status"] == "completed", s
        while silent.recv(1 << 16):     # then the destination hangs up on it
            pass
        finish_and_check(dst, live)


def test_listening_beyond_loopback_needs_a_key_or_insecure():
    """--incoming on a non-loopback address without a key or TLS is refused unless --insecure says so."""
    r = kvmlite("run", "--incoming", f"tcp:0.0.0.0:{free_port()}", timeout=30)
    assert r.returncode == exitcodes.CONFIG and "--auth-key" in r.stderr and "--insecure" in r.stderr, r.stderr
    port = free_port()
    dst = start_destination(port, host="0.0.0.0", extra=["--insecure"])
    with dst:
        assert "warning: --insecure" in "\n".join(dst.stderr_lines)


def test_snapshot_keep_running_leaves_two_good_copies(tmp_path):
    """migrate --keep-running file:PATH saves a snapshot and the VM carries on; both the VM and the restored snapshot verify."""
    import subprocess
    import sys
    from .helpers import ROOT
    snap = tmp_path / "vm.snap"
    src, live = busy_vm()
    with src:
        r = subprocess.run([sys.executable, "-m", "kvmlite", "migrate", "--monitor", src.monitor_path,
                            f"file:{snap}", "--keep-running", "--json"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        assert src.execute("query-status")["status"] == "running"
        src.wait_for("keeps running here", timeout=10, stream="stderr")    # stderr is read by a thread
        with pytest.raises(KvmliteError, match="keep-running is for snapshots"):
            src.execute("migrate", {"uri": "tcp:127.0.0.1:1", "x-keep-running": True})
        finish_and_check(src, live)
    dst = VmProcess(["--incoming", f"file:{snap}"])
    with dst:
        dst.wait_for("guest resumed", stream="stderr")
        finish_and_check(dst, live)
