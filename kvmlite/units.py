"""Parsing sizes and addresses given on the command line."""

from __future__ import annotations

import re

from .errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str, what: str = "--memory") -> int:
    """'256M', '1G', '1GiB', '4096' (bytes) → bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"{what} {text!r}: expected a size like 256M, 1G or 1073741824")
    return int(m.group(1)) << _SHIFT[m.group(2).upper()]


def parse_addr(text: str, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected an address like 0x100000") from None
    if value < 0:
        raise ConfigError(f"{what} {text!r}: addresses are not negative")
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
