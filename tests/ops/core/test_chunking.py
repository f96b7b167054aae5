"""Chunk sizes (ops/core/chunking.default_chunk_size): logits per chunk, and on CPU hidden values per chunk."""

import os
import platform
import subprocess
import sys

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


@pytest.fixture
def onednn(monkeypatch):
    """The oneDNN route (fresh products: chunks kept below glibc's mmap threshold), whatever this machine's rule."""
    if not gemm._onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    monkeypatch.setattr(gemm, "_CPU_GEMM", "onednn")
    monkeypatch.setattr(gemm, "_CHOICE", {})


@pytest.mark.parametrize("v, d, rows", [
    (8192, 128, 992),  # a power-of-two vocabulary: 1024 rows would be exactly 32 MiB, mapped every time
    (4096, 128, 2016),
    (32000, 512, 256),  # the CPU benchmark size
    (32768, 512, 224),
    (40000, 128, 192),  # the fewest rows cut to fit (CPU_MIN_FRESH_CHUNK_ROWS)
    (50257, 512, 256),  # fewer would fit: 256 rows all the same
    (128256, 4096, 256),
    (872, 128, 4096),  # the CPU cap
    (872, 2048, 512),  # D large against V: 2^20 hidden values decide
    (872, 640, 1632),
    (872, None, 4096),
])
def test_onednn_chunk_of_logits_stays_below_the_mmap_threshold(onednn, v, d, rows):
    got = chunking.default_chunk_size(v, CPU, torch.float32, d)
    assert got == rows
    assert got % 32 == 0
    fits = gemm.CPU_FRESH_BUFFER_BYTES // (4 * v) >= chunking.CPU_MIN_FRESH_CHUNK_ROWS
    assert (got * v * 4 <= gemm.CPU_FRESH_BUFFER_BYTES) == fits
    assert gemm.CPU_FRESH_BUFFER_BYTES < 32 << 20  # a block of exactly 32 MiB is mapped too


_FAULTS_PER_CHUNK = """
import resource, torch
from ptkernels.ops.core import chunking, gemm
v, d = 8192, 128
rows = chunking.default_chunk_size(v, torch.device("cpu"), torch.float32, d)
h, w = torch.randn(rows, d), torch.randn(v, d)
for _ in range(3):
    gemm._linear(h, w)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    gemm._linear(h, w)
print(rows, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mmap threshold is glibc's")
def test_a_fresh_chunk_of_logits_costs_no_page_faults(onednn):
    """GEMM 1 of a default chunk on oneDNN (a fresh product each time) is served from the heap, not from fresh
    pages: under the old power-of-two rule, V=8192 gave 1024-row chunks of exactly 32 MiB, 8192 page faults
    (zero-filled 4 KiB pages) on every call. In a fresh process: after hundreds of other tests the heap may grow
    or be trimmed now and then (one chunk's pages over 5 calls once), which is not what this checks."""
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CHUNK], capture_output=True, text=True, check=True,
                         env={**os.environ, "PTK_CPU_GEMM": "onednn"}).stdout.split()
    rows, faults = int(out[-2]), float(out[-1])
    assert rows == chunking.default_chunk_size(8192, CPU, torch.float32, 128)
    assert faults < rows * 8192 * 4 / 4096 / 16, f"{faults} page faults per chunk of {rows} x 8192"


def test_cuda_chunk_ignores_the_hidden_width():
    assert chunking.default_chunk_size(128256, CUDA, torch.bfloat16, 8192) == 2048
    assert chunking.default_chunk_size(872, CUDA, torch.bfloat16, 8192) == 8192
