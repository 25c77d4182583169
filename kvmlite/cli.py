"""The command line: `kvmlite run`, `info`, `migrate`, `pagemap`, `inspect`, `completion`.

The only module that sees argparse: it turns arguments into the frozen
configs of config.py (or keyword calls of tools/) and exit statuses
(exitcodes.py).  Options are never abbreviated (`--mem` is not `--memory`),
a mistyped subcommand or option gets a "did you mean", and `kvmlite
completion bash|zsh` prints a completion script made from this parser.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys

from typing import TYPE_CHECKING

from . import __version__, exitcodes
from .errors import KvmliteError

if TYPE_CHECKING:
    from .config import RunConfig

DEFAULT_MEMORY = "256M"

EPILOG_RUN = """\
addresses: --monitor unix:PATH (or PATH) or tcp:HOST:PORT; --gdb tcp:HOST:PORT;
--incoming tcp:HOST:PORT, unix:PATH, file:PATH or defer.  tcp:PORT and QEMU's tcp::PORT
mean 127.0.0.1.  --monitor also takes QEMU's ,server,wait=off.

exit status:
  0-63   the guest's status byte (exit device, port 0x501); 0 also when the guest
         halts, after the monitor's quit, and after migrating away (a guest byte
         above 63 exits 63)
  64     the command line cannot be parsed (unknown option, missing value)
  65     an incoming migration or snapshot was refused (the guest never ran here)
  66     the guest image cannot be read
  69     /dev/kvm cannot be used
  70     a bug in kvmlite (with a traceback)
  71     a KVM ioctl or another system call failed
  73     the monitor socket cannot be created (another VMM has it)
  75     a migration failed
  78     an option's value is wrong (a size, a key file, an address)
  125    the guest crashed (triple fault, failed entry, KVM internal error)
  130    SIGINT, 143 SIGTERM
(kvmlite/exitcodes.py; README.md, "Exit status")"""

EPILOG_CLIENT = """\
exit status: 0 done; 64 bad command line; 69 the monitor does not answer;
75 the migration failed or was cancelled, or the VM refused a command;
76 the handover is unresolved (--resolve), or a post-copy migration's link broke
(postcopy-paused: --resume); 78 a bad option value."""

EPILOG_POSTCOPY = """\
post-copy (--postcopy, --postcopy-after, --postcopy-now): the guest moves first
and its pages follow on demand; pages the guest's bitmap calls free are never
fetched.  After the switch the VM is split between the two VMMs: if either VMM
dies (killed, host lost), the VM is lost, as with QEMU's post-copy; the source
then refuses to resume a guest whose newer state it no longer has.  A broken
link loses nothing: both sides pause and keep their halves (postcopy-paused),
and `kvmlite migrate --monitor SOCKET URI --resume` reconnects and finishes
(docs/postcopy.md)."""


class HelpFormatter(argparse.HelpFormatter):
    """A description or epilog of one paragraph is wrapped; one with line
    breaks (a table) is kept as written.  Each option's default follows its
    help, when it has one worth showing."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text or default is None or isinstance(default, bool)
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with no abbreviations, "did you mean" on a typo, and exit
    status 64 (EX_USAGE) on a usage error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {suggest(self, message)}\n")

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            # reported by the subcommand that did not know them, with its usage
            sub = subparser(self, getattr(ns, "command", None)) or self
            sub.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def subparser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return None


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


def suggest(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's message, with "did you mean ...?" for a near miss."""
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(2))
        close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
        return message + (f"; did you mean '{close[0]}'?" if close else "")
    m = re.match(r"unrecognized arguments: (.*)", message)
    if m:
        hints = []
        for word in m.group(1).split():
            if word.startswith("-"):
                name = word.split("=", 1)[0]
                close = difflib.get_close_matches(name, option_strings(parser), n=1, cutoff=0.6)
                if close:
                    hints.append(f"'{close[0]}' for '{name}'")
        if hints:
            return message + "; did you mean " + ", ".join(hints) + "?"
    return message


def _parser() -> Parser:
    p = Parser(
        prog="kvmlite", description="A small KVM virtual machine monitor that live-migrates "
        "a running guest, sending only the pages the guest is using (free page hinting).",
        epilog="`kvmlite COMMAND --help` describes each command.")
    p.add_argument("--version", action="version", version=f"kvmlite {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more of the VMM's own messages")
    p.add_argument("-q", "--quiet", action="store_true", help="only the VMM's warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    run = sub.add_parser(
        "run", help="boot a guest image (or wait for an incoming migration)", epilog=EPILOG_RUN,
        description="Boot a guest image and run it until it exits, or wait for a VM to arrive "
        "by migration (--incoming).  The guest's serial output goes to stdout, kvmlite's own "
        "messages to stderr.  With --monitor the VMM serves QMP, QEMU's machine protocol "
        "(docs/monitor.md).")
    run.add_argument("image", nargs="?", help="flat binary or ELF64 guest image")
    run.add_argument("--smp", type=int, default=1, metavar="N",
                     help="vCPUs; N > 1 adds the in-kernel irqchip and the CPU-start device "
                     "(docs/boot.md)")
    run.add_argument("-m", "--memory", metavar="SIZE",
                     help=f"guest RAM, e.g. 256M or 1G (default {DEFAULT_MEMORY}; with --incoming: "
                     "the size the stream says, pre-faulted if given)")
    run.add_argument("--cmdline", default="", help="guest command line (see guest/README.md)")
    run.add_argument("--load", metavar="ADDR", help="load address of a flat image (default 0x100000)")
    run.add_argument("--entry", metavar="ADDR",
                     help="entry point (default: the load address, or an ELF image's e_entry)")
    run.add_argument("--dirty-ring", action=argparse.BooleanOptionalAction, default=None,
                     help="migrations track dirty pages with KVM's per-vCPU dirty rings instead of "
                     "the dirty bitmap (default: the bitmap; measured in docs/boot.md)")
    run.add_argument("--stats", action="store_true",
                     help="print page counts from the guest's free-page bitmap at exit")
    run.add_argument("--trace", action="store_true", help="log every VM exit to stderr")
    run.add_argument("--monitor", metavar="unix:PATH|tcp:HOST:PORT",
                     help="serve the QMP monitor there (qmp-shell, qemu.qmp, kvmlite migrate/inspect/"
                     "pagemap; default: none)")
    run.add_argument("--gdb", metavar="tcp:HOST:PORT",
                     help="wait for gdb (target remote HOST:PORT) before the guest's first instruction")
    run.add_argument("--incoming", metavar="tcp:[HOST:]PORT|unix:PATH|file:PATH|defer",
                     help="wait for a migration (on 127.0.0.1 unless HOST is given, or on a unix "
                     "socket for a source on this host), restore a snapshot file, or (defer) wait "
                     "for the monitor's migrate-incoming, instead of booting an image")
    run.add_argument("--insecure", action="store_true",
                     help="with --incoming on an address other than loopback: accept peers "
                     "without --auth-key or TLS")
    run.add_argument("--max-memory", metavar="SIZE",
                     help="with --incoming: the largest RAM a stream may ask for "
                     "(default: this host's memory less a quarter)")
    run.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                     help="migration in or out: give up after this long without progress")
    run.add_argument("--postmigrate-timeout", type=float, metavar="SECONDS",
                     help="after migrating the VM away, exit after this long even without the "
                     "monitor's quit (default: stay until quit, as QEMU does)")
    _security_options(run)
    run.add_argument("--prealloc", action="store_true",
                     help="pre-fault all guest RAM at start (the default for --incoming with --memory)")
    run.add_argument("--memory-backend", choices=("anon", "memfd"), default="anon",
                     help="guest RAM in private anonymous memory, or in a memfd (QEMU's "
                     "memory-backend-memfd), which `migrate --local` hands to a destination on this "
                     "host without copying a page")

    sub.add_parser("info", help="what /dev/kvm offers here",
                   description="What /dev/kvm offers on this host, like kvm-ok: the API version, "
                   "capabilities, CPUID leaves and the kind of KVM.")

    mig = sub.add_parser(
        "migrate", help="live-migrate a running VM to a destination, or save it to a file",
        epilog=EPILOG_POSTCOPY + "\n\n" + EPILOG_CLIENT,
        description="Live-migrate the VM whose QMP monitor is --monitor to a destination "
        "(kvmlite run --incoming) or into a snapshot file, following it with a progress bar, "
        "then print its figures (the final query-migrate) and quit the source, which the "
        "migration left in postmigrate.")
    mig.add_argument("--monitor", required=True, metavar="PATH|unix:PATH|tcp:HOST:PORT",
                     help="the source VM's monitor")
    mig.add_argument("uri", nargs="?", metavar="tcp:HOST:PORT|unix:PATH|file:PATH",
                     help="destination (kvmlite run --incoming), or a snapshot file to write")
    mig.add_argument("--no-free-page-hint", dest="hint", action="store_false",
                     help="send free pages too (baseline; zero pages are still detected)")
    mig.add_argument("--stop-copy", action="store_true",
                     help="stop the VM, then copy it in one pass (QEMU's stop + migrate)")
    mig.add_argument("--downtime-ms", type=int, default=5, metavar="MS",
                     help="downtime limit: the last pass must be predicted to fit it")
    mig.add_argument("--bandwidth", default="0", metavar="SIZE",
                     help="bandwidth limit per second, e.g. 100M; 0: none")
    mig.add_argument("--max-rounds", type=int, default=30, metavar="N",
                     help="pre-copy rounds before the last pass is forced")
    mig.add_argument("--json", action="store_true", help="print the final query-migrate as JSON")
    mig.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="give up after this long without progress (default: the VM's --timeout)")
    mig.add_argument("--auth-key", metavar="FILE",
                     help="shared key to prove to the destination (default: the VM's own --auth-key)")
    mig.add_argument("--keep-running", action="store_true",
                     help="with file:PATH: save a snapshot and let the VM carry on here")
    mig.add_argument("--channels", type=int, default=1, metavar="N",
                     help="tcp: spread the pages over N connections, each sent from its own thread "
                     "(QEMU's multifd capability and multifd-channels; 1 to 8; 1 under TLS)")
    mig.add_argument("--local", action="store_true",
                     help="with unix:PATH: hand the guest's RAM (--memory-backend memfd) to a "
                     "destination on this host instead of copying it; it gives the free pages' "
                     "memory back to the host (the x-local capability)")
    mig.add_argument("--pagemap", metavar="FILE.png",
                     help="when it ends, draw which round sent each page into this PNG")
    mig.add_argument("--no-quit", dest="quit", action="store_false",
                     help="leave the source VMM in postmigrate (QEMU's way) instead of quitting it")
    mig.add_argument("--postcopy", action="store_true",
                     help="switch to post-copy when pre-copy stops converging (or at max-rounds): "
                     "the guest moves, its pages follow")
    mig.add_argument("--postcopy-after", type=int, metavar="N",
                     help="switch to post-copy after N pre-copy rounds (implies --postcopy)")
    mig.add_argument("--postcopy-now", action="store_true",
                     help="switch to post-copy at once, with no pre-copy round (implies --postcopy)")
    mig.add_argument("--resume", action="store_true",
                     help="reconnect a post-copy migration whose link broke (postcopy-paused) to URI, "
                     "and finish it")
    mig.add_argument("--resolve", choices=("source", "destination"),
                     help="settle a migration left unresolved (the destination's answer to COMMIT "
                     "was lost): where the VM runs now; 'source' resumes it here")

    pm = sub.add_parser(
        "pagemap", help="draw guest memory as a grid, one cell per page", epilog=EPILOG_CLIENT,
        description="Draw a running VM's memory (over its monitor) or a saved migration stream "
        "as a grid, one cell per page: never touched, free, active, dirty; or by the round that "
        "sent each page.")
    pm.add_argument("source", nargs="?", metavar="file:STREAM",
                    help="a migration stream saved to a file, instead of --monitor")
    pm.add_argument("--monitor", metavar="PATH|unix:PATH|tcp:HOST:PORT", help="a running VM's monitor")
    pm.add_argument("--png", metavar="OUT.png", help="write a PNG instead of drawing on the terminal")
    pm.add_argument("--width", type=int, metavar="N",
                    help="cells per row (default 64 on the terminal, 256 in a PNG)")
    pm.add_argument("--sent-rounds", action="store_true",
                    help="colour pages by the migration round that sent them")

    ins = sub.add_parser(
        "inspect", help="registers, exit counts and page counts of a running VM", epilog=EPILOG_CLIENT,
        description="A running VM's registers (read with its vCPUs parked for the moment, a "
        "stopped VM left stopped), VM exits by kind and the free-page bitmap's counts, over its "
        "monitor.")
    ins.add_argument("--monitor", required=True, metavar="PATH|unix:PATH|tcp:HOST:PORT",
                     help="the VM's monitor")
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")

    comp = sub.add_parser(
        "completion", help="print a shell completion script",
        description="Print a completion script for bash or zsh, made from this command line.  "
        "bash: source <(kvmlite completion bash).  zsh: kvmlite completion zsh > "
        "\"${fpath[1]}/_kvmlite\", then restart zsh.")
    comp.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    return p


def _security_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--auth-key", metavar="FILE",
                   help="shared key (16+ bytes) both VMMs must hold: an incoming migration is "
                   "accepted only from a peer that proves it has the key, and outgoing ones go "
                   "only to such a peer")
    p.add_argument("--tls-cert", metavar="FILE", help="this VMM's TLS certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="CA certificate that signed the peer's (TLS is mutual: both sides check)")


def run_config(args: argparse.Namespace) -> RunConfig:
    """`kvmlite run`'s arguments as a validated RunConfig (ConfigError on a bad one)."""
    from .config import DEFER, BootConfig, Credentials, IncomingConfig, MachineConfig, RunConfig
    from .endpoints import parse_endpoint
    from .errors import ConfigError
    from .units import parse_addr, parse_size
    # one parser for every address, with QEMU's spellings (endpoints.py)
    if args.monitor:
        parse_endpoint(args.monitor, what="--monitor", kinds=("unix", "tcp"), bare_path=True,
                       chardev_options=True, port_zero=True)
    if args.gdb:
        parse_endpoint(args.gdb, what="--gdb", kinds=("tcp",))
    if args.incoming and args.incoming != DEFER:
        parse_endpoint(args.incoming, what="--incoming", kinds=("tcp", "unix", "file"))
    memory = parse_size(args.memory) if args.memory else None
    if memory is None and not args.incoming:
        memory = parse_size(DEFAULT_MEMORY)
    machine = MachineConfig(memory=memory, vcpus=args.smp, prefault=args.prealloc, trace=args.trace,
                            memory_backend=args.memory_backend,
                            **({} if args.dirty_ring is None else {"dirty_ring": args.dirty_ring}))
    creds = Credentials.load(args.auth_key, args.tls_cert, args.tls_key, args.tls_ca)
    boot = incoming = None
    if args.incoming:
        if args.image:
            raise ConfigError("give either an image or --incoming, not both")
        incoming = IncomingConfig(
            args.incoming, timeout=args.timeout, insecure=args.insecure,
            max_memory=parse_size(args.max_memory, "--max-memory") if args.max_memory else None)
    elif args.image:
        boot = BootConfig(args.image, args.cmdline,
                          parse_addr(args.load, "--load") if args.load else None,
                          parse_addr(args.entry, "--entry") if args.entry else None)
    return RunConfig(machine=machine, boot=boot, incoming=incoming, monitor=args.monitor,
                     gdb=args.gdb, stats=args.stats, creds=creds, timeout=args.timeout,
                     postmigrate_timeout=args.postmigrate_timeout)


# ---- shell completion, generated from the parser ---------------------------------------------

# What an option's value completes to, by its metavar: files, or fixed words.
_FILE_METAVARS = ("FILE", "FILE.png", "OUT.png")
_VALUE_WORDS = {"tcp:[HOST:]PORT|unix:PATH|file:PATH|defer": ("tcp:127.0.0.1:", "unix:", "file:", "defer"),
                "tcp:HOST:PORT|unix:PATH|file:PATH": ("tcp:127.0.0.1:", "unix:", "file:"),
                "unix:PATH|tcp:HOST:PORT": ("unix:", "tcp:127.0.0.1:"),
                "tcp:HOST:PORT": ("tcp:127.0.0.1:",),
                "file:STREAM": ("file:",)}


def _completion_model(parser: argparse.ArgumentParser) -> dict:
    """{"": top level, COMMAND: ...}: each {"options": [...], "values": {option: kind},
    "positional": kind, "help": text}, where a kind is "file", ("words", ...) or None."""
    def kind(action: argparse.Action):
        if action.choices:
            return ("words",) + tuple(action.choices)
        meta = action.metavar or ""
        if meta in _FILE_METAVARS or (not meta and action.dest == "image"):
            return "file"
        if meta.startswith("PATH"):
            return "file"
        if meta in _VALUE_WORDS:
            return ("words",) + _VALUE_WORDS[meta]
        return None

    def describe(p: argparse.ArgumentParser, text: str) -> dict:
        d: dict = {"options": [], "values": {}, "positional": None, "help": text, "flags": []}
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            if a.option_strings:
                d["options"] += a.option_strings
                d["flags"].append((a.option_strings, a.help or "", a.nargs != 0, kind(a)))
                if a.nargs != 0:
                    for s in a.option_strings:
                        d["values"][s] = kind(a)
            elif d["positional"] is None:
                d["positional"] = kind(a) if kind(a) is not None else ("file" if a.dest == "image" else None)
        return d

    model = {"": describe(parser, parser.description or "")}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                model[name] = describe(sub, helps.get(name) or "")
    return model


def _bash_words(kind) -> str:
    if kind == "file":
        return 'COMPREPLY=( $(compgen -f -- "$cur") ); compopt -o filenames 2>/dev/null'
    if isinstance(kind, tuple):
        words = " ".join(kind[1:])
        return f'compopt -o nospace 2>/dev/null; COMPREPLY=( $(compgen -W "{words}" -- "$cur") )' \
            if any(w.endswith(":") for w in kind[1:]) else f'COMPREPLY=( $(compgen -W "{words}" -- "$cur") )'
    return "COMPREPLY=()"


def bash_script(parser: argparse.ArgumentParser) -> str:
    model = _completion_model(parser)
    commands = [c for c in model if c]
    lines = ["# bash completion for kvmlite, made by `kvmlite completion bash`.",
             "# Use: source <(kvmlite completion bash)",
             "_kvmlite() {",
             '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
             '    local cmd="" i',
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             '        case "${COMP_WORDS[i]}" in',
             f'            {"|".join(commands)}) cmd="${{COMP_WORDS[i]}}"; break ;;',
             "        esac",
             "    done",
             '    case "$cmd" in']
    for name, d in model.items():
        lines.append(f'    "{name}")')
        if d["values"]:
            lines.append('        case "$prev" in')
            for opt, k in d["values"].items():
                lines.append(f"            {opt}) {_bash_words(k)}; return ;;")
            lines.append("        esac")
        options = " ".join(d["options"])
        rest = _bash_words(("words",) + tuple(commands)) if not name else _bash_words(d["positional"])
        lines.append('        if [[ "$cur" == -* ]]; then')
        lines.append(f'            COMPREPLY=( $(compgen -W "{options}" -- "$cur") )')
        lines.append("        else")
        lines.append(f"            {rest}")
        lines.append("        fi ;;")
    lines += ["    esac", "}", "complete -F _kvmlite kvmlite", ""]
    return "\n".join(lines)


def _zsh_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]") \
        .replace(":", "\\:")


def _zsh_action(kind) -> str:
    if kind == "file":
        return "_files"
    if isinstance(kind, tuple):
        return "(" + " ".join(kind[1:]) + ")"
    return " "


def zsh_script(parser: argparse.ArgumentParser) -> str:
    model = _completion_model(parser)
    lines = ["#compdef kvmlite", "# zsh completion for kvmlite, made by `kvmlite completion zsh`.",
             '# Use: kvmlite completion zsh > "${fpath[1]}/_kvmlite", then start a new zsh.', "",
             "_kvmlite() {", "    local curcontext=\"$curcontext\" state line", "    typeset -A opt_args",
             "    local -a commands", "    commands=("]
    for name, d in model.items():
        if name:
            lines.append(f"        '{name}:{_zsh_quote(d['help'])}'")
    lines.append("    )")

    def specs(d: dict) -> list[str]:
        out = []
        for opts, help_, takes, k in d["flags"]:
            help_ = _zsh_quote(re.split(r" \(|; |: ", help_)[0][:70])
            value = f":{_zsh_quote(opts[-1].lstrip('-'))}:{_zsh_action(k)}" if takes else ""
            if len(opts) > 1:
                out.append(f"'({' '.join(opts)})'{{{','.join(opts)}}}'[{help_}]{value}'")
            else:
                out.append(f"'{opts[0]}[{help_}]{value}'")
        return out

    lines.append("    _arguments -C \\")
    for s in specs(model[""]):
        lines.append(f"        {s} \\")
    lines += ["        '1: :->command' \\", "        '*:: :->args'",
              "    case $state in", "        command) _describe 'kvmlite command' commands ;;",
              "        args)", "            case $words[1] in"]
    for name, d in model.items():
        if not name:
            continue
        pos = d["positional"]
        args = specs(d) + ([f"'1::argument:{_zsh_action(pos)}'"] if pos else [])
        lines.append(f"                {name})")
        lines.append("                    _arguments \\\n                        "
                     + " \\\n                        ".join(args))
        lines.append("                    ;;")
    lines += ["            esac ;;", "    esac", "}", "", '_kvmlite "$@"', ""]
    return "\n".join(lines)


def completion_script(shell: str) -> str:
    """The completion script for `shell` ("bash" or "zsh")."""
    parser = _parser()
    return bash_script(parser) if shell == "bash" else zsh_script(parser)


class Terminated(KeyboardInterrupt):
    """SIGTERM: ends a run as SIGINT does (the monitor says SHUTDOWN host-signal)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv=None, *, hooks=None, migration_class=None) -> int:
    """The command line; returns the exit status (kvmlite/exitcodes.py).  `hooks`
    and `migration_class` are injected by the test harness (tests/harness.py);
    users never pass them."""
    args = _parser().parse_args(argv)
    from . import log
    log.setup(-1 if args.quiet else args.verbose)
    try:
        if args.command == "run":
            from . import runner
            from .hooks import NO_HOOKS
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
            return runner.run(run_config(args), hooks=hooks or NO_HOOKS,
                              migration_class=migration_class)
        if args.command == "info":
            from .tools.info import info_command
            return info_command()
        if args.command == "migrate":
            from .tools.migrate import migrate_command
            return migrate_command(
                monitor=args.monitor, uri=args.uri, hint=args.hint, stop_copy=args.stop_copy,
                downtime_ms=args.downtime_ms, bandwidth=args.bandwidth, max_rounds=args.max_rounds,
                as_json=args.json, timeout=args.timeout, auth_key=args.auth_key,
                keep_running=args.keep_running, pagemap=args.pagemap, resolve=args.resolve,
                quit=args.quit,
                postcopy=args.postcopy or args.postcopy_now or args.postcopy_after is not None,
                postcopy_after=args.postcopy_after or 0, postcopy_now=args.postcopy_now,
                resume=args.resume, channels=args.channels, local=args.local)
        if args.command == "pagemap":
            from .tools.pagemap import pagemap_command
            return pagemap_command(source=args.source, monitor=args.monitor, png=args.png,
                                   width=args.width, sent_rounds=args.sent_rounds)
        if args.command == "inspect":
            from .tools.inspect import inspect_command
            return inspect_command(monitor=args.monitor, as_json=args.json)
        if args.command == "completion":
            sys.stdout.write(completion_script(args.shell))
            return exitcodes.OK
    except KvmliteError as e:
        print(f"kvmlite: error: {e}", file=sys.stderr)
        return exitcodes.of_error(e)
    except Terminated:
        print("kvmlite: terminated", file=sys.stderr)
        return exitcodes.SIGTERM
    except KeyboardInterrupt:
        print("kvmlite: interrupted", file=sys.stderr)
        return exitcodes.SIGINT
    except BrokenPipeError:
        # stdout went away (`kvmlite migrate ... | head`): not worth a traceback
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return exitcodes.SIGPIPE
    return exitcodes.USAGE


def entry() -> None:
    """The `kvmlite` program: main(), and a bug in kvmlite exits 70 (EX_SOFTWARE)
    with its traceback rather than Python's 1, which a guest's status may be."""
    try:
        status = main()
    except SystemExit:
        raise
    except BaseException:
        import traceback
        traceback.print_exc()
        print("kvmlite: internal error (a bug: please report the traceback above)", file=sys.stderr)
        status = exitcodes.SOFTWARE
    sys.exit(status)
