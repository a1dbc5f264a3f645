"""A pytest plugin (tests/conftest.py loads it): after each `cuda` test a synchronise, so that
an asynchronous GPU fault (an illegal address, a device-side assert) is reported as that test's
error; every test after it is then skipped, naming that test, since each of its CUDA calls would
fail with the same error and say nothing about its own test.  Other failures do not stop the
run, and the run still ends with its summary of every failure."""
from __future__ import annotations

import pytest
import torch

_broken_after: list[str] = []  # the test after which the CUDA context stopped working


@pytest.fixture(autouse=True)
def _cuda_context_still_works(request):
    yield
    if "cuda" not in request.keywords or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError:  # torch.AcceleratorError is one
        _broken_after.append(request.node.nodeid)
        raise


def pytest_sessionfinish(session, exitstatus):
    # A fault in a test that may fail (xfail) is reported as an expected failure: the run
    # must still fail.
    if _broken_after and exitstatus == 0:
        session.exitstatus = 1


def pytest_runtest_setup(item):
    if _broken_after:
        pytest.skip(f"the CUDA context stopped working during {_broken_after[0]}")
