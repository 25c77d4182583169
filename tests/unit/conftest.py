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


@pytest.fixture(autouse=True)
def no_migration_outlives_its_test():
    """A migration thread still running after its test reads guest RAM that the
    test's fixtures unmap: a segfault in some later test.  Each test ends its own."""
    yield
    import threading
    import time
    deadline = time.monotonic() + 10
    while (left := [t for t in threading.enumerate() if t.name == "migration" and t.is_alive()]):
        assert time.monotonic() < deadline, f"{len(left)} migration thread(s) outlived the test"
        time.sleep(0.01)
