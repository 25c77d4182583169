# setuptools needs a setup.py to run cffi's build step: it compiles
# kvmlite._kvm against this machine's <linux/kvm.h> at install time.
#
# cffi builds the module for the stable ABI (py_limited_api, kvmlite/_kvm.abi3.so);
# the wheel is tagged to match, so one wheel serves every CPython from 3.10 on.
from setuptools import setup

setup(
    cffi_modules=["kvmlite/_kvm_build.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
