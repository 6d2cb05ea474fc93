"""Set-up shared by every test module."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit: when triton.language
# is imported (its own helpers, tl.sum among them, are @triton.jit functions) and when
# gradbalance._kernels.triton_backend is. Setting it here, before any test module imports either,
# makes the kernel tests run in Triton's CPU interpreter on a machine without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def digits():
    """A small slice of scikit-learn's bundled digits: 96 training, 40 test images."""
    from gradbalance.experiments.datasets import load_dataset

    return load_dataset("digits").subset(96, 40)


@pytest.fixture(scope="module")
def teacher(digits):
    """An untrained digits teacher, run on each batch (as for augmented batches)."""
    from gradbalance.experiments.datasets import make_teacher
    from gradbalance.experiments.methods import TeacherTargets

    torch.manual_seed(0)
    network = make_teacher("digits", digits.input_shape, digits.num_classes)
    return TeacherTargets(network.eval().requires_grad_(False), None)
