"""The PNG for `make bench-qemu`: time and bytes against the share of RAM freed with
stale data, and against guest size.  `python -m bench.plot [bench/out/qemu.json]`"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STYLE = {"QEMU defaults": ("tab:gray", "s", "--"), "QEMU best": ("tab:red", "o", "-"),
         "kvmlite hint off": ("tab:orange", "^", "--"), "kvmlite hint on": ("tab:blue", "D", "-")}


def _errbar(ax, xs, triples, label, scale=1.0):
    color, marker, ls = STYLE.get(label, ("k", "o", "-"))
    med = [t[0] * scale for t in triples]
    lo = [(t[0] - t[1]) * scale for t in triples]
    hi = [(t[2] - t[0]) * scale for t in triples]
    ax.errorbar(xs, med, yerr=[lo, hi], label=label, color=color, marker=marker, linestyle=ls, capsize=3)


def plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    q = results.get("qemu")
    if q:
        sweep = q["stale_sweep"]
        xs = sorted(int(p) for p in sweep)
        for config in q["configs"]:
            if not all(config in sweep[str(x)] and sweep[str(x)][config]["n"] for x in xs):
                continue
            _errbar(axes[0][0], xs, [sweep[str(x)][config]["total_ms"] for x in xs], config)
            _errbar(axes[0][1], xs, [sweep[str(x)][config]["mib_wire"] for x in xs], config)
        gib = q["memory_mib"] / 1024
        axes[0][0].set_title(f"{gib:g} GiB guest, 25 % live, live migration: total time")
        axes[0][1].set_title(f"{gib:g} GiB guest, 25 % live, live migration: bytes on the wire")
        axes[0][0].set_yscale("log")
        for ax, unit in ((axes[0][0], "total time, ms (median, min–max; log scale)"), (axes[0][1], "MiB on the wire")):
            ax.set_xlabel("% of RAM freed with stale data (the rest of the free 75 % never touched)")
            ax.set_ylabel(unit)
            ax.set_xticks(xs)
            if ax.get_yscale() == "linear":
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3, which="both")
            ax.legend()
    s = results.get("scaling")
    if s:
        rows = s["sizes"]
        xs = [r["size_mib"] / 1024 for r in rows]
        _errbar(axes[1][0], xs, [r["total_ms"] for r in rows], "kvmlite hint on")
        _errbar(axes[1][0], xs, [r["downtime_ms"] for r in rows], "downtime", 1.0)
        axes[1][0].set_title(f"kvmlite, {s['live_mib']} MiB live whatever the guest size: time")
        axes[1][0].set_ylabel("ms (median, min–max)")
        ax = axes[1][1]
        ax.plot(xs, [r["mib_wire"] for r in rows], "D-", color="tab:blue", label="MiB on the wire")
        ax.plot(xs, [r["src_rss_mib"] for r in rows], "o--", color="tab:green", label="source VMM peak RSS, MiB")
        ax.plot(xs, [r["dst_rss_mib"] for r in rows], "s--", color="tab:purple",
                label="destination VMM peak RSS, MiB")
        ax.plot(xs, [r["touched_mib"] for r in rows], ":", color="k", label="guest pages in use, MiB")
        ax.axhline(s["vmm_alone_rss_mib"], color="gray", linestyle="-.", linewidth=1,
                   label="VMM alone (hello guest), peak RSS")
        ax.set_title(f"kvmlite, {s['live_mib']} MiB live: bytes and memory")
        ax.set_ylabel("MiB")
        for ax in axes[1]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
            ax.set_xlabel("guest RAM, GiB (log scale)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend()
    m = results.get("machine", {})
    fig.suptitle(f"kvmlite vs QEMU {m.get('qemu') or ''} — {m.get('cpu', '')}, {m.get('cpus', '?')} CPUs, "
                 f"Linux {m.get('kernel', '')} ({m.get('kvm', '')}), {m.get('date', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "out" / "qemu.json"
    print(plot(json.loads(src.read_text()), src.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
