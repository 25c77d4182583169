# setuptools needs a setup.py to run cffi's build step: it compiles
# kvmlite._kvm against this machine's <linux/kvm.h>, the migration stream's
# fast paths (kvmlite.migration._wire) against OpenSSL's libcrypto, and the
# post-copy fault machinery (kvmlite._postcopy) against <linux/userfaultfd.h>,
# at install time.
#
# cffi builds the modules for the stable ABI (py_limited_api, *.abi3.so);
# the wheel is tagged to match, so one wheel serves every CPython from 3.10 on.
from setuptools import setup

setup(
    cffi_modules=["kvmlite/_kvm_build.py:ffibuilder",
                  "kvmlite/migration/_wire_build.py:ffibuilder",
                  "kvmlite/_postcopy_build.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
