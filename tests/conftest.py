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
