"""Unit tests never touch /dev/kvm: any test that opens it fails."""

import os

import pytest


@pytest.fixture(autouse=True)
def no_dev_kvm(monkeypatch):
    """Fail any test that tries to open /dev/kvm."""
    real_open = os.open

    def guarded(path, *args, **kwargs):
        assert os.path.realpath(os.fsdecode(path)) != "/dev/kvm", "unit test opened /dev/kvm"
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", guarded)
