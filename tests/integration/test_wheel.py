"""What ships in the wheel works from the wheel: the stable-ABI tag, the packaged guest, the soak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """kvmlite's wheel, built from this checkout as `pip wheel .` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    [whl] = out.glob("kvmlite-*.whl")
    return whl


def test_wheel_is_tagged_for_the_stable_abi_and_carries_the_guest(wheel):
    """One abi3 wheel; its compiled modules are abi3, and kvmlite/_guest/guest.bin is the guest built here."""
    assert wheel.name.endswith("-cp310-abi3-linux_x86_64.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert {"kvmlite/_kvm.abi3.so", "kvmlite/migration/_wire.abi3.so"} <= set(names), names
        assert z.read("kvmlite/_guest/guest.bin") == (ROOT / "guest" / "guest.bin").read_bytes()


def test_the_soak_runs_from_the_unpacked_wheel_with_its_own_guest(wheel, tmp_path):
    """Outside any checkout, `python -m kvmlite.soak` finds the packaged guest and loses no page."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import kvmlite.images as i; print(i.default_guest())"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert where.stdout.strip() == str(site / "kvmlite" / "_guest" / "guest.bin"), where.stderr
    r = subprocess.run([sys.executable, "-m", "kvmlite.soak", "--migrations", "2", "--memory", "128M",
                        "--pages", "2000", "--json"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(r.stdout)
    assert figures["completed"] == 2 and figures["corrupted_pages"] == 0, figures
