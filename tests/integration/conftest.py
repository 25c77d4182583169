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
