"""What the pytest-benchmark suites share: timing one prepared case."""
from __future__ import annotations

import itertools

import pytest
import torch

from fastdiff import bench as B


@pytest.fixture
def time_case(benchmark):
    """``time_case(case, nsets, device, group, info)``: time ``case.fn`` over
    its ``nsets`` rotating input sets (skipped with the case's note when it
    cannot run here), after three warm-up calls under the case's backend.
    On a GPU every call is synchronised: the work is timed, not the launch."""
    def run(case, nsets: int, device: str, group: str, info: dict) -> None:
        if case.fn is None:
            pytest.skip(case.note)
        counter = itertools.count()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def call():
            case.fn(next(counter) % nsets)
            sync()

        benchmark.group = group
        benchmark.extra_info.update(info)
        with B.use_backend(case.backend):
            for _ in range(3):  # first-call compilation of Triton kernels, allocator
                call()
            benchmark(call)
    return run
