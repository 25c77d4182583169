import os

import pytest

from tests.conftest import kvm_problem


@pytest.fixture(autouse=True)
def _needs_kvm():
    """Skip without /dev/kvm, but fail under CI=true: CI promises these tests run."""
    problem = kvm_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {problem}: the integration tests must run here")
        pytest.skip(f"needs KVM: {problem}")


def pytest_collection_modifyitems(items):
    """Every test here runs real VMs: mark them `kvm`, so `pytest -m 'not kvm'` is the quick subset."""
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.kvm)
