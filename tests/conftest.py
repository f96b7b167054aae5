"""Test setup. Must run before anything imports triton.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1), so every
Triton kernel is exercised in CI. With a GPU the variable is left alone and the kernels compile for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _share_cores_between_xdist_workers() -> None:
    """Under pytest-xdist (``-n K``) each worker gets its share of the CPU cores for its intra-op threads (and
    the processes its tests start inherit it through OMP_NUM_THREADS), unless the user set OMP_NUM_THREADS.

    Why: every worker defaults to all the cores, so K workers oversubscribe them K-fold and OpenMP's pools spin
    against each other. On a 2-core CI machine (2026-12-04) the whole suite took 10.5 min under ``-n 2`` with
    two threads per worker, 4.7 min with one, against ~7 min serially with two."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    torch.set_num_threads(share)


_share_cores_between_xdist_workers()

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
