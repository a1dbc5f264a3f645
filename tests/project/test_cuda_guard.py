"""helpers/cuda_guard.py, on the CPU: a failing GPU test does not stop the run; a GPU fault
(a synchronise that raises after the test) is that test's error, and every test after it is
skipped naming it.
The GPU is stood in for by replacing torch.cuda's is_initialized and synchronize in the
inner session."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import REPO

INNER_TESTS = '''
import pytest
import torch

state = {"broken": False}
torch.cuda.is_initialized = lambda: True


def synchronize():
    if state["broken"]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


torch.cuda.synchronize = synchronize


@pytest.mark.cuda
def test_a_fails_plainly():
    assert 1 == 2


@pytest.mark.cuda
def test_b_passes():
    pass


@pytest.mark.cuda
def test_c_faults():
    state["broken"] = True  # the kernel's fault surfaces at the next synchronise


@pytest.mark.cuda
def test_d_after_the_fault():
    pass


def test_e_after_the_fault_without_a_gpu():
    pass
'''


def run_inner(folder, tests: str) -> subprocess.CompletedProcess:
    """An inner pytest session over `tests` (one file), with the guard as its plugin."""
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a GPU\n")
    (folder / "conftest.py").write_text('pytest_plugins = ["helpers.cuda_guard"]\n')
    (folder / "test_inner.py").write_text(textwrap.dedent(tests))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", "-v", str(folder)],
                          cwd=folder, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{REPO / 'tests'}:{REPO}", "PATH": "/usr/bin:/bin"})


def test_gpu_fault_stops_the_session_at_its_test_and_plain_failures_do_not(tmp_path):
    done = run_inner(tmp_path, INNER_TESTS)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "test_a_fails_plainly FAILED" in out and "assert 1 == 2" in out
    assert "test_b_passes PASSED" in out
    assert "ERROR at teardown of test_c_faults" in out and "illegal memory access" in out
    for name in ("test_d_after_the_fault", "test_e_after_the_fault_without_a_gpu"):
        assert f"test_inner.py::{name} SKIPPED" in out, name
    summary = out.split("short test summary info")[1]
    assert "SKIPPED [2]" in summary and "the CUDA context stopped working during test_inner.py::test_c_faults" in summary
    assert "1 failed, 2 passed, 2 skipped, 1 error" in out


XFAIL_FAULT = INNER_TESTS.split("@pytest.mark.cuda")[0] + '''
@pytest.mark.cuda
@pytest.mark.xfail(reason="may fail")
def test_faults_while_allowed_to_fail():
    state["broken"] = True
'''


def test_gpu_fault_in_an_xfail_test_still_fails_the_run(tmp_path):
    done = run_inner(tmp_path, XFAIL_FAULT)
    assert done.returncode == 1, done.stdout + done.stderr
