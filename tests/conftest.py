"""Test setup. Must run before anything imports triton.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1), so every
Triton kernel is exercised in CI. With a GPU the variable is left alone and the kernels compile for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On CUDA, a device-side assert ends the process's CUDA context: every later test in it would error. Under
    pytest-xdist (scripts/gpu_session.sh) the worker then exits, so the test is reported as crashing it and xdist
    runs the rest in a fresh worker."""
    outcome = yield
    exc = call.excinfo.value if call.excinfo is not None else None
    if (DEVICE.type == "cuda" and exc is not None and "device-side assert" in str(exc)
            and os.environ.get("PYTEST_XDIST_WORKER")):
        report = outcome.get_result()
        print(f"\n{report.nodeid}: device-side assert, CUDA context lost; ending this worker", flush=True)
        os._exit(3)
