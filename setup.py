# setuptools needs a setup.py to run cffi's build step: it compiles
# kvmlite._kvm against this machine's <linux/kvm.h> at install time.
from setuptools import setup

setup(cffi_modules=["kvmlite/_kvm_build.py:ffibuilder"])
