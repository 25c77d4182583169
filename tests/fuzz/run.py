"""Run the atheris harness (fuzz_stream.py) and say what it did.

    python -m tests.fuzz.run --runs 1000000 --corpus tests/fuzz/corpus --artifacts bench/out/fuzz

libFuzzer's own output goes to ARTIFACTS/fuzz.log; this prints one line with
the inputs executed, the time and the crashes found (crash-*, timeout-* and
oom-* files it saved), and exits non-zero if the fuzzer failed or found any.
libFuzzer stops at the first crash, so "crashes" is 0 or 1 per run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CRASH_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")


@dataclass
class FuzzResult:
    returncode: int
    executed: int | None
    seconds: float
    crashes: list[Path]
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.crashes and self.executed is not None


def _crash_files(artifacts: Path) -> set[Path]:
    return {p for p in artifacts.iterdir() if p.name.startswith(CRASH_PREFIXES)}


def run(runs: int, corpus: Path, artifacts: Path, *, timeout_s: int = 10, max_len: int = 65536,
        env: dict | None = None) -> FuzzResult:
    """Fuzz for `runs` inputs (libFuzzer's -runs) from `corpus`, which grows."""
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts / "fuzz.log"
    before = _crash_files(artifacts)
    cmd = [sys.executable, str(HERE / "fuzz_stream.py"), str(corpus),
           f"-runs={runs}", f"-max_len={max_len}",
           f"-timeout={timeout_s}",                  # an input this slow is a hang
           f"-dict={HERE / 'stream.dict'}", f"-artifact_prefix={artifacts}/",
           "-print_final_stats=1"]
    t0 = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env or os.environ.copy()).returncode
    seconds = time.monotonic() - t0
    text = log.read_text(errors="replace")
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
    executed = int(m.group(1)) if m else None
    return FuzzResult(rc, executed, seconds, sorted(_crash_files(artifacts) - before), log)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs to execute")
    ap.add_argument("--corpus", type=Path, default=HERE / "corpus",
                    help="corpus directory, seeded with valid streams when empty")
    ap.add_argument("--artifacts", type=Path, default=ROOT / "bench" / "out" / "fuzz",
                    help="where crashing inputs and fuzz.log go")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    r = run(args.runs, args.corpus, args.artifacts)
    rate = f" ({r.executed / r.seconds:,.0f}/s)" if r.executed and r.seconds else ""
    executed = f"{r.executed:,}" if r.executed is not None else "an unknown number of"
    corpus = sum(1 for _ in args.corpus.iterdir())
    print(f"fuzz: {executed} inputs in {r.seconds:.0f} s{rate}, corpus {corpus} files, "
          f"crashes: {len(r.crashes)}")
    for c in r.crashes:
        print(f"fuzz: crashing input saved as {c}; replay it with "
              f"python tests/fuzz/fuzz_stream.py {c}")
    if not r.ok:
        print(f"fuzz: libFuzzer exited with status {r.returncode}; its output is in {r.log}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
