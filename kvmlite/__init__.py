"""kvmlite: a small, readable KVM VMM in Python that live-migrates a guest
sending only the pages the guest is using (free page hinting).

The public API, imported on first use (so `python -m kvmlite` starts fast):

    from kvmlite import Machine, MachineConfig, BootConfig, Migration, MigrationParams

README.md, "From Python", shows a VM booted and migrated in a few lines.
"""

__version__ = "0.2.0"

_EXPORTS = {
    "Machine": "kvmlite.machine", "RunResult": "kvmlite.machine",
    "MachineConfig": "kvmlite.config", "BootConfig": "kvmlite.config",
    "RunConfig": "kvmlite.config", "IncomingConfig": "kvmlite.config",
    "MigrationParams": "kvmlite.config", "Credentials": "kvmlite.config",
    "Migration": "kvmlite.migration.source", "Incoming": "kvmlite.migration.destination",
    "MigrationStatus": "kvmlite.migration.status", "ReceiveState": "kvmlite.migration.status",
    "Hooks": "kvmlite.hooks",
    "KvmliteError": "kvmlite.errors", "ConfigError": "kvmlite.errors",
    "KvmError": "kvmlite.errors", "MigrationError": "kvmlite.errors", "StreamError": "kvmlite.errors",
    "run": "kvmlite.runner",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmlite' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
