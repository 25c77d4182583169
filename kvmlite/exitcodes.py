"""Exit statuses of `kvmlite`: the guest's own, kept apart from kvmlite's.

A script running `kvmlite run` can tell what ended it from the status alone:

    0-63    the guest's status byte, written to the exit device (port 0x501);
            0 also when the guest halts, after `quit`, and after migrating away.
            A guest byte above 63 exits as 63 (stderr names the byte): the
            statuses above are kvmlite's.
    64-78   kvmlite could not do what was asked, named as in BSD's sysexits.h:
            64 usage        the command line is wrong (unknown option, missing argument)
            65 dataerr      an incoming migration stream or snapshot was refused
                            (malformed, truncated, tampered with): the guest never ran here
            66 noinput      a file named on the command line cannot be read (guest image)
            69 unavailable  /dev/kvm cannot be used, or the monitor does not answer
            70 software     a bug in kvmlite (it prints a traceback)
            71 oserr        a KVM ioctl or another system call failed
            73 cantcreat    the monitor's socket cannot be created (another VMM has it),
                            or an output file cannot be written
            75 tempfail     a migration failed or was cancelled (the VM runs on at the
                            source), or the monitor refused a command; try again
            76 protocol     a migration's handover is unresolved: an operator decides
                            (`kvmlite migrate --resolve`); or a post-copy migration's
                            link broke (postcopy-paused): `kvmlite migrate --resume`
            78 config       an option's value is wrong (a size, a key file, an address)
    125     the guest crashed (triple fault, failed VM entry, KVM internal error):
            the crash report is on stderr
    130     interrupted (SIGINT); 143 terminated (SIGTERM); 141 stdout closed (SIGPIPE):
            128 + the signal, as shells report it

`kvmlite migrate`, `inspect` and `pagemap` use the same codes (0 on success).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .machine import RunResult

OK = 0
GUEST_MAX = 63
USAGE = 64
DATAERR = 65
NOINPUT = 66
UNAVAILABLE = 69
SOFTWARE = 70
OSERR = 71
CANTCREAT = 73
TEMPFAIL = 75
PROTOCOL = 76
CONFIG = 78
CRASH = 125
SIGINT = 130
SIGPIPE = 141
SIGTERM = 143


def guest_status(byte: int) -> int:
    """The exit status for a guest status byte: itself, up to GUEST_MAX."""
    return min(byte, GUEST_MAX)


def of_result(result: RunResult) -> int:
    """The exit status of a finished run (a machine.RunResult)."""
    if result.reason == "exit":
        return guest_status(result.status)
    if result.reason == "crash":
        return CRASH
    return result.status


def of_error(error: BaseException) -> int:
    """The exit status for an error kvmlite reports as one line."""
    from .control.client import QmpClientError, QmpCommandError
    from .control.qmp import MonitorError
    from .errors import (ConfigError, ImageError, KvmError, KvmUnavailable, MigrationError,
                         StreamError)
    for cls, status in ((StreamError, DATAERR), (MonitorError, CANTCREAT),
                        (QmpCommandError, TEMPFAIL), (QmpClientError, UNAVAILABLE),
                        (ImageError, NOINPUT), (KvmUnavailable, UNAVAILABLE), (KvmError, OSERR),
                        (MigrationError, TEMPFAIL), (ConfigError, CONFIG)):
        if isinstance(error, cls):
            return status
    return SOFTWARE
