"""Where the project's own guest image is, for the tools that boot it by default
(`python -m kvmlite.demo`, `python -m kvmlite.soak`).

In a source checkout it is `guest/guest.bin`, built by `make guest`.  A wheel
carries a copy built when the wheel was (setup.py builds the guest with the
machine's gcc and ld and packs it as `kvmlite/_guest/guest.bin`).  A wheel
built where the guest could not be built has none: then the error says how to
get one, and `--image` takes any image.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ConfigError

CHECKOUT = Path(__file__).resolve().parent.parent / "guest"
PACKAGED = Path(__file__).resolve().parent / "_guest"


def default_guest(*, checkout: Path = CHECKOUT, packaged: Path = PACKAGED) -> Path:
    """The guest image to boot when none is named: the checkout's, else the wheel's."""
    for where in (checkout, packaged):
        image = where / "guest.bin"
        if image.is_file():
            return image
    if (checkout / "Makefile").is_file():
        raise ConfigError(f"the guest image is not built yet: run `make -C {checkout}` "
                          "(or `make guest` at the top of the checkout)")
    raise ConfigError("this kvmlite has no guest image: its wheel was built where the guest "
                      "could not be (it needs gcc, as and ld).  Build one in a checkout of kvmlite "
                      "(`make guest`) and pass it with --image PATH")


def image_or_say(image: str | None, prog: str) -> str | None:
    """`image` if named, else the default guest; None once stderr says why there is none."""
    if image is not None:
        return image
    try:
        return str(default_guest())
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
