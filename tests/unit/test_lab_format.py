"""The labs' console-block convention (docs/labs/README.md): parsing and matching."""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lab_check", ROOT / "docs" / "labs" / "check.py")
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check      # dataclasses look their module up there
_spec.loader.exec_module(check)

LABS = check.lab_files()


def test_literal_lines_must_match_exactly():
    """Expected lines without wildcards match only the same lines, trailing spaces aside."""
    assert check.match_lines(["a", "b"], ["a  ", "b"])
    assert not check.match_lines(["a", "b"], ["a", "c"])
    assert not check.match_lines(["a"], ["a", "b"])          # extra output is a mismatch
    assert not check.match_lines(["a", "b"], ["a"])
    assert not check.match_lines(["x.y"], ["xzy"])           # regex characters are literal


def test_dots_line_matches_any_number_of_lines():
    """A line `...` matches zero or more lines, anywhere."""
    assert check.match_lines(["...", "end"], ["1", "2", "end"])
    assert check.match_lines(["start", "...", "end"], ["start", "end"])
    assert check.match_lines(["start", "..."], ["start", "x", "y"])
    assert check.match_lines(["...", "b", "...", "d"], ["a", "b", "c", "d"])
    assert not check.match_lines(["...", "b", "...", "d"], ["a", "c", "d"])
    assert not check.match_lines(["start", "...", "end"], ["start", "end", "after"])


def test_ellipsis_matches_any_text_within_a_line():
    """`…` matches any text in one line, but not across lines."""
    assert check.match_lines(["took … ms"], ["took 12.5 ms"])
    assert check.match_lines(["took … ms"], ["took  ms"])
    assert not check.match_lines(["took … ms"], ["took 12", "ms"])
    assert not check.match_lines(["took … ms"], ["it took 1 ms"])   # the rest stays anchored


def test_braces_hold_a_regular_expression():
    """`{{REGEX}}` matches what REGEX matches; the text around it stays literal."""
    assert check.match_lines(["free {{\\d+}} pages (x)"], ["free 3805 pages (x)"])
    assert not check.match_lines(["free {{\\d+}} pages (x)"], ["free many pages (x)"])
    assert check.match_lines(["{{[.#+]{4}}} ok"], ["#+.. ok"])
    assert not check.match_lines(["{{[.#+]{4}}} ok"], ["#+. ok"])


def test_console_blocks_are_split_into_commands_and_output():
    """`$ ` starts a command, a trailing backslash continues it, other lines are its output."""
    text = ("intro\n\n```console\n$ echo a \\\n> b\na b\n\n$ true\n```\n\n"
            "```python\nprint('not run')\n```\n")
    blocks = check.parse_lab(text)
    assert len(blocks) == 1
    first, second = blocks[0].steps
    assert first.command == "echo a b" and first.expected == ["a b"] and first.line == 4
    assert second.command == "true" and second.expected == [] and second.line == 8


def test_a_block_without_a_command_or_left_open_is_refused():
    """Output with no command before it, or an unclosed fence, is a format error."""
    with pytest.raises(check.LabFormatError, match="line 2"):
        check.parse_lab("```console\noutput\n```\n")
    with pytest.raises(check.LabFormatError, match="never closed"):
        check.parse_lab("```console\n$ true\n")


def test_fence_attributes_are_read_and_unknown_ones_refused():
    """`terminal=N` and `skip="..."` after `console`; anything else is a format error."""
    text = ('```console terminal=2\n$ true\n```\n\n'
            '```console skip="waits for the harness"\n$ false\n```\n')
    first, second = check.parse_lab(text)
    assert first.terminal == "2" and first.skip is None
    assert second.skip == "waits for the harness" and second.terminal is None
    with pytest.raises(check.LabFormatError, match="line 1"):
        check.parse_lab("```console termnal=2\n$ true\n```\n")


def write_lab(tmp_path, text):
    lab = tmp_path / "labX.md"
    lab.write_text(text)
    return lab


def test_a_skipped_block_is_not_run_but_listed(tmp_path):
    """A `skip` block's command does not run (here it would fail), and its reason is reported."""
    lab = write_lab(tmp_path, f'intro\n\n```console skip="not yet"\n$ touch {tmp_path}/ran; false\n```\n')
    assert check.check_lab(lab) == []
    assert not (tmp_path / "ran").exists()
    assert check.skipped(lab) == [(3, "not yet")]


def test_terminals_run_side_by_side_as_a_reader_would(tmp_path):
    """Terminal 1 keeps running after its first line; terminal 2 then runs, and
    what it does lets terminal 1 finish; both are checked at the end."""
    go = tmp_path / "go"
    lab = write_lab(tmp_path, (
        "```console terminal=1\n"
        f"$ echo waiting; until [ -e {go} ]; do sleep 0.02; done; echo released\n"
        "waiting\n...\nreleased\n```\n\n"
        "```console terminal=2\n"
        f"$ echo first; sleep 0.3; touch {go}\n"
        "first\n"
        "$ echo second\n"
        "second\n```\n"))
    assert check.check_lab(lab, timeout=10) == []


def test_a_terminal_step_that_never_shows_its_lines_fails_without_waiting_forever(tmp_path):
    """A background step whose first lines differ fails at once, and the session's
    other processes are ended."""
    lab = write_lab(tmp_path, (
        "```console terminal=1\n$ echo hello; sleep 30\nwelcome\n...\n```\n\n"
        "```console terminal=2\n$ sleep 30\n```\n"))
    t0 = time.monotonic()
    failures = check.check_lab(lab, timeout=20)
    assert time.monotonic() - t0 < 10
    assert len(failures) == 1 and "output differs" in failures[0] and "+hello" in failures[0]


def test_a_terminal_runs_one_command_at_a_time(tmp_path):
    """Two commands typed into one terminal: the second starts after the first exits,
    even if the first's shown output ends in `...`."""
    mark = tmp_path / "mark"
    lab = write_lab(tmp_path, (
        "```console terminal=1\n"
        f"$ echo start; sleep 0.3; echo done > {mark}\nstart\n...\n"
        f"$ cat {mark}\ndone\n```\n"))
    assert check.check_lab(lab, timeout=10) == []


def test_a_failure_report_names_the_lab_the_command_and_the_diff():
    """The report says where the command is, what it was, and how the output differed."""
    step = check.Step("echo hi", ["hello"], 7)
    text = check.report("docs/labs/labX.md", check.Outcome(step, False, ["hi"], "output differs"))
    assert text.startswith("docs/labs/labX.md:7: output differs")
    assert "$ echo hi" in text and "-hello" in text and "+hi" in text


def test_the_index_lists_every_lab_and_only_those():
    """docs/labs/README.md's table links each lab file, in order, and nothing else:
    a new lab joins the checks by being a docs/labs/labN-*.md in the index."""
    index = (ROOT / "docs" / "labs" / "README.md").read_text()
    listed = re.findall(r"^\| \[\d+\. [^\]]+\]\((lab[^)]+\.md)\)", index, re.M)
    assert listed == [p.name for p in LABS]
    assert [p.name.split("-")[0] for p in LABS][:5] == ["lab1", "lab2", "lab3", "lab4", "lab5"]


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.name)
def test_each_lab_has_its_sections_and_commands(lab):
    """Every lab has Goals, Background, Steps and Exercises (hints folded), and commands to check."""
    text = lab.read_text()
    heads = re.findall(r"^## (.+)$", text, re.M)
    for section in ("Goals", "Background", "Steps", "Exercises"):
        assert section in heads, f"{lab.name}: no '## {section}'"
    assert "<details>" in text, f"{lab.name}: exercises need hints in <details>"
    steps = [s for b in check.parse_lab(text) for s in b.steps]
    assert steps, f"{lab.name}: no console commands"


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.name)
def test_links_to_code_resolve(lab):
    """Every relative link points at a file that exists; a link named `name` or
    `Class.name` points at a file that defines it."""
    text = lab.read_text()
    for label, target in re.findall(r"\[([^\]]+)\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path = (lab.parent / target).resolve()
        assert path.exists(), f"{lab.name}: link to {target} which does not exist"
        m = re.fullmatch(r"`(?:[\w./-]+:)?([A-Za-z_][\w.]*)(?:\(\))?`", label)
        if m and path.suffix in (".py", ".c", ".S", ".h") and not m.group(1).endswith(path.suffix):
            name = m.group(1).split(".")[-1]
            body = path.read_text()
            assert re.search(rf"(def|class)\s+{name}\b|\b{name}\s*\(|^{name}:", body, re.M), \
                f"{lab.name}: {target} defines no {name}"


SHELLS = ("sh", "bash", "shell", "")


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.name)
def test_a_shell_block_that_is_not_run_says_why(lab):
    """A reader types what a lab shows.  Shell commands are `console` blocks,
    which the checker runs; any other shell block is an illustration and
    says so, and why, on its first line."""
    for info, line, body, _ in check.fenced_blocks(lab.read_text()):
        if info in SHELLS:
            assert body and body[0].startswith("# illustration: "), \
                f"{lab.name}:{line}: a ```{info} block is not run: make it ```console, or begin " \
                f"it with '# illustration: why it is not run'"


def test_every_lab_file_is_run_by_a_lab():
    """Code under docs/labs/code/ is run by some console block (a guest source by
    a script that is), so none of it can rot unseen."""
    code = ROOT / "docs" / "labs" / "code"
    commands = "\n".join(s.command for lab in LABS for b in check.parse_lab(lab.read_text())
                         for s in b.steps)
    scripts = [f for f in code.glob("*.py") if f.name in commands]
    for f in sorted(code.iterdir()):
        if f.suffix == ".py":
            assert f in scripts, f"docs/labs/code/{f.name} is not run by any lab"
        elif f.suffix == ".S":
            assert any(f.name in s.read_text() for s in scripts), \
                f"docs/labs/code/{f.name} is not built by any script a lab runs"
