"""Run every probe; tables on stdout, all figures in bench/out/probes.json.

    .venv/bin/python -m bench.probes [apstart timer ipi irqstate dirty smp]

docs/boot.md ("Measured on kvm_pvm") records what they found.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path

ALL = ("apstart", "timer", "ipi", "irqstate", "dirty", "smp")
OUT = Path(__file__).resolve().parent.parent / "out"


def main(argv: list[str]) -> int:
    names = argv or list(ALL)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown probe(s) {', '.join(unknown)}; choose from {', '.join(ALL)}", file=sys.stderr)
        return 2
    results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "host": platform.platform(), "probes": {}}
    for name in names:
        mod = importlib.import_module(f"bench.probes.{name}")
        print(f"==== {name} ====", flush=True)
        res = mod.main()
        mod.report(res)
        results["probes"][name] = res
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "probes.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
