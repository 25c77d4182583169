"""Running kvmlite VMs as separate processes: for the demo, the benchmarks and
the integration tests, which all migrate between two real processes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .control.client import QmpClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildProcess:
    """A child process whose stdout and stderr are collected line by line, so a
    caller can wait for a line (`wait_for`) while the child keeps running."""

    def __init__(self, args: list[str], *, echo: str | None = None, env: dict | None = None):
        self.args = args
        self.echo = echo
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env)
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout_lines),
                                          daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr_lines),
                                          daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, stream, lines: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            with self._cond:
                lines.append(line)
                self._cond.notify_all()
            if self.echo is not None:
                print(f"{self.echo}{line}", flush=True)
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, stream: str = "stdout") -> re.Match:
        """Wait for a line matching `pattern` on stdout (or stderr)."""
        rx = re.compile(pattern)
        lines = self.stdout_lines if stream == "stdout" else self.stderr_lines
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(lines)
                if self.proc.poll() is not None and all(not t.is_alive() for t in self._readers):
                    raise RuntimeError(f"process exited ({self.proc.returncode}) before printing "
                                       f"{pattern!r}:\n{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no line matching {pattern!r} within {timeout} s:\n{self.output()}")
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit and its output to be read; returns its status."""
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return "\n".join(["-- stdout --", *self.stdout_lines[-40:], "-- stderr --", *self.stderr_lines[-40:]])

    def summary(self) -> dict | None:
        """The guest's KVMLITE-SUMMARY line as a dict, if it printed one."""
        for line in reversed(self.stdout_lines):
            if "KVMLITE-SUMMARY" in line:
                return parse_summary(line[line.index("KVMLITE-SUMMARY"):])
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


KVMLITE = (sys.executable, "-m", "kvmlite")


class VmProcess(ChildProcess):
    """`python -m kvmlite run ...` in a child process, with its monitor socket.

    `vmm` is the command that stands for `kvmlite` (tests pass their harness,
    which injects fault hooks); `prefix` runs it through another command
    (e.g. `ip netns exec NS`)."""

    def __init__(self, args: list[str], *, monitor: bool = True, echo: str | None = None,
                 env: dict | None = None, prefix=(), vmm=KVMLITE):
        self.monitor_path = None
        if monitor:
            fd, self.monitor_path = tempfile.mkstemp(prefix="kvmlite-mon-", suffix=".sock")
            os.close(fd)
            os.unlink(self.monitor_path)
            args = args + ["--monitor", f"unix:{self.monitor_path}"]
        super().__init__([*prefix, *vmm, "run"] + args, echo=echo, env=env)

    def wait_monitor(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.monitor_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited before its monitor came up:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError("monitor socket did not appear")
            time.sleep(0.01)

    def client(self, timeout: float = 10.0) -> QmpClient:
        """A QMP client connected to this VM's monitor (negotiated)."""
        self.wait_monitor()
        return QmpClient(f"unix:{self.monitor_path}", timeout=timeout)

    def execute(self, command: str, arguments: dict | None = None, **kwargs):
        """One command on a fresh connection: its return value, or QmpCommandError.
        Keywords are arguments with `_` for `-` (cpu_index=0 is "cpu-index")."""
        args = dict(arguments or {}, **{k.replace("_", "-"): v for k, v in kwargs.items()})
        with self.client() as c:
            return c.execute(command, args or None)



def parse_summary(line: str) -> dict:
    out = {}
    for tok in line.split()[1:]:
        k, _, v = tok.partition("=")
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


def start_destination(port: int, memory: str | None = None, *, echo: str | None = None,
                      monitor: bool = True, extra=(), env: dict | None = None,
                      host: str = "127.0.0.1", prefix=(), vmm=KVMLITE) -> VmProcess:
    """`kvmlite run --incoming tcp:HOST:PORT`, returned once it listens.  `env`
    adds variables; `prefix` and `vmm` as for VmProcess."""
    args = ["--incoming", f"tcp:{host}:{port}", *extra]
    if memory:
        args += ["--memory", memory]
    dst = VmProcess(args, monitor=monitor, echo=echo,
                    env={**os.environ, **env} if env else None, prefix=prefix, vmm=vmm)
    dst.wait_for(r"waiting for a migration", timeout=120, stream="stderr")
    return dst


def start_deferred_destination(memory: str | None = None, *, echo: str | None = None, extra=(),
                               env: dict | None = None, prefix=(), vmm=KVMLITE) -> VmProcess:
    """`kvmlite run --incoming defer --monitor ...` (QEMU's -incoming defer), returned
    once it waits for the monitor's migrate-incoming to say where to listen."""
    args = ["--incoming", "defer", *extra]
    if memory:
        args += ["--memory", memory]
    dst = VmProcess(args, echo=echo, env={**os.environ, **env} if env else None, prefix=prefix, vmm=vmm)
    dst.wait_for(r"waiting for migrate-incoming", timeout=120, stream="stderr")
    return dst
