"""Shared test set-up.

Without a GPU the Triton kernels run under the Triton interpreter on CPU
tensors (TRITON_INTERPRET must be set before triton is imported); GPU tests
are marked ``gpu`` and skipped.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny models (faster, and far less
    sensitive to a loaded machine); the previous count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def roll():
    """256 swiss-roll points (the trainer tests' 2-D data)."""
    from fastdiff.data import load_dataset

    return load_dataset("swissroll", n=256)


@pytest.fixture(scope="module")
def digits8():
    """40 digits at 8x8 (the trainer tests' image data)."""
    from fastdiff.data import load_dataset

    return load_dataset("digits", image_size=8, n=40)


# FASTDIFF_REHEARSE=1 (benchmarks/gpu_check.sh --rehearse): the GPU tests that
# are also marked ``rehearse`` run on the CPU at tiny shapes instead of skipping.
REHEARSE = os.environ.get("FASTDIFF_REHEARSE") == "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not (REHEARSE and "rehearse" in item.keywords):
            item.add_marker(skip)
