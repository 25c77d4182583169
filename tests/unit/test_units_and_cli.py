"""Sizes and addresses on the command line, and `kvmlite run`'s errors before any VM exists.

Every CLI test replaces kvmlite.machine.Machine with a tripwire and guards
os.open, so a check that moved after the point where /dev/kvm is opened fails
here instead of touching KVM.
"""

from __future__ import annotations


import pytest

from kvmlite import cli, exitcodes
from kvmlite.errors import ConfigError
from kvmlite.units import human_bytes, parse_addr, parse_size


@pytest.fixture(autouse=True)
def no_machine(monkeypatch):
    """Fail any test that builds a Machine (tests/unit/conftest.py already guards /dev/kvm)."""
    import kvmlite.machine

    class Tripwire:
        def __init__(self, *args, **kwargs):
            raise AssertionError("kvmlite would create a Machine (open /dev/kvm) here")
    monkeypatch.setattr(kvmlite.machine, "Machine", Tripwire)


# ---- parse_size / parse_addr ------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("256M", 256 << 20), ("1G", 1 << 30), ("1GiB", 1 << 30), ("1gib", 1 << 30), ("4096", 4096),
    ("64K", 64 << 10), ("2T", 2 << 40), ("512MB", 512 << 20), (" 8M ", 8 << 20), ("0", 0),
    ("3 G", 3 << 30), (4096, 4096),
])
def test_parse_size_accepts(text, value):
    """Sizes with an optional K/M/G/T suffix (binary units, 'iB'/'B' optional, any case) parse to bytes."""
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["banana", "", "M", "-1M", "1.5G", "1X", "1 MiBs", "0x100", "1e9",
                                  "1KM", "G1"])
def test_parse_size_refuses_with_option_named(text):
    """A malformed size raises ConfigError naming the option and the bad value."""
    with pytest.raises(ConfigError) as e:
        parse_size(text, "--memory")
    assert str(e.value).startswith("--memory ") and repr(text) in str(e.value)
    with pytest.raises(ConfigError, match="^--bandwidth "):
        parse_size(text, "--bandwidth")


@pytest.mark.parametrize("text,value", [("0x100000", 0x100000), ("1048576", 1 << 20), ("0o10", 8),
                                        ("0", 0)])
def test_parse_addr_accepts(text, value):
    """Addresses in decimal or with a 0x/0o prefix parse to integers."""
    assert parse_addr(text, "--load") == value


@pytest.mark.parametrize("text", ["zz", "", "0x", "1M", "-0x10", "-1"])
def test_parse_addr_refuses_with_option_named(text):
    """Malformed or negative addresses raise ConfigError naming the option."""
    with pytest.raises(ConfigError, match="^--entry "):
        parse_addr(text, "--entry")


def test_human_bytes():
    """human_bytes prints bytes exactly and larger sizes in binary units with one decimal."""
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(256 << 20) == "256.0 MiB"
    assert human_bytes(3 << 40) == "3.0 TiB"


# ---- kvmlite run: errors --------------------------------------------------------------------

@pytest.fixture
def image(tmp_path):
    """A non-empty flat guest image (never run)."""
    p = tmp_path / "guest.bin"
    p.write_bytes(b"\xf4")          # HLT
    return str(p)


def run_cli(capsys, *argv) -> tuple[int, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    assert captured.out == ""
    return status, captured.err


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got {err!r}"
    assert err.startswith("kvmlite: error: ")
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def test_missing_image_is_one_line_error(capsys, tmp_path):
    """`kvmlite run missing.bin` exits 66 (EX_NOINPUT) with one 'kvmlite: error: ...: no such file'
    line, before /dev/kvm."""
    missing = str(tmp_path / "nope" / "guest.bin")
    status, err = run_cli(capsys, "run", missing)
    assert status == exitcodes.NOINPUT
    assert_one_line_error(err, missing, ": no such file")


def test_image_is_directory(capsys, tmp_path):
    """A directory given as the image is reported as such."""
    status, err = run_cli(capsys, "run", str(tmp_path))
    assert status == exitcodes.NOINPUT
    assert_one_line_error(err, "is a directory")


def test_empty_image(capsys, tmp_path):
    """An empty image file is reported as empty."""
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    status, err = run_cli(capsys, "run", str(p))
    assert status == exitcodes.NOINPUT
    assert_one_line_error(err, "empty")


@pytest.mark.parametrize("memory,needle", [
    ("banana", "--memory 'banana': expected a size like 256M"),
    ("1M", "at least 2 MiB"),
    ("0", "at least 2 MiB"),
    ("100G", "at most 64 GiB"),
    ("4097K", "multiple of 2 MiB"),
    ("3000000", "multiple of 2 MiB"),
])
def test_bad_memory_is_one_line_error(capsys, image, memory, needle):
    """A bad --memory exits 78 (EX_CONFIG) with one clear line naming the option, before /dev/kvm is opened."""
    status, err = run_cli(capsys, "run", "--memory", memory, image)
    assert status == exitcodes.CONFIG
    assert_one_line_error(err, needle)


def test_bad_memory_reported_even_when_image_is_missing(capsys, tmp_path):
    """With both a bad --memory and a missing image, the run still fails cleanly with one line."""
    status, err = run_cli(capsys, "run", "-m", "banana", str(tmp_path / "missing.bin"))
    assert status == exitcodes.CONFIG
    assert_one_line_error(err)


@pytest.mark.parametrize("opt", ["--load", "--entry"])
def test_bad_address_is_one_line_error(capsys, image, opt):
    """A malformed --load or --entry exits 78 with one line naming the option."""
    status, err = run_cli(capsys, "run", opt, "nowhere", image)
    assert status == exitcodes.CONFIG
    assert_one_line_error(err, f"{opt} 'nowhere'")


def test_no_image_given(capsys):
    """`kvmlite run` without an image or --incoming exits 78 and says what to give."""
    status, err = run_cli(capsys, "run")
    assert status == exitcodes.CONFIG
    assert_one_line_error(err, "no guest image given")


def test_image_and_incoming_together(capsys, image):
    """An image together with --incoming is refused."""
    status, err = run_cli(capsys, "run", "--incoming", "tcp:127.0.0.1:1", image)
    assert status == exitcodes.CONFIG
    assert_one_line_error(err, "either an image or --incoming")


def test_valid_arguments_reach_the_machine(image):
    """With a good image and --memory the next step is creating the Machine (the tripwire proves the order)."""
    with pytest.raises(AssertionError, match="create a Machine"):
        cli.main(["run", "--memory", "4M", image])


def test_unknown_subcommand_is_usage_error(capsys):
    """Usage errors exit 64 (EX_USAGE) with a usage line, not a traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(["fly"])
    assert e.value.code == exitcodes.USAGE
    err = capsys.readouterr().err
    assert "usage: kvmlite" in err and "Traceback" not in err


# ---- the command line: typos, help, completion, addresses -------------------------------------


@pytest.mark.parametrize("argv,hint", [
    (["rnu", "guest.bin"], "invalid choice: 'rnu'"),
    (["migrte"], "did you mean 'migrate'?"),
    (["run", "--monitr", "x.sock"], "did you mean '--monitor' for '--monitr'?"),
    (["migrate", "--monitor", "m", "--stopcopy"], "did you mean '--stop-copy' for '--stopcopy'?"),
    (["migrate", "--monitor", "m", "--resolve", "destinaton"], "did you mean 'destination'?"),
    (["run", "--mem", "16M", "g.bin"], "unrecognized arguments: --mem"),      # never abbreviated
])
def test_mistyped_commands_and_options_get_a_suggestion(capsys, argv, hint):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == exitcodes.USAGE
    err = capsys.readouterr().err
    assert hint in err and "usage: kvmlite" in err, err


def test_options_are_never_abbreviated(capsys):
    """`--mem` is not `--memory`: a prefix that would match is an error (allow_abbrev=False)."""
    with pytest.raises(SystemExit):
        cli.main(["run", "--mem", "16M", "g.bin"])
    assert "did you mean '--memory'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "info", "migrate", "pagemap", "inspect", "completion"])
def test_every_command_has_a_description_and_shows_its_defaults(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    usage, _, rest = out.partition("\n\n")
    description = rest.partition("\n\n")[0]
    assert usage.startswith(f"usage: kvmlite {command}") and len(description) > 40, out
    if command == "migrate":
        assert "downtime limit: the last pass must be predicted to fit it (default: 5)" in " ".join(out.split())
        assert "(default: True)" not in out and "(default: None)" not in out


def test_run_help_documents_every_exit_status_kvmlite_uses(capsys):
    """The exit statuses in `kvmlite run --help` are exitcodes.py's, and the guest's range ends below them."""
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    documented = {int(n) for n in __import__("re").findall(r"^  (\d+) ", out, __import__("re").M)}
    ours = {exitcodes.USAGE, exitcodes.DATAERR, exitcodes.NOINPUT, exitcodes.UNAVAILABLE,
            exitcodes.SOFTWARE, exitcodes.OSERR, exitcodes.CANTCREAT, exitcodes.TEMPFAIL,
            exitcodes.CONFIG, exitcodes.CRASH, exitcodes.SIGINT}
    assert ours <= documented, ours - documented
    assert "0-63" in out and min(ours) > exitcodes.GUEST_MAX
    assert exitcodes.guest_status(42) == 42 and exitcodes.guest_status(200) == exitcodes.GUEST_MAX


@pytest.mark.parametrize("error,status", [
    ("StreamError", exitcodes.DATAERR), ("MigrationError", exitcodes.TEMPFAIL),
    ("ConfigError", exitcodes.CONFIG), ("ImageError", exitcodes.NOINPUT),
    ("KvmUnavailable", exitcodes.UNAVAILABLE), ("KvmliteError", exitcodes.SOFTWARE),
])
def test_each_kind_of_error_has_its_own_status(error, status):
    from kvmlite import errors
    assert exitcodes.of_error(getattr(errors, error)("x")) == status
    from kvmlite.control.client import QmpClientError, QmpCommandError
    assert exitcodes.of_error(QmpClientError("x")) == exitcodes.UNAVAILABLE
    assert exitcodes.of_error(QmpCommandError("stop", "GenericError", "x")) == exitcodes.TEMPFAIL


@pytest.mark.parametrize("option,value,needle", [
    ("--monitor", "tcp:127.0.0.1:http", "--monitor 'tcp:127.0.0.1:http': expected tcp:HOST:PORT"),
    ("--monitor", "unix:/x,reconnect=1", "option 'reconnect=1' is not supported"),
    ("--gdb", "unix:/tmp/g", "--gdb 'unix:/tmp/g': unix: is not accepted here"),
    ("--incoming", "udp:1", "--incoming 'udp:1': expected tcp:HOST:PORT or unix:PATH or file:PATH"),
])
def test_addresses_are_checked_by_one_parser(capsys, image, option, value, needle):
    status, err = run_cli(capsys, "run", option, value, *([] if option == "--incoming" else [image]))
    assert status == exitcodes.CONFIG
    assert_one_line_error(err, needle)


@pytest.mark.parametrize("argv", [["--monitor", "tcp::4444"], ["--monitor", "unix:/tmp/m.sock,server,wait=off"],
                                  ["--monitor", "/tmp/m.sock"], ["--gdb", "tcp::1234"]])
def test_qemu_spellings_of_addresses_are_accepted(argv, image):
    args = cli._parser().parse_args(["run", image, *argv])
    cfg = cli.run_config(args)
    assert (cfg.monitor or cfg.gdb) == argv[1]


def test_incoming_defer_needs_the_monitor(capsys):
    status, err = run_cli(capsys, "run", "--incoming", "defer")
    assert status == exitcodes.CONFIG
    assert_one_line_error(err, "--incoming defer waits for the monitor's migrate-incoming")


def _complete(script: str, words: list[str]) -> list[str]:
    """What bash completes after `words` (the last one being typed), with the script sourced."""
    import shlex
    import subprocess
    line = " ".join(shlex.quote(w) for w in words)
    prog = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _kvmlite; "
            'printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completion_is_made_from_the_parser(capsys, tmp_path):
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert _complete(script, ["kvmlite", "mi"]) == ["migrate"]
    assert set(_complete(script, ["kvmlite", ""])) == {"run", "info", "migrate", "pagemap", "inspect",
                                                       "completion"}
    assert "--postmigrate-timeout" in _complete(script, ["kvmlite", "run", "--post"])
    assert _complete(script, ["kvmlite", "migrate", "--resolve", "d"]) == ["destination"]
    assert _complete(script, ["kvmlite", "run", "--incoming", "d"]) == ["defer"]
    assert _complete(script, ["kvmlite", "completion", "z"]) == ["zsh"]
    (tmp_path / "guest-image.bin").write_bytes(b"\xf4")
    assert _complete(script, ["kvmlite", "run", str(tmp_path / "guest-i")]) == \
        [str(tmp_path / "guest-image.bin")]


def test_zsh_completion_is_made_from_the_parser(capsys):
    import shutil
    import subprocess
    assert cli.main(["completion", "zsh"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#compdef kvmlite")
    assert "'migrate:live-migrate a running VM" in script and "(source destination)" in script
    assert "--postmigrate-timeout[" in script
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed: the script's syntax was not checked by zsh")
    r = subprocess.run(["zsh", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("flags,ring,vcpus", [((), False, 1), (("--dirty-ring",), True, 1),
                                              (("--no-dirty-ring", "--smp", "2"), False, 2)])
def test_smp_and_dirty_ring_reach_the_machine_config(image, flags, ring, vcpus):
    """--smp N and --dirty-ring become MachineConfig fields; the bitmap log is the default."""
    args = cli._parser().parse_args(["run", image, *flags])
    cfg = cli.run_config(args)
    assert cfg.machine.dirty_ring is ring and cfg.machine.vcpus == vcpus
