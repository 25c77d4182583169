"""Migration between two network namespaces joined by a veth pair, and a link cut mid-migration."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from kvmlite import exitcodes
from kvmlite.procs import VmProcess, free_port, start_destination

from .helpers import FINAL, GUEST, begin, finish_and_check, migrate

SRC_IP, DST_IP = "10.231.0.1", "10.231.0.2"

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_hosts():
    """Namespaces `a` (source) and `b` (destination) with a veth pair between them."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = f"kvl{os.getpid() % 100000}"
    a, b, va, vb = f"{tag}a", f"{tag}b", f"{tag}va", f"{tag}vb"
    ip("netns", "add", a)
    try:
        ip("netns", "add", b)
        ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        ip("-n", a, "addr", "add", f"{SRC_IP}/24", "dev", va)
        ip("-n", b, "addr", "add", f"{DST_IP}/24", "dev", vb)
        for ns, dev in ((a, va), (b, vb)):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield {"a": a, "b": b, "link_a": va}
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def test_cut_link_mid_migration_then_migrate_again(two_hosts, tmp_path):
    """Across a veth pair: cutting the link mid-migration leaves the VM running at the source; restored, it migrates."""
    key = tmp_path / "key"
    key.write_text("a key shared by the two hosts, 32+\n")
    a, b = two_hosts["a"], two_hosts["b"]
    src = VmProcess([os.fspath(GUEST), "--memory", "256M", "--auth-key", str(key),
                     "--cmdline", "workload=fill live=50 stale=20 dirty=1000"], prefix=in_ns(a))
    port = free_port()
    dst = start_destination(port, host=DST_IP, prefix=in_ns(b),
                            extra=["--auth-key", str(key), "--timeout", "3"])
    with src, dst:
        live = int(src.wait_for(r"^fill: ready live=(\d+)", timeout=60).group(1))
        c = begin(src, f"tcp:{DST_IP}:{port}", bandwidth=16 << 20, timeout=3)
        deadline = time.monotonic() + 30
        while (s := c.execute("query-migrate")).get("ram", {}).get("transferred", 0) < (8 << 20):
            assert s["status"] in ("setup", "active") and time.monotonic() < deadline, s
            time.sleep(0.05)
        ip("-n", a, "link", "set", two_hosts["link_a"], "down")
        deadline = time.monotonic() + 60
        while (s := c.execute("query-migrate"))["status"] not in FINAL:
            assert time.monotonic() < deadline, s
            time.sleep(0.1)
        assert s["status"] == "failed" and "stopped responding" in s["error-desc"], s
        assert c.execute("query-status")["status"] == "running"
        c.close()
        assert dst.wait(60) == exitcodes.DATAERR
        assert "the guest was not started" in "\n".join(dst.stderr_lines)

        ip("-n", a, "link", "set", two_hosts["link_a"], "up")
        port2 = free_port()
        dst2 = start_destination(port2, host=DST_IP, prefix=in_ns(b), extra=["--auth-key", str(key)])
        with dst2:
            s = migrate(src, f"tcp:{DST_IP}:{port2}")
            assert s["status"] == "completed", s
            assert src.wait(30) == 0
            finish_and_check(dst2, live)


def test_postcopy_link_cut_between_hosts_then_resume(two_hosts, tmp_path):
    """Post-copy across the veth pair; the link goes down mid-push (packets dropped, no
    reset): both VMMs notice by their --timeout, pause and keep their halves; the link
    comes back, `kvmlite migrate --resume` reconnects, and the guest's memory checks out."""
    import json

    from .helpers import kvmlite
    key = tmp_path / "key"
    key.write_text("a key shared by the two hosts, 32+\n")
    os.chmod(key, 0o600)
    a, b = two_hosts["a"], two_hosts["b"]
    src = VmProcess([os.fspath(GUEST), "--memory", "256M", "--auth-key", str(key), "--timeout", "3",
                     "--cmdline", "workload=fill live=20 stale=50 dirty=500"], prefix=in_ns(a))
    port = free_port()
    dst = start_destination(port, host=DST_IP, prefix=in_ns(b),
                            extra=["--auth-key", str(key), "--timeout", "3"])
    with src, dst:
        live = int(src.wait_for(r"^fill: ready live=(\d+)", timeout=60).group(1))
        c = begin(src, f"tcp:{DST_IP}:{port}", postcopy=True, postcopy_now=True, bandwidth=8 << 20)
        deadline = time.monotonic() + 60
        while not ((s := c.execute("query-migrate"))["status"] == "postcopy-active"
                   and s["x-postcopy"].get("pages-pushed", 0) > 500):
            assert s["status"] not in FINAL and time.monotonic() < deadline, s
            time.sleep(0.02)
        assert s["x-postcopy"]["pages-left"] > 1000, s
        ip("-n", a, "link", "set", two_hosts["link_a"], "down")
        deadline = time.monotonic() + 60
        while (s := c.execute("query-migrate"))["status"] != "postcopy-paused":
            assert time.monotonic() < deadline, s
            time.sleep(0.1)
        c.close()
        assert "took nothing in" in s["error-desc"] or "broken" in s["error-desc"], s
        while (d := dst.execute("query-migrate"))["status"] != "postcopy-paused":
            assert time.monotonic() < deadline, d
            time.sleep(0.1)
        ip("-n", a, "link", "set", two_hosts["link_a"], "up")
        # `kvmlite migrate` runs where the source's monitor is (a unix socket: any namespace)
        r = kvmlite("migrate", "--monitor", src.monitor_path, f"tcp:{DST_IP}:{port}", "--resume",
                    "--json", timeout=180)
        s = json.loads(r.stdout)
        assert r.returncode == 0 and s["status"] == "completed", (s, r.stderr)
        assert s["x-postcopy"]["recoveries"] == 1 and s["x-postcopy"]["requests-for-free"] == 0
        assert src.wait(30) == 0
        finish_and_check(dst, live)
