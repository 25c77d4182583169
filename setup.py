# setuptools needs a setup.py to run cffi's build step: it compiles
# kvmlite._kvm against this machine's <linux/kvm.h>, and the migration
# stream's fast paths (kvmlite.migration._wire) against OpenSSL's libcrypto,
# at install time.
#
# cffi builds the modules for the stable ABI (py_limited_api, *.abi3.so);
# the wheel is tagged to match, so one wheel serves every CPython from 3.10 on.
from setuptools import setup

setup(
    cffi_modules=["kvmlite/_kvm_build.py:ffibuilder",
                  "kvmlite/migration/_wire_build.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
