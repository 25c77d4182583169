"""The claim-2 race under stress: a churning guest live-migrated back and forth."""

import json
import subprocess
import sys

import pytest

from .helpers import ROOT

MIGRATIONS = 10     # `make soak` runs 1000

pytestmark = pytest.mark.slow


def _soak(*extra: str, module: str = "kvmlite.soak") -> dict:
    r = subprocess.run([sys.executable, "-m", *module.split(), "--migrations", str(MIGRATIONS),
                        "--json", *extra], capture_output=True, text=True, timeout=600, cwd=ROOT)
    figures = json.loads(r.stdout)
    figures["exit_status"] = r.returncode
    return figures


def test_soak_loses_no_page():
    """Ten live migrations of a guest churning flat out: every one completes, 0 corrupted pages."""
    r = _soak()
    assert r["completed"] == MIGRATIONS and r["failed"] == 0, r
    assert r["guest_exit_status"] == 0 and r["guest_errors"] == 0, r
    assert r["corrupted_pages"] == 0, r
    assert r["guest_pages_verified"] > 0
    assert r["exit_status"] == 0


def test_soak_catches_the_broken_order():
    """Reading free bits before clearing the dirty log (the harness's sender) loses pages, and the soak says so."""
    r = _soak("--broken-order", module="tests.harness soak")
    assert "BROKEN ORDER" in r["vmm"]
    assert r["corrupted_pages"] > 0, r
    assert r["guest_exit_status"] != 0
    assert r["exit_status"] == 1


def test_soak_on_two_cpus_loses_no_page():
    """Allocators on both CPUs at once, the bitmap written concurrently: a few live
    migrations, each CPU's pages verified, 0 corrupted."""
    r = _soak("--smp", "2", "--migrations", "4")
    assert r["cpus"] == 2 and r["completed"] == 4 and r["failed"] == 0, r
    assert r["guest_exit_status"] == 0 and r["guest_errors"] == 0 and r["corrupted_pages"] == 0, r
    assert r["exit_status"] == 0


def test_soak_on_two_cpus_catches_the_broken_order():
    """The broken order still loses pages when both CPUs churn."""
    r = _soak("--smp", "2", "--migrations", "4", "--broken-order", module="tests.harness soak")
    assert r["cpus"] == 2 and r["corrupted_pages"] > 0, r
    assert r["exit_status"] == 1
