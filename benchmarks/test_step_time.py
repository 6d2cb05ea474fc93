"""pytest-benchmark: one training step of each workload, and the Gram matrix against a plain read.

    python -m pytest benchmarks/ --benchmark-only --benchmark-group-by=group

pytest-benchmark times the workloads one after the other; for the ratios that docs/performance.md
reports (interleaved repeats, one process) use ``python benchmarks/ratios.py``.
"""

import pytest
import torch
from workloads import Batch, workloads

from gradbalance import engine

STEPS = workloads(Batch())


@pytest.mark.benchmark(group="step: MLP 1.6M parameters, k = 2")
@pytest.mark.parametrize("name", list(STEPS))
def test_step(benchmark, name):
    benchmark(STEPS[name])


@pytest.mark.benchmark(group="gram: k x n float32 gradients")
@pytest.mark.parametrize("n", [100_000, 1_000_000, 10_000_000])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_gram_matrix(benchmark, k, n):
    blocks = [torch.randn(k, n)]
    gram = benchmark(engine.gram_matrix, blocks)
    assert gram.shape == (k, k)


@pytest.mark.benchmark(group="gram: k x n float32 gradients")
@pytest.mark.parametrize("n", [100_000, 1_000_000, 10_000_000])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_read_once(benchmark, k, n):
    """The memory-traffic floor of any Gram computation: one read of the k·n gradients."""
    gradients = torch.randn(k, n)
    benchmark(gradients.sum)
