"""Running `python -m kvmlite` the way a user does, and reading what it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvmlite.control.client import QmpClient
from kvmlite.procs import VmProcess, parse_summary
from kvmlite.tools.migrate import FINAL, configure, follow, run_migration, start  # noqa: F401

from tests.harness import vmm_command

ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "guest" / "guest.bin"


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


def fill_vm(memory: str = "256M", live: int = 20, stale: int = 50, dirty: int = 500, *,
            faults=(), extra=()) -> tuple[VmProcess, dict]:
    """The `fill` guest, running with its monitor, once it has filled its pages:
    (the process, {"live": pages, "stale": pages}).  With `faults` (POINT=ACTION)
    its VMM starts through the test harness."""
    vm = VmProcess([str(GUEST), "--memory", memory, "--cmdline",
                    f"workload=fill live={live} stale={stale} dirty={dirty}", *extra],
                   **({"vmm": vmm_command(faults)} if faults else {}))
    m = vm.wait_for(r"^fill: ready live=(\d+) stale=(\d+)", timeout=120)
    return vm, {"live": int(m.group(1)), "stale": int(m.group(2))}


def _uri(port: int | str) -> str:
    return port if isinstance(port, str) else f"tcp:127.0.0.1:{port}"


def migrate(src: VmProcess, port: int | str, timeout: float = 120, **settings) -> dict:
    """Migrate through the source's QMP monitor as `kvmlite migrate` does (to
    tcp:127.0.0.1:PORT, or a URI) and return the final query-migrate, whatever
    its outcome.  `settings`: stop_copy, keep_running, quit (of the source left
    in postmigrate: on by default) and tools.migrate.configure's (hint,
    bandwidth in bytes/s, downtime_ms, max_rounds, timeout)."""
    with src.client() as c:
        return run_migration(c, _uri(port), timeout=timeout, interval=0.02, **settings)


def begin(src: VmProcess, port: int | str, **settings) -> QmpClient:
    """Start a migration (configure's settings) and return the open client, for
    a test that watches or cancels it."""
    c = src.client()
    configure(c, **settings)
    c.execute("migrate", {"uri": _uri(port)})
    return c


def pages_transferred(info: dict) -> int:
    """Pages sent with their data or as zero, from a query-migrate."""
    return info["ram"]["normal"] + info["ram"]["duplicate"]


def finish_and_check(vm: VmProcess, min_verified: int) -> dict:
    """Ask the fill workload to finish; it must verify its memory and exit 0."""
    vm.execute("x-guest-finish")
    assert vm.wait(120) == 0, vm.output()
    s = vm.summary()
    assert s["errors"] == 0 and s["status"] == "ok", s
    assert s["verified"] >= min_verified, s
    return s


class Relay:
    """A TCP relay a test can cut: listens on 127.0.0.1:`port`, and forwards each
    connection to 127.0.0.1:`upstream`, both ways.  `cut()` breaks every
    connection it carries (both peers see the link go) and stops accepting."""

    def __init__(self, upstream: int):
        import socket
        import threading
        self.upstream = upstream
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.port = self.srv.getsockname()[1]
        self.socks: list = []
        self.bytes = 0              # bytes carried, both ways
        self._lock = threading.Lock()
        self.cut_done = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading
        while True:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                a.close()
                continue
            with self._lock:
                if self.cut_done:
                    a.close()
                    b.close()
                    return
                self.socks += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    def _pump(self, src, dst) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    self.bytes += len(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(2)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            self.cut_done = True
            socks, self.socks = self.socks, []
        self.srv.close()
        for s in socks:
            try:
                s.shutdown(2)
            except OSError:
                pass
            s.close()


def resolve(vm: VmProcess, owner: str) -> subprocess.CompletedProcess:
    """The operator's documented command for a migration left unresolved:
    `kvmlite migrate --monitor SOCKET --resolve source|destination`."""
    r = kvmlite("migrate", "--monitor", vm.monitor_path, "--resolve", owner, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return r
