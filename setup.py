# setuptools needs a setup.py to run cffi's build step: it compiles
# kvmlite._kvm against this machine's <linux/kvm.h>, the migration stream's
# fast paths (kvmlite.migration._wire) against OpenSSL's libcrypto, and the
# post-copy fault machinery (kvmlite._postcopy) against <linux/userfaultfd.h>,
# at install time.
#
# cffi builds the modules for the stable ABI (py_limited_api, *.abi3.so);
# the wheel is tagged to match, so one wheel serves every CPython from 3.10 on.
#
# A wheel also carries the project's guest image (kvmlite/_guest/guest.bin),
# built here with the machine's gcc, as and ld, so that `python -m kvmlite.demo`
# and `python -m kvmlite.soak` work from the wheel (kvmlite/images.py).  Where
# the guest cannot be built the wheel has none, and those tools say so.
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithGuest(build_py):
    def run(self) -> None:
        super().run()
        guest = HERE / "guest"
        if self.editable_mode or not (guest / "Makefile").is_file():
            return      # an editable install boots guest/guest.bin in place
        try:
            subprocess.run(["make", "-s", "-C", str(guest), "guest.bin"], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"warning: the guest image was not built ({e}); this wheel will have none")
            return
        dest = Path(self.build_lib) / "kvmlite" / "_guest"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(guest / "guest.bin", dest / "guest.bin")


setup(
    cmdclass={"build_py": BuildPyWithGuest},
    cffi_modules=["kvmlite/_kvm_build.py:ffibuilder",
                  "kvmlite/migration/_wire_build.py:ffibuilder",
                  "kvmlite/_postcopy_build.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
