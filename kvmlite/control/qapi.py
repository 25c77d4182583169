"""Argument and result types for QMP commands, checked the way QEMU's QAPI
input visitor checks them, with QEMU's wording.

A command's arguments are declared as QAPI declares them: a dict of member
names to types, a leading ``*`` marking an optional member::

    Command("migrate", {"uri": STR, "*detach": BOOL}, doc="...")

Checking is strict (docs/interop/qmp-spec.rst, "Compatibility
Considerations": the server type-checks arguments and refuses keys it does
not understand, before the command has any side effect):

* a boolean is JSON true/false, never "false" or 0;
* an integer is a JSON integer (not 1.0, not a string) inside its range;
* a number is finite (the JSON layer already refuses NaN and Infinity);
* an enum is one of its strings;
* a member that is not declared is refused; a missing required one too.

The messages are QEMU's (qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c,
migration/options.c; checked against QEMU 7.2): "Invalid parameter type for
'hint', expected: boolean", "Parameter 'max-bandwidth' expects uint64" (a
non-integer where an unsigned one is declared), "Parameter 'uri' is missing",
"Parameter 'foo' is unexpected", "Parameter 'capability' does not accept
value 'x'", and for ranges "Parameter 'downtime-limit' expects an integer in
the range of 0 to 2000000 ms" (QEMU writes the internal name,
'downtime_limit'; kvmlite the one the client sent).  Nested members are named
as QEMU names them: ``capabilities[0].state``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping


class ErrorClass:
    """QAPI's ErrorClass enum (qapi/error.json): the only classes a client sees."""
    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"
    ALL = frozenset({GENERIC, COMMAND_NOT_FOUND, DEVICE_NOT_ACTIVE, DEVICE_NOT_FOUND, KVM_MISSING_CAP})


class QmpError(Exception):
    """An error reply: ``{"error": {"class": cls, "desc": desc}}``.

    Command handlers raise it, e.g.
    ``raise QmpError(ErrorClass.GENERIC, "There's a migration process in progress")``.
    """

    def __init__(self, cls: str, desc: str):
        if cls not in ErrorClass.ALL:
            raise ValueError(f"{cls!r} is not a QAPI error class")
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def _bad_type(path: str, expected: str) -> QmpError:
    return QmpError(ErrorClass.GENERIC, f"Invalid parameter type for '{path}', expected: {expected}")


class Type:
    """A QAPI type: `check` returns the value or raises QmpError.  Each kind
    has a `name` (QAPI's, for the docs)."""

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class AnyType(Type):
    name: str = "any"

    def check(self, value, path):
        return value


@dataclass(frozen=True)
class Str(Type):
    name: str = "str"
    max_len: int = 4096

    def check(self, value, path):
        if not isinstance(value, str):
            raise _bad_type(path, "string")
        if len(value) > self.max_len:
            raise QmpError(ErrorClass.GENERIC,
                           f"Parameter '{path}' expects a string of at most {self.max_len} characters")
        return value


@dataclass(frozen=True)
class Bool(Type):
    name: str = "bool"

    def check(self, value, path):
        if not isinstance(value, bool):
            raise _bad_type(path, "boolean")
        return value


@dataclass(frozen=True)
class Int(Type):
    """A JSON integer in [lo, hi]; `unit` only words the range error."""
    lo: int = -(1 << 63)
    hi: int = (1 << 63) - 1
    unit: str = ""
    name: str = "int"

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            if self.name.startswith("uint") or self.name == "size":   # QEMU's unsigned visitor
                raise QmpError(ErrorClass.GENERIC, f"Parameter '{path}' expects uint64")
            raise _bad_type(path, "integer")
        if not self.lo <= value <= self.hi:
            unit = f" {self.unit}" if self.unit else ""
            raise QmpError(ErrorClass.GENERIC, f"Parameter '{path}' expects an integer "
                                               f"in the range of {self.lo} to {self.hi}{unit}")
        return value

    def describe(self):
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.name} ({self.lo}..{self.hi}{unit})"


@dataclass(frozen=True)
class Number(Type):
    """A finite JSON number (integer or not) in [lo, hi]."""
    lo: float = -math.inf
    hi: float = math.inf
    unit: str = ""
    name: str = "number"

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad_type(path, "number")
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            unit = f" {self.unit}" if self.unit else ""
            raise QmpError(ErrorClass.GENERIC, f"Parameter '{path}' expects a number "
                                               f"in the range of {self.lo:g} to {self.hi:g}{unit}")
        return value


@dataclass(frozen=True)
class Enum(Type):
    name: str
    values: tuple[str, ...]

    def check(self, value, path):
        if not isinstance(value, str):
            raise _bad_type(path, "string")
        if value not in self.values:
            # QEMU names the member alone here, not its path
            name = path.rsplit(".", 1)[-1]
            raise QmpError(ErrorClass.GENERIC, f"Parameter '{name}' does not accept value '{value[:64]}'")
        return value


@dataclass(frozen=True)
class Array(Type):
    of: Type
    max_len: int = 1024

    @property
    def name(self):
        return f"[{self.of.name}]"

    def check(self, value, path):
        if not isinstance(value, list):
            raise _bad_type(path, "array")
        if len(value) > self.max_len:
            raise QmpError(ErrorClass.GENERIC,
                           f"Parameter '{path}' expects an array of at most {self.max_len} elements")
        return [self.of.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Map(Type):
    """An object with any keys and values of one type (results only: QAPI
    inputs have no such thing)."""
    of: Type
    name: str = "object"

    def check(self, value, path):
        if not isinstance(value, dict):
            raise _bad_type(path, "object")
        return {k: self.of.check(v, f"{path}.{k}" if path else k) for k, v in value.items()}


@dataclass(frozen=True)
class Nullable(Type):
    """`of`, or JSON null (results only: "no such fact")."""
    of: Type

    @property
    def name(self):
        return f"{self.of.name} or null"

    def check(self, value, path):
        return None if value is None else self.of.check(value, path)


@dataclass(frozen=True)
class Member:
    name: str            # as on the wire: "downtime-limit"
    type: Type
    optional: bool = False

    @property
    def pyname(self) -> str:
        """The keyword a handler receives it as: "downtime_limit"."""
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class Struct(Type):
    """A JSON object with declared members.  `members` maps wire names to
    types; a leading ``*`` marks an optional member, as in QAPI."""
    name: str
    members: Mapping[str, Type] = field(default_factory=dict)

    @property
    def fields(self) -> tuple[Member, ...]:
        return tuple(Member(k.lstrip("*"), t, k.startswith("*")) for k, t in self.members.items())

    def check(self, value, path):
        if not isinstance(value, dict):
            raise _bad_type(path or "null", "object")
        out = {}
        for m in self.fields:                  # in declaration order, as QEMU visits them
            where = f"{path}.{m.name}" if path else m.name
            if m.name in value:
                out[m.name] = m.type.check(value[m.name], where)
            elif not m.optional:
                raise QmpError(ErrorClass.GENERIC, f"Parameter '{where}' is missing")
        for key in value:
            if key not in out:
                where = f"{path}.{key}" if path else key
                raise QmpError(ErrorClass.GENERIC, f"Parameter '{where[:128]}' is unexpected")
        return out


EMPTY = Struct("empty")


@dataclass(frozen=True)
class Command:
    """A QMP command: its name, arguments, result and a line of doc.

    `returns` is checked only where asked to (tests, `CommandTable(check_returns=True)`)."""
    name: str
    data: Mapping[str, Type] | Struct = field(default_factory=dict)
    returns: Type | None = None
    doc: str = ""

    @property
    def args(self) -> Struct:
        return self.data if isinstance(self.data, Struct) else Struct(self.name, self.data)


@dataclass(frozen=True)
class Event:
    """A QMP event: its name and the members of its `data` (None: no data)."""
    name: str
    data: Mapping[str, Type] | Struct | None = None
    doc: str = ""

    @property
    def struct(self) -> Struct | None:
        if self.data is None or isinstance(self.data, Struct):
            return self.data
        return Struct(self.name, self.data)


# The scalar types QAPI names, as instances.
ANY = AnyType()
STR = Str()
BOOL = Bool()
INT = Int()                                   # int64
INT64 = Int(name="int64")
UINT8 = Int(0, (1 << 8) - 1, name="uint8")
UINT32 = Int(0, (1 << 32) - 1, name="uint32")
UINT64 = Int(0, (1 << 64) - 1, name="uint64")
SIZE = Int(0, (1 << 64) - 1, unit="bytes", name="size")
NUMBER = Number()
