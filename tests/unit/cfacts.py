"""Facts a C compiler states about a kernel header, for the ABI tests: compile a
program that prints `KEY... VALUE` lines, run it, and read them back."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def header_facts(tmp_path_factory, name: str, source: str) -> dict[tuple[str, ...], int]:
    """{("size", struct): n, ("offset", struct, field): n, ("const", NAME): n, ...}
    as the program `source` prints them; skips the test without a C compiler."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp(name)
    (d / f"{name}.c").write_text(source)
    subprocess.run([gcc, "-o", str(d / name), str(d / f"{name}.c")], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(d / name)], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        *key, value = line.split()
        facts[tuple(key)] = int(value)
    return facts
