"""Set-up shared by every test module."""

import os

import torch

# Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit: when triton.language
# is imported (its own helpers, tl.sum among them, are @triton.jit functions) and when
# gradbalance.kernels.triton_backend is. Setting it here, before any test module imports either,
# makes the kernel tests run in Triton's CPU interpreter on a machine without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
