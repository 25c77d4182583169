"""kvmlite is typed (PEP 561): py.typed, and stubs for the compiled cffi
modules that say exactly what the compiled modules have.  `make lint` runs
mypy --strict on the public API with these stubs (pyproject.toml, [tool.mypy])."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import kvmlite

ROOT = Path(kvmlite.__file__).parent


def stub_names(path: Path) -> tuple[set[str], set[str]]:
    """(module-level names, names of class _Lib) a stub declares."""
    tree = ast.parse(path.read_text())
    top, lib = set(), set()
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
        elif isinstance(node, ast.ClassDef) and node.name == "_Lib":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    lib.add(item.target.id)
                elif isinstance(item, ast.FunctionDef):
                    lib.add(item.name)
    return top, lib


@pytest.mark.parametrize("module,stub", [("kvmlite._kvm", ROOT / "_kvm.pyi"),
                                         ("kvmlite.migration._wire", ROOT / "migration" / "_wire.pyi"),
                                         ("kvmlite._postcopy", ROOT / "_postcopy.pyi")])
def test_the_stub_names_what_the_compiled_module_has(module, stub):
    compiled = importlib.import_module(module)
    top, lib = stub_names(stub)
    assert top == {"ffi", "lib"}
    assert lib == set(dir(compiled.lib)), (
        f"{stub.name} is out of date: missing {sorted(set(dir(compiled.lib)) - lib)}, "
        f"extra {sorted(lib - set(dir(compiled.lib)))}")
    for name in lib:
        value = getattr(compiled.lib, name)
        declared_function = f"def {name}(" in stub.read_text()
        assert callable(value) == declared_function, name


def test_kvmlite_says_it_is_typed():
    assert (ROOT / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")     # Python 3.11+
    data = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    shipped = data["tool"]["setuptools"]["package-data"]
    assert {"py.typed", "_kvm.pyi", "_postcopy.pyi"} <= set(shipped["kvmlite"])
    assert "_wire.pyi" in shipped["kvmlite.migration"]
    # mypy checks every module the public API comes from
    checked = set(data["tool"]["mypy"]["files"])
    exported = {m.replace(".", "/") + ".py" for m in kvmlite._EXPORTS.values()}
    assert exported <= checked, exported - checked
