"""A guest that misuses the free-page-hint device (guest/hostile.c) only ever hurts itself."""

from __future__ import annotations

import re
import time

import pytest

from kvmlite.procs import VmProcess, free_port, start_destination

from .helpers import kvmlite, summary
from .helpers import migrate

REFUSED = 0x80000000
REGISTERED = 1
# What docs/abi.md says the device answers to each attempt the guest makes.
EXPECTED = {
    "outside": {
        "header-past-ram": REFUSED | 1,
        "header-straddles-ram-end": REFUSED | 1,
        "header-at-top-of-address-space": REFUSED | 1,
        "header-misaligned": REFUSED | 1,
        "bitmap-past-ram": REFUSED | 6,
        "bitmap-straddles-ram-end": REFUSED | 6,
        "covered-pages-past-ram": REFUSED | 5,
        "covered-pages-straddle-ram-end": REFUSED | 5,
        "own-bitmap-again": REGISTERED,
    },
    "overlap": {
        "bitmap-over-boot-page-tables": REGISTERED,     # RAM the guest owns after boot; only read
        "bitmap-over-boot-info": REGISTERED,
        "bitmap-starts-at-header": REFUSED | 6,
        "bitmap-inside-header": REFUSED | 6,
        "bitmap-runs-into-header": REFUSED | 6,
        "bitmap-just-below-header": REGISTERED,
        "own-bitmap-again": REGISTERED,
    },
    "huge": {
        "npages-2^64-1-bitmap-size-wrapped": REFUSED | 6,
        "npages-2^64-1": REFUSED | 5,
        "npages-times-page-size-wraps": REFUSED | 5,
        "base-plus-pages-wraps": REFUSED | 5,
        "npages-zero": REFUSED | 5,
        "bitmap-gpa-wraps": REFUSED | 6,
        "bitmap-size-2^64-8": REFUSED | 6,
        "header-size-65535": REGISTERED,
        "own-bitmap-again": REGISTERED,
    },
}
ATTEMPT = re.compile(r"^hostile: (\S+) header=0x[0-9a-f]+ status=0x([0-9a-f]+) reason=(\d+)$")


def attempts(stdout: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2), 16) for m in map(ATTEMPT.match, stdout.splitlines()) if m}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_bad_registrations_get_the_documented_status(guest_image, mode):
    """Each hostile REGISTER gets the STATUS docs/abi.md gives; the VMM survives and exits with the guest's 0."""
    r = kvmlite("run", str(guest_image), "--memory", "64M", "--cmdline", f"workload=hostile mode={mode}",
                timeout=60)
    assert attempts(r.stdout) == EXPECTED[mode], r.stdout
    s = summary(r.stdout)
    assert (s["errors"], s["status"]) == (0, "ok"), r.stdout
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    # the VMM logs refusals, but the same one repeated only once
    logged = [l for l in r.stderr.splitlines() if "free-page-hint registration at GPA" in l]
    refusals = sum(1 for v in EXPECTED[mode].values() if v & REFUSED)
    assert logged and len(set(logged)) == len(logged) <= refusals, r.stderr


def hostile_vm(guest, mode: str, pages: int) -> VmProcess:
    vm = VmProcess([str(guest), "--memory", "128M", "--cmdline",
                    f"workload=hostile mode={mode} pages={pages}"])
    vm.wait_for(rf"^hostile: {mode} ready live={pages}", timeout=60)
    return vm


def test_flip_guest_migrates_with_its_data_intact(guest_image):
    """Re-registering, unregistering and rewriting its header during live migrations loses the guest nothing."""
    vm = hostile_vm(guest_image, "flip", 2000)
    procs = [vm]
    try:
        for _ in range(3):          # several migrations, each racing the guest's flips
            port = free_port()
            nxt = start_destination(port, "128M")
            procs.append(nxt)
            s = migrate(vm, port)
            assert s["status"] == "completed", (s, vm.output(), nxt.output())
            assert vm.wait(30) == 0, vm.output()
            vm = nxt
        time.sleep(0.2)             # a few more flips on the last destination
        vm.execute("x-guest-finish")
        assert vm.wait(60) == 0, vm.output()
        s = vm.summary()
        assert (s["errors"], s["status"]) == (0, "ok"), vm.output()
        assert s["verified"] >= 2000
        assert not any("Traceback" in line for p in procs for line in p.stderr_lines)
    finally:
        for p in procs:
            p.kill()


def test_allfree_guest_loses_its_own_data_and_nothing_else(guest_image):
    """A guest marking its live pages free gets none of them migrated: it finds errors, both VMMs exit cleanly."""
    pages = 2000
    src = hostile_vm(guest_image, "allfree", pages)
    port = free_port()
    dst = start_destination(port, "128M")
    with src, dst:
        s = migrate(src, port)
        assert s["status"] == "completed", (s, src.output(), dst.output())
        assert s["ram"]["x-skipped-free"] >= pages
        assert src.wait(30) == 0, src.output()
        dst.execute("x-guest-finish")
        assert dst.wait(60) == 1, dst.output()          # the guest's own "a self-check failed"
        d = dst.summary()
        assert d["verified"] == pages and d["errors"] >= pages and d["status"] == "fail", d
        assert any(f"checked {pages} live pages" in l for l in dst.stdout_lines), dst.output()
        assert not any("Traceback" in l for l in src.stderr_lines + dst.stderr_lines)


def test_allfree_guest_without_migration_keeps_its_data(guest_image):
    """The same lying guest, never migrated, finds every live page intact: the loss above is the migration's skip."""
    r = kvmlite("run", str(guest_image), "--memory", "64M", "--cmdline",
                "workload=hostile mode=allfree pages=500 seconds=1", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(r.stdout)
    assert (s["verified"], s["errors"], s["status"]) == (500, 0, "ok"), s


def test_unknown_hostile_mode_is_a_command_line_error(guest_image):
    """mode=nonsense is refused like any bad command-line value: status 2 and a message naming it."""
    r = kvmlite("run", str(guest_image), "--memory", "64M", "--cmdline", "workload=hostile mode=nonsense",
                timeout=60)
    assert r.returncode == 2
    assert "unknown hostile mode" in r.stdout and "mode=nonsense" in r.stdout
