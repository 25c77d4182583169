"""kvmlite: a small, readable KVM VMM in Python that live-migrates a guest
sending only the pages the guest is using (free page hinting)."""

__version__ = "0.1.0"
