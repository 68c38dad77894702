"""Test tiers: with a CUDA device the kernels run on it; without one, Triton's interpreter
runs the very same kernels on the CPU. The interpreter must be switched on before Triton
is imported, so this happens at the top of the root conftest."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # MKL's AVX-512 sgemm rounds a row differently with the number of rows in the batch;
    # tests that compare batches of different shapes bit for bit need a CPU product that
    # does not (MKL reads this before its first product; subprocesses inherit it).
    os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs in the GPU tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """CUDA when present, else the CPU (kernels then run in Triton's interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def base_generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
