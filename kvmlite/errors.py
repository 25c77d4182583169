"""The errors kvmlite raises.  Each carries the context a user needs to act."""

from __future__ import annotations

import errno as _errno
import os


class KvmliteError(Exception):
    """Base of every error kvmlite reports to a user as one line."""


class ConfigError(KvmliteError):
    """A bad command-line value or machine configuration."""


class ImageError(KvmliteError):
    """The guest image cannot be loaded."""


class KvmUnavailable(KvmliteError):
    """/dev/kvm is missing, not accessible, or too old."""


class KvmError(KvmliteError):
    """A KVM ioctl failed.  Carries the ioctl's name, errno and what it was for."""

    def __init__(self, ioctl: str, err: int, context: str = ""):
        self.ioctl = ioctl
        self.errno = err
        self.context = context
        name = _errno.errorcode.get(err, str(err))
        what = f" ({context})" if context else ""
        super().__init__(f"{ioctl} failed{what}: {name}: {os.strerror(err)}")


class GuestMemoryError(KvmliteError):
    """A guest-physical access outside RAM."""

    def __init__(self, gpa: int, length: int, ram_size: int):
        self.gpa = gpa
        self.length = length
        super().__init__(
            f"guest-physical range {gpa:#x}+{length:#x} is outside RAM (0..{ram_size:#x})")


class MigrationError(KvmliteError):
    """A migration failed; the source VM keeps running."""


class StreamError(MigrationError):
    """An incoming migration stream is malformed, truncated or hostile."""


class UserfaultError(KvmliteError):
    """userfaultfd is unavailable here, or one of its ioctls failed (post-copy)."""


class PostcopyLinkError(MigrationError):
    """The link broke after the switch to post-copy.  The VM is split between the
    two VMMs: neither may run it alone; both wait for `migrate --resume`."""
