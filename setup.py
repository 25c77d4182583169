# setuptools needs a setup.py to run cffi's build step: it compiles
# kvmlite._kvm against this machine's <linux/kvm.h>, and the migration
# stream's fast paths against OpenSSL's libcrypto, at install time.
from setuptools import setup

setup(cffi_modules=["kvmlite/_kvm_build.py:ffibuilder",
                    "kvmlite/migration/_wire_build.py:ffibuilder"])
