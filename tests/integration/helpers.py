"""Running `python -m kvmlite` the way a user does, and reading what it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvmlite.procs import parse_summary

ROOT = Path(__file__).resolve().parents[2]


def kvmlite(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmlite", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def summary(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.startswith("KVMLITE-SUMMARY")]
    assert lines, f"no KVMLITE-SUMMARY line in:\n{stdout[-3000:]}"
    return parse_summary(lines[-1])


def assemble(tmp_path: Path, name: str, source: str, *, flat: bool = True) -> Path:
    """Build a tiny test guest from assembly with the machine's gcc and ld."""
    src = tmp_path / f"{name}.S"
    src.write_text(source)
    obj = tmp_path / f"{name}.o"
    out = tmp_path / (f"{name}.bin" if flat else f"{name}.elf")
    subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True)
    ld = ["ld", "-Ttext=0x100000", "-o", str(out), str(obj)]
    if flat:
        ld[1:1] = ["--oformat", "binary"]
    subprocess.run(ld, check=True)
    return out
