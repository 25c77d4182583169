"""The README's "From Python" example, run as a user would paste it."""

from __future__ import annotations

import re
import subprocess
import sys

from kvmlite.procs import free_port

from .helpers import ROOT


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_boots_migrates_and_finishes():
    """Boot, live-migrate between two Machines in one process, finish: the guest's check passes there."""
    code = readme_example().replace("4455", str(free_port()))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^completed (\d+) pages sent, (\d+) skipped as free$", r.stdout, re.M)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, r.stdout
    summary = [l for l in r.stdout.splitlines() if l.startswith("KVMLITE-SUMMARY")]
    assert summary and "errors=0" in summary[-1] and "status=ok" in summary[-1], r.stdout
    assert "guest exit status 0" in r.stdout
