"""Chunk sizes (ops/core/chunking.default_chunk_size): logits per chunk, and on CPU hidden values per chunk."""

import pytest
import torch

from ptkernels.ops.core import chunking, gemm

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def blas(monkeypatch):
    """The torch.mm route (2^24 logits a chunk), whatever this machine's rule says."""
    monkeypatch.setattr(gemm, "_CPU_GEMM", "blas")
    monkeypatch.setattr(gemm, "_CHOICE", {})


@pytest.mark.parametrize("v, d, rows", [
    (32000, 512, 512),  # the CPU benchmark size: the logits decide
    (128256, 4096, 256),  # never fewer than 256 rows
    (872, 128, 4096),  # small head: the CPU cap of 4096 rows
    (872, 2048, 512),  # D large against V: 2^20 hidden values decide
    (8192, 2048, 512),
    (872, 512, 2048),
    (872, None, 4096),  # ops on logits pass no D
])
def test_cpu_chunk_bounds_logits_and_hidden_values(blas, v, d, rows):
    assert chunking.default_chunk_size(v, CPU, torch.float32, d) == rows


def test_cuda_chunk_ignores_the_hidden_width():
    assert chunking.default_chunk_size(128256, CUDA, torch.bfloat16, 8192) == 2048
    assert chunking.default_chunk_size(872, CUDA, torch.bfloat16, 8192) == 8192
