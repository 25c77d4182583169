"""Shared test set-up.

Integration tests need /dev/kvm.  Without it they are skipped with the reason,
except under CI=true, where a missing /dev/kvm is a failure: CI promises to
run them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guest" / "guest.bin"


def _kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm"
    return None


def kvm_problem() -> str | None:
    return _kvm_problem()


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """guest/guest.bin, built by `make guest` if missing."""
    if not GUEST.exists():
        subprocess.run(["make", "-C", str(ROOT / "guest")], check=True)
    return GUEST
