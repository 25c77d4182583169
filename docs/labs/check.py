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


class LabFormatError(ValueError):
    pass


_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^`\s]*)")


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info string, line of the opening fence, body lines) of every fenced block."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2), i + 1
        body = []
        i += 1
        while i < len(lines) and not (lines[i].startswith(fence[0] * len(fence))
                                      and not lines[i].strip(fence[0]).strip()):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise LabFormatError(f"line {start}: the ``` block is never closed")
        out.append((info, start, body))
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
    for info, line, body in fenced_blocks(text):
        if info == "console":
            blocks.append(Block(info, line, parse_console(body, line + 1)))
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
    """Run every command of a lab in order; one report per failing command."""
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    failures = []
    for block in parse_lab(path.read_text()):
        for step in block.steps:
            o = run_step(step, timeout)
            if not o.ok:
                failures.append(report(name, o))
    return failures


def lab_files() -> list[Path]:
    return sorted(LABS.glob("lab*.md"))


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or lab_files()
    failed = 0
    for path in paths:
        failures = check_lab(path)
        failed += len(failures)
        for f in failures:
            print(f, end="\n\n")
        print(f"{path.name}: {'ok' if not failures else f'{len(failures)} failing'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
