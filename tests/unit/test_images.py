"""Which guest image the demo and the soak boot when none is named."""

from __future__ import annotations

import pytest

from kvmlite.errors import ConfigError
from kvmlite.images import default_guest


def test_the_checkouts_image_comes_first_then_the_packaged_one(tmp_path):
    checkout, packaged = tmp_path / "guest", tmp_path / "_guest"
    checkout.mkdir()
    packaged.mkdir()
    (packaged / "guest.bin").write_bytes(b"\x90")
    assert default_guest(checkout=checkout, packaged=packaged) == packaged / "guest.bin"
    (checkout / "guest.bin").write_bytes(b"\x90")
    assert default_guest(checkout=checkout, packaged=packaged) == checkout / "guest.bin"


def test_a_checkout_not_built_yet_says_make_guest(tmp_path):
    checkout = tmp_path / "guest"
    checkout.mkdir()
    (checkout / "Makefile").write_text("all:\n")
    with pytest.raises(ConfigError, match="not built yet: run `make -C"):
        default_guest(checkout=checkout, packaged=tmp_path / "none")


def test_a_wheel_without_a_guest_says_what_it_needs(tmp_path):
    with pytest.raises(ConfigError, match="has no guest image.*--image PATH"):
        default_guest(checkout=tmp_path / "no-checkout", packaged=tmp_path / "none")
