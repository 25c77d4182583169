"""Run the labs' console blocks and check what they print (docs/labs/README.md).

    python docs/labs/check.py                      # every lab
    python docs/labs/check.py docs/labs/lab2-devices.md

A lab is Markdown.  Its fenced blocks with the info string `console` hold
commands and the output they must print:

    $ python -m kvmlite run guest/guest.bin --cmdline workload=hello
    ...
    Hello from the kvmlite guest!
    KVMLITE-SUMMARY workload=hello … status=ok

Each command runs with `bash -c` from the repository root, with the Python
that runs this file first on PATH, stdout and stderr together.  It must exit
with status 0 and its output must match the lines below it:

* a line `...` matches any number of lines (none included);
* in a line, `…` matches any text and `{{REGEX}}` matches what the Python
  regular expression REGEX matches; everything else is literal;
* trailing spaces and trailing empty lines do not count.

Words after `console` in the fence are attributes:

* `terminal=N`: the block is typed into terminal N, beside other terminals.
  Consecutive terminal blocks are one session.  A command waits for the one
  before it in the same terminal to exit; the lab moves on to the next
  command once this one has printed its lines up to the first `...` (all
  of them, i.e. it has exited, if there is no `...`), as a reader watching
  that terminal would.  At the end of the session every command must have
  exited with status 0 and printed what the lab shows.
* `skip="REASON"`: the block is shown but not run; the test suite reports
  it as skipped, with the reason.

tests/integration/test_labs.py runs every lab this way; tests/unit/test_lab_format.py
checks the matcher.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LABS = Path(__file__).resolve().parent
ROOT = LABS.parents[1]
ANY_LINES = "..."
ANY_TEXT = "\u2026"          # …
PROMPT = "$ "
DEFAULT_TIMEOUT = 60.0


@dataclass
class Step:
    """One `$ command` of a console block and the lines it must print."""
    command: str
    expected: list[str]
    line: int                 # line of the `$` in the lab, 1-based


@dataclass
class Block:
    info: str
    line: int
    steps: list[Step] = field(default_factory=list)
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> str | None:
        return self.attrs.get("terminal")

    @property
    def skip(self) -> str | None:
        return self.attrs.get("skip")


class LabFormatError(ValueError):
    pass


_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^`\s]*)(.*)$")
_ATTR = re.compile(r'\s*(\w+)=(?:"([^"]*)"|(\S+))')
ATTRIBUTES = ("terminal", "skip")


def parse_attributes(text: str, line: int) -> dict[str, str]:
    """`terminal=2 skip="a reason"` -> {"terminal": "2", "skip": "a reason"}."""
    attrs, pos, text = {}, 0, text.rstrip()
    while pos < len(text):
        m = _ATTR.match(text, pos)
        if not m or m.group(1) not in ATTRIBUTES:
            raise LabFormatError(f"line {line}: cannot read the fence's attributes {text.strip()!r} "
                                 f"(known: {', '.join(ATTRIBUTES)}; NAME=VALUE or NAME=\"A VALUE\")")
        attrs[m.group(1)] = m.group(2) if m.group(2) is not None else m.group(3)
        pos = m.end()
    return attrs


def fenced_blocks(text: str) -> list[tuple[str, int, list[str], str]]:
    """(info string, line of the opening fence, body lines, rest of the fence line)
    of every fenced block."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, rest, start = m.group(1), m.group(2), m.group(3), i + 1
        body = []
        i += 1
        while i < len(lines) and not (lines[i].startswith(fence[0] * len(fence))
                                      and not lines[i].strip(fence[0]).strip()):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise LabFormatError(f"line {start}: the ``` block is never closed")
        out.append((info, start, body, rest))
        i += 1
    return out


def parse_console(body: list[str], first_line: int) -> list[Step]:
    """Split a console block into steps.  A command line ending in a backslash
    continues on the next line, as in the shell."""
    steps: list[Step] = []
    i = 0
    while i < len(body):
        line = body[i]
        if not line.startswith(PROMPT):
            if steps:
                steps[-1].expected.append(line)
            elif line.strip():
                raise LabFormatError(f"line {first_line + i}: a console block must start "
                                     f"with a '$ command' line, not {line!r}")
            i += 1
            continue
        number = first_line + i
        command = line[len(PROMPT):]
        while command.endswith("\\") and i + 1 < len(body):
            i += 1
            command = command[:-1] + body[i].removeprefix("> ")   # backslash-newline vanishes
        steps.append(Step(command.strip(), [], number))
        i += 1
    for step in steps:
        while step.expected and not step.expected[-1].strip():
            step.expected.pop()
    return steps


def parse_lab(text: str) -> list[Block]:
    """Every console block of a lab, with its steps."""
    blocks = []
    for info, line, body, rest in fenced_blocks(text):
        if info == "console":
            blocks.append(Block(info, line, parse_console(body, line + 1),
                                parse_attributes(rest, line)))
    return blocks


# ---- matching -----------------------------------------------------------------------

def line_pattern(expected: str) -> re.Pattern:
    """An expected line as a regular expression: `…` any text, `{{REGEX}}` as given."""
    parts = []
    for k, piece in enumerate(re.split(r"\{\{(.*?)\}\}(?!\})", expected.rstrip())):
        if k % 2:
            parts.append(f"(?:{piece})")
        else:
            parts.append(".*?".join(re.escape(p) for p in piece.split(ANY_TEXT)))
    return re.compile("".join(parts))


def match_lines(expected: list[str], actual: list[str]) -> bool:
    """True if `actual` matches `expected`, where a line `...` stands for any lines."""
    expected = _trim(expected)
    actual = [a.rstrip() for a in _trim(actual)]
    pats = [None if e.strip() == ANY_LINES else line_pattern(e) for e in expected]
    # reach[j]: the first i expected lines can match the first j actual lines
    reach = [True] + [False] * len(actual)
    for pat in pats:
        nxt = [False] * (len(actual) + 1)
        for j in range(len(actual) + 1):
            if pat is None:
                nxt[j] = reach[j] or (j > 0 and nxt[j - 1])
            elif j > 0 and reach[j - 1] and pat.fullmatch(actual[j - 1]):
                nxt[j] = True
        reach = nxt
    return reach[len(actual)]


def _trim(lines: list[str]) -> list[str]:
    lines = list(lines)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def diff(expected: list[str], actual: list[str]) -> str:
    return "\n".join(difflib.unified_diff(expected, actual, "expected", "actual", lineterm=""))


# ---- running ---------------------------------------------------------------------------

def environment() -> dict:
    """The reader's shell: this Python first on PATH, output unbuffered as on a terminal."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "100"
    return env


@dataclass
class Outcome:
    step: Step
    ok: bool
    output: list[str]
    problem: str = ""


def run_step(step: Step, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    # A session of its own, so a timeout also ends what the command started in the background.
    proc = subprocess.Popen(["bash", "-c", step.command], cwd=ROOT, env=environment(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        raw, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raw, _ = proc.communicate()
        return Outcome(step, False, raw.decode(errors="replace").splitlines(),
                       f"timed out after {timeout:.0f} s")
    out = raw.decode(errors="replace").splitlines()
    if proc.returncode != 0:
        return Outcome(step, False, out, f"exit status {proc.returncode}")
    if not match_lines(step.expected, out):
        return Outcome(step, False, out, "output differs")
    return Outcome(step, True, out)


def report(lab: str, o: Outcome, max_lines: int = 80) -> str:
    """Where, what and how it differed; a long diff is cut to its first `max_lines` lines."""
    text = diff(o.step.expected, o.output) or "\n".join(o.output)
    lines = text.splitlines()
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"[{len(lines) - max_lines} more lines]"]
    return f"{lab}:{o.step.line}: {o.problem}\n  $ {o.step.command}\n" + "\n".join(lines)


def check_lab(path: Path, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Run every command of a lab in order; one report per failing command.
    Blocks marked `skip` are not run (see `skipped`)."""
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    failures = []
    blocks = [b for b in parse_lab(path.read_text()) if b.skip is None]
    i = 0
    while i < len(blocks):
        if blocks[i].terminal is None:
            for step in blocks[i].steps:
                o = run_step(step, timeout)
                if not o.ok:
                    failures.append(report(name, o))
            i += 1
            continue
        j = i
        while j < len(blocks) and blocks[j].terminal is not None:
            j += 1
        failures += [report(name, o) for o in run_session(blocks[i:j], timeout)]
        i = j
    return failures


def skipped(path: Path) -> list[tuple[int, str]]:
    """(line, reason) of every block of a lab marked `skip`."""
    return [(b.line, b.skip) for b in parse_lab(path.read_text()) if b.skip is not None]


# ---- several terminals at once -----------------------------------------------------------

def ready_lines(expected: list[str]) -> list[str] | None:
    """What a step in a terminal shows before the reader moves on: its lines up
    to the first `...`; None when it has none, i.e. the step must finish first."""
    for k, line in enumerate(expected):
        if line.strip() == ANY_LINES:
            return expected[:k]
    return None


class Running:
    """One command of a terminal block, running in the background; its output
    (stdout and stderr together) is collected line by line."""

    def __init__(self, step: Step):
        self.step = step
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(["bash", "-c", step.command], cwd=ROOT, env=environment(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_ready(self, timeout: float) -> str:
        """Wait until the step shows its ready lines or exits; "" when it did,
        else what went wrong."""
        ready = ready_lines(self.step.expected)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if ready is not None and len(self.lines) >= len(ready):
                    return "" if match_lines(ready, self.lines[:len(ready)]) else "output differs"
                if self._eof:
                    return ""
                left = deadline - time.monotonic()
                if left <= 0:
                    waited = "to exit" if ready is None else "for its lines before the first '...'"
                    return f"timed out after {timeout:.0f} s waiting {waited}"
                self._cond.wait(left)

    def finish(self, timeout: float, problem: str = "") -> Outcome:
        """Wait for the step to exit (kill it after `timeout`) and judge its output."""
        if problem:
            self.kill()
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            status, problem = None, problem or f"timed out after {timeout:.0f} s"
        with self._cond:
            self._cond.wait_for(lambda: self._eof, 5)
            out = list(self.lines)
        if not problem and status != 0:
            problem = f"exit status {status}"
        if not problem and not match_lines(self.step.expected, out):
            problem = "output differs"
        return Outcome(self.step, not problem, out, problem)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def run_session(blocks: list[Block], timeout: float = DEFAULT_TIMEOUT) -> list[Outcome]:
    """Run consecutive `terminal=N` blocks as a reader with N terminals would;
    returns the outcomes that failed."""
    last: dict[str, Running] = {}         # the latest command of each terminal
    done: list[Outcome] = []
    running: list[Running] = []
    problem = ""
    for block in blocks:
        for step in block.steps:
            before = last.get(block.terminal)
            if before is not None:             # one shell: the previous command ends first
                running.remove(before)
                done.append(before.finish(timeout))
            r = Running(step)
            running.append(r)
            last[block.terminal] = r
            problem = r.wait_ready(timeout)
            if problem:
                break
        if problem:
            break
    # The session is over: what still runs must end by itself (or the failing
    # step's problem ends it, and everything else with it).
    failing = running[-1] if problem else None
    for r in running:
        why = problem if r is failing else "stopped: a later step failed" if failing else ""
        done.append(r.finish(timeout, why))
    return [o for o in done if not o.ok]


def lab_files() -> list[Path]:
    """docs/labs/labN-*.md, by N."""
    return sorted(LABS.glob("lab*.md"), key=lambda p: (int(re.match(r"lab(\d*)", p.name).group(1) or 0),
                                                       p.name))


def host_kind() -> str:
    """The host's KVM kind (kvmlite.hostkind), to read a failure by."""
    try:
        from kvmlite import hostkind
    except ImportError:
        return "unknown (kvmlite is not importable from this Python)"
    return hostkind.describe()


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or lab_files()
    failed = 0
    print(f"KVM kind: {host_kind()}")
    for path in paths:
        failures = check_lab(path)
        failed += len(failures)
        for f in failures:
            print(f, end="\n\n")
        for line, reason in skipped(path):
            print(f"{path.name}:{line}: skipped: {reason}")
        print(f"{path.name}: {'ok' if not failures else f'{len(failures)} failing'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
