"""A bounded run of the coverage-guided fuzzer, for CI (`make fuzz` does long runs)."""

from __future__ import annotations

import os

import pytest

from . import run
from .target import seed_streams

pytest.importorskip("atheris", reason="atheris is in the [fuzz] extra: pip install -e '.[test,fuzz]'")

# ~7 s here (~15,000 inputs/s); the budget for this test in CI is ~20 s.
RUNS = 100_000


def test_bounded_fuzz_run_finds_no_crash(tmp_path):
    """100,000 mutated streams from the seed corpus: the fuzzer exits 0, counts them all, saves no crash."""
    r = run.run(RUNS, tmp_path / "corpus", tmp_path / "artifacts")
    assert r.crashes == [], r.log.read_text(errors="replace")[-4000:]
    assert r.returncode == 0, r.log.read_text(errors="replace")[-4000:]
    assert r.executed == RUNS
    assert len(list((tmp_path / "corpus").iterdir())) > len(seed_streams())   # coverage grew


def test_fuzzer_reports_a_write_past_guest_ram(tmp_path):
    """With a planted one-byte write past RAM, the run fails and saves the input as a crash."""
    env = dict(os.environ, KVMLITE_FUZZ_SELFTEST="write-past-ram")
    r = run.run(1000, tmp_path / "corpus", tmp_path / "artifacts", env=env)
    assert r.returncode != 0
    assert [c.name.split("-")[0] for c in r.crashes] == ["crash"]
    assert "deadly signal" in r.log.read_text(errors="replace")
