"""The teaching labs (docs/labs/): every console command runs and prints what the lab says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lab_check", ROOT / "docs" / "labs" / "check.py")
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check      # dataclasses look their module up there
_spec.loader.exec_module(check)

COMMAND_TIMEOUT = 90.0

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("lab", check.lab_files(), ids=lambda p: p.stem)
def test_lab_commands_print_what_the_lab_shows(lab, guest_image):
    """Each `$ command` in the lab exits 0 and its output matches the lines shown under it
    (several terminals' commands run side by side, as the lab has them typed)."""
    failures = check.check_lab(lab, timeout=COMMAND_TIMEOUT)
    assert not failures, f"KVM kind: {check.host_kind()}\n\n" + "\n\n".join(failures)


SKIPPED = [(lab, line, reason) for lab in check.lab_files() for line, reason in check.skipped(lab)]


@pytest.mark.parametrize("lab,line,reason", SKIPPED,
                         ids=[f"{lab.stem}:{line}" for lab, line, _ in SKIPPED])
def test_skipped_lab_blocks(lab, line, reason):
    """A block a lab marks `skip` is reported here, with its reason, rather than passing unseen."""
    pytest.skip(f"{lab.name}:{line}: {reason}")
