"""The CUDA backend of the fused operations, in Triton.

Both operations read one flat ``(k, n)`` buffer of per-task gradients ``J`` (row ``i`` is the
gradient ``g_i``; columns contiguous, any row stride) exactly once.

* :func:`gram` computes ``G = J Jᵀ``, ``G[i, j] = Σ_m J[i, m] J[j, m]``. One program owns a chunk
  of 4096 columns and reads all k rows of it, 128 columns at a time, as 8 runs of 16 columns; the
  k×k product of each run is one ``tl.dot`` in float32 (float16 and bfloat16 are upcast; float64
  stays float64) and the runs are Kahan-summed in float32. The per-chunk partials
  ``(chunks, k, k)`` are summed in float64 by a second kernel in a fixed order: deterministic (no
  atomics).
* :func:`combine` computes ``d[m] = Σ_i c_i J[i, m]`` (added into ``out`` when accumulating), one
  program per tile of columns, in float32 (float64 for float64 input).

Neither function reads a value back to the host: every size comes from tensor shapes, so both can
be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_ROWS", "combine", "gram"]

# The Gram kernel pads the k rows to 16, the smallest tl.dot; padding to 32 would quadruple its
# (8, 16, 16) accumulators beyond the registers. Larger k goes to the torch backend.
MAX_ROWS = 16
# Columns per Gram program: enough loads in flight per program, and partials of k²·8 bytes per
# k·4096 input values (at most 0.8% of a float32 input's bytes) for the reduction to read.
_GRAM_CHUNK = 4096
# Columns per float32 run, the k×k product of one tl.dot. The GPU's FMA loop sums a run
# sequentially, an error that grows with the run's length. Simulated at cos(g_1, g_2) = 0.999 and
# n = 2e5, float32 sums of 4096 columns (the torch backend's pieces) move π by about 3e-5, of 128
# by 3e-6; runs of 16, Kahan-summed over a chunk, by below 5e-7 (worst of 16 cases). Kahan costs
# 4 float32 operations per run entry, 64 per column: a quarter of the padded tl.dot's 256 fused
# multiply-adds and, unlike float64 sums, as cheap on GPUs with slow float64.
_GRAM_RUN = 16
# Runs per loaded tile: 8 x 16 columns of each row are one 512-byte float32 load.
_GRAM_RUNS = 8
# Chunks per step of the reduction, one program per row of G: 64 x 16 float64 values are 16
# registers per thread at 4 warps.
_REDUCE_TILE = 64
# Columns per combine program: 8 per thread at 4 warps, enough for 128-bit loads.
_COMBINE_TILE = 1024
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Pinned, as Triton 3.10 turns its default off: combine's c_i·x + acc is one fused multiply-add.
_COMPILE_OPTIONS = {"num_warps": 4, "enable_fp_fusion": True}


@triton.jit
def _gram_partials_kernel(
    flat_ptr,
    partials_ptr,
    k,
    n,
    row_stride,
    K_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    RUNS: tl.constexpr,
    RUN: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    chunk = tl.program_id(0)
    rows = tl.arange(0, K_PAD)[None, :, None]
    # int64: k * n can exceed 2**31 for large models.
    row_offsets = rows.to(tl.int64) * row_stride
    # A tile of RUNS * RUN columns as RUNS runs of RUN consecutive columns: (RUNS, K_PAD, RUN).
    tile_cols = tl.arange(0, RUNS)[:, None, None] * RUN + tl.arange(0, RUN)[None, None, :]
    chunk_start = chunk.to(tl.int64) * CHUNK
    # Kahan summation of the runs' products over the tiles: `lost` holds what each addition to
    # `total` rounded away, negated, so the chunk's float32 error stays that of one run. It relies
    # on the operations staying in this order, which Triton and ptxas keep (no fast-math).
    total = tl.zeros((RUNS, K_PAD, K_PAD), dtype=DOT_DTYPE)
    lost = tl.zeros((RUNS, K_PAD, K_PAD), dtype=DOT_DTYPE)
    for tile_start in range(0, CHUNK, RUNS * RUN):
        cols = chunk_start + tile_start + tile_cols
        # Padding rows and columns load as zeros and so add nothing to the products.
        mask = (rows < k) & (cols < n)
        tile = tl.load(flat_ptr + row_offsets + cols, mask=mask, other=0.0).to(DOT_DTYPE)
        # "ieee": TF32 would round the inputs to 10 mantissa bits.
        runs = tl.dot(
            tile, tl.permute(tile, (0, 2, 1)), input_precision="ieee", out_dtype=DOT_DTYPE
        )
        addend = runs - lost
        new_total = total + addend
        lost = (new_total - total) - addend
        total = new_total
    partial = tl.sum(total.to(tl.float64) - lost.to(tl.float64), axis=0)
    cols = tl.arange(0, K_PAD)[None, :]
    rows = tl.arange(0, K_PAD)[:, None]
    out_offsets = chunk.to(tl.int64) * k * k + rows * k + cols
    tl.store(partials_ptr + out_offsets, partial, mask=(rows < k) & (cols < k))


@triton.jit
def _reduce_partials_kernel(
    partials_ptr, gram_ptr, k, chunks, K_PAD: tl.constexpr, TILE: tl.constexpr
):
    i = tl.program_id(0)
    j = tl.arange(0, K_PAD)
    # G[i, j] and G[j, i] both sum the upper triangle's partials in the same order (the same
    # reduction of the same column layout), so G is exactly symmetric.
    entries = tl.minimum(i, j) * k + tl.maximum(i, j)
    acc = tl.zeros((TILE, K_PAD), dtype=tl.float64)
    for start in range(0, chunks, TILE):
        chunk = start + tl.arange(0, TILE)
        offsets = chunk.to(tl.int64)[:, None] * k * k + entries[None, :]
        mask = (chunk < chunks)[:, None] & (j < k)[None, :]
        acc += tl.load(partials_ptr + offsets, mask=mask, other=0.0)
    tl.store(gram_ptr + i * k + j, tl.sum(acc, axis=0), mask=j < k)


@triton.jit
def _combine_kernel(
    flat_ptr,
    coefficients_ptr,
    out_ptr,
    k,
    n,
    row_stride,
    ACCUMULATE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    TILE: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = cols < n
    acc = tl.zeros((TILE,), dtype=COMPUTE_DTYPE)
    # Stepping a 64-bit pointer row by row: i * row_stride in 32 bits could overflow.
    row_ptrs = flat_ptr + cols
    for i in range(k):
        coefficient = tl.load(coefficients_ptr + i).to(COMPUTE_DTYPE)
        acc += coefficient * tl.load(row_ptrs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        row_ptrs += row_stride
    if ACCUMULATE:
        acc += tl.load(out_ptr + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gram(flat: torch.Tensor) -> torch.Tensor:
    """``G = J Jᵀ`` of the rows of ``flat`` ``(k, n)``: ``(k, k)`` float64, ``1 ≤ k ≤ 16``.

    Same meaning as :func:`gradbalance._kernels.torch_backend.gram`, computed more precisely:
    float32 products (float16 and bfloat16 are upcast; float64 stays float64) of runs of 16
    columns, Kahan-summed over chunks of 4096 columns, the chunks summed in float64 in a fixed
    order, so the result is deterministic. ``G`` is exactly symmetric. Any row stride is read in
    place; a buffer whose columns are not contiguous is copied first.
    """
    flat = _checked_flat(flat)
    k, n = flat.shape
    if k > MAX_ROWS:
        raise ValueError(f"gram supports at most MAX_ROWS = {MAX_ROWS} rows, got k = {k}")
    # At least one chunk, so an empty buffer still yields (zero) partials to sum.
    chunks = max(1, triton.cdiv(n, _GRAM_CHUNK))
    partials = torch.empty((chunks, k, k), dtype=torch.float64, device=flat.device)
    _gram_partials_kernel[(chunks,)](
        flat,
        partials,
        k,
        n,
        flat.stride(0),
        K_PAD=MAX_ROWS,
        CHUNK=_GRAM_CHUNK,
        RUNS=_GRAM_RUNS,
        RUN=_GRAM_RUN,
        DOT_DTYPE=_compute_dtype(flat),
        **_COMPILE_OPTIONS,
    )
    result = torch.empty((k, k), dtype=torch.float64, device=flat.device)
    _reduce_partials_kernel[(k,)](
        partials, result, k, chunks, K_PAD=MAX_ROWS, TILE=_REDUCE_TILE, **_COMPILE_OPTIONS
    )
    return result


def combine(
    flat: torch.Tensor, coefficients: torch.Tensor, out: torch.Tensor, *, accumulate: bool
) -> torch.Tensor:
    """``out ← Σ_i c_i flat[i]`` (or ``out + Σ_i c_i flat[i]`` when ``accumulate``), ``(n,)``.

    ``coefficients`` ``(k,)`` (any floating dtype, e.g. float64 π) are read as float32 and the sum
    is computed in float32 (both in float64 when ``flat`` is float64), then rounded once to
    ``out``'s dtype; unlike the torch backend, float16 and bfloat16 buffers do not round the
    coefficients to their own precision. ``out`` is a contiguous ``(n,)`` tensor with ``flat``'s
    dtype and device; it is written in place and returned. Any row stride of ``flat`` is read in
    place; a buffer whose columns are not contiguous is copied first.
    """
    flat = _checked_flat(flat)
    k, n = flat.shape
    if coefficients.shape != (k,) or not coefficients.is_floating_point():
        raise ValueError(
            f"coefficients must be a floating (k,) = ({k},) tensor, got {coefficients.dtype} "
            f"of shape {tuple(coefficients.shape)}"
        )
    if out.shape != (n,) or out.dtype != flat.dtype or out.device != flat.device:
        raise ValueError(
            f"out must be a ({n},) {flat.dtype} tensor on {flat.device}, got {out.dtype} of shape "
            f"{tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous: it is written in place")
    if n == 0:
        return out
    _combine_kernel[(triton.cdiv(n, _COMBINE_TILE),)](
        flat,
        coefficients.to(flat.device).contiguous(),
        out,
        k,
        n,
        flat.stride(0),
        ACCUMULATE=accumulate,
        COMPUTE_DTYPE=_compute_dtype(flat),
        TILE=_COMBINE_TILE,
        **_COMPILE_OPTIONS,
    )
    return out


def _checked_flat(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` as a ``(k, n)`` floating buffer with unit column stride, ``k ≥ 1``."""
    if flat.ndim != 2 or flat.shape[0] == 0:
        raise ValueError(f"flat must be a (k, n) tensor with k ≥ 1, got shape {tuple(flat.shape)}")
    if flat.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"flat must be float16, bfloat16, float32 or float64, got {flat.dtype}")
    return flat if flat.stride(1) == 1 else flat.contiguous()


def _compute_dtype(flat: torch.Tensor) -> tl.dtype:
    return tl.float64 if flat.dtype == torch.float64 else tl.float32
