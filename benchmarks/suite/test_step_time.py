"""pytest-benchmark: one training step of each workload over n and k, and the Gram kernels.

    python -m pytest benchmarks/suite --benchmark-only

pytest-benchmark times the workloads one after the other; for the ratios that docs/performance.md
reports (interleaved repeats, one process) use ``python benchmarks/scripts/ratios.py``. The default
test run does not collect this file (``testpaths = ["tests"]``). The workloads are those of
``benchmarks/scripts/workloads.py`` (``conftest.py`` puts that folder on ``sys.path``).
"""

from __future__ import annotations

import pytest
from workloads import WORKLOADS, Batch, gram_calls, mlp_shape

# A fixed, small number of rounds keeps the whole run at a few minutes on a 2-core CPU:
# pytest-benchmark's own calibration would spend a second or more on each of the 47 cases.
ROUNDS = 7
WARMUP_ROUNDS = 2


@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("n", ["1e5", "1e6"])
def test_step(benchmark, n: str, k: int, name: str) -> None:
    benchmark.group = f"step: MLP n ≈ {n}, k = {k}"
    step = WORKLOADS[name](Batch(num_losses=k), **mlp_shape(float(n)))
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)


@pytest.mark.parametrize("operation", ["read once", "gram", "gram + combine"])
@pytest.mark.parametrize("k", [2, 3, 8])
@pytest.mark.parametrize("n", ["1e5", "1e6", "1e7"])
def test_gram(benchmark, n: str, k: int, operation: str) -> None:
    """Gram (and Gram + combine into a preallocated buffer) against one read of the gradients."""
    benchmark.group = f"gram: {k} x {n} float32 gradients"
    call = gram_calls(k, int(float(n)))[operation]
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
